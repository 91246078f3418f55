"""Build the bundled demo data set from the E2E NLG data in ../shared/data/e2e (CC BY-SA 4.0).

Meaning representations (MRs) are split, not lines, so no held-out MR is seen in training:
a seeded 90/10 split of the distinct MRs; up to 3 references per training MR, 1 per held-out MR.
Run: python scripts/make_demo_data.py  (writes src/deltatune/bundled/e2e/)
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "e2e" / "valid.txt"
TARGET = ROOT / "src" / "deltatune" / "bundled" / "e2e"


def main() -> None:
    references: dict[str, list[str]] = defaultdict(list)
    for line in SOURCE.read_text(encoding="utf-8").splitlines():
        meaning, _, text = line.partition("||")
        if text.strip():
            references[meaning.strip()].append(text.strip())
    meanings = sorted(references)
    random.Random(0).shuffle(meanings)
    cut = len(meanings) * 9 // 10
    TARGET.mkdir(parents=True, exist_ok=True)
    for name, group, per_mr in (("train", meanings[:cut], 3), ("eval", meanings[cut:], 1)):
        rows = [{"prompt": f"{m}\n", "completion": ref} for m in group for ref in references[m][:per_mr]]
        with open(TARGET / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{name}: {len(group)} meaning representations, {len(rows)} rows")


if __name__ == "__main__":
    main()
