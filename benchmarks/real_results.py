"""The README's real results: `deltatune compare` on the real data in ../shared/data.

Makes a seeded held-out split (recorded in the output folder), then runs ``deltatune compare``:

    python benchmarks/real_results.py sst2 --model MINILM_FOLDER          # all-MiniLM-L6-v2, every method
    python benchmarks/real_results.py e2e --model SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/real_results.py advertisegen --model SmolLM2-135M-Instruct.Q4_1.gguf

- ``sst2``: train on ../shared/data/sst2/train.tsv; hold out 500 seeded rows of dev.tsv.
- ``e2e``: split ../shared/data/e2e/valid.txt by meaning representation (no MR in both halves),
  10% of the MRs held out; BLEU and ROUGE-L are multi-reference over each MR's texts.
- ``advertisegen``: split ../shared/data/advertisegen/dev.json 90/10; ROUGE-L over characters.

Any further arguments go to ``deltatune compare`` (e.g. ``--max-steps 200 --methods lora,full``).
The models come from PyPI wheels (see ../shared/README.md); this script downloads nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SEED = 0
TASKS = {
    "sst2": {"methods": "full,freeze,lora,qlora,adapter,prefix,prompt,ptuning,ptuning-v2",
             "settings": ["task=classification", "batch_size=16", "max_length=64"], "steps": 150, "eval": 500},
    "e2e": {"methods": "full,freeze,lora,qlora,adapter,prefix,prompt,ptuning,ptuning-v2",
            "settings": ["batch_size=8", "max_length=128"], "steps": 100, "eval": 48},
    "advertisegen": {"methods": "full,lora,qlora,prefix,ptuning-v2,prompt",
                     "settings": ["batch_size=4", "max_length=256"], "steps": 100, "eval": 32},
}


def split_sst2(folder: Path) -> tuple[Path, Path]:
    rows = (SHARED / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    header, body = rows[0], rows[1:]
    random.Random(SEED).shuffle(body)
    held_out = folder / "sst2-heldout.tsv"
    held_out.write_text("\n".join([header, *body[:500]]) + "\n", encoding="utf-8")
    return SHARED / "sst2" / "train.tsv", held_out


def split_e2e(folder: Path) -> tuple[Path, Path]:
    lines = [line for line in (SHARED / "e2e" / "valid.txt").read_text(encoding="utf-8").splitlines() if "||" in line]
    meanings = sorted({line.split("||")[0] for line in lines})
    random.Random(SEED).shuffle(meanings)
    held = set(meanings[: len(meanings) // 10])
    train, held_out = folder / "e2e-train.txt", folder / "e2e-heldout.txt"
    train.write_text("\n".join(line for line in lines if line.split("||")[0] not in held) + "\n", encoding="utf-8")
    held_out.write_text("\n".join(line for line in lines if line.split("||")[0] in held) + "\n", encoding="utf-8")
    return train, held_out


def split_advertisegen(folder: Path) -> tuple[Path, Path]:
    records = [line for line in (SHARED / "advertisegen" / "dev.json").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    random.Random(SEED).shuffle(records)
    cut = len(records) // 10
    train, held_out = folder / "advertisegen-train.jsonl", folder / "advertisegen-heldout.jsonl"
    train.write_text("\n".join(records[cut:]) + "\n", encoding="utf-8")
    held_out.write_text("\n".join(records[:cut]) + "\n", encoding="utf-8")
    return train, held_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--model", required=True, help="a model folder or a .gguf file")
    parser.add_argument("--output", help="default: runs/real-<task>")
    args, rest = parser.parse_known_args()
    if not SHARED.is_dir():
        print(f"{SHARED} is not present: these results need ../shared/data", file=sys.stderr)
        return 2
    spec = TASKS[args.task]
    output = Path(args.output or f"runs/real-{args.task}")
    data_folder = output.parent / f"{output.name}-data"
    data_folder.mkdir(parents=True, exist_ok=True)
    train, held_out = {"sst2": split_sst2, "e2e": split_e2e, "advertisegen": split_advertisegen}[args.task](data_folder)
    (data_folder / "split.json").write_text(json.dumps({"seed": SEED, "train": str(train), "held_out": str(held_out)}))
    command = [sys.executable, "-m", "deltatune.cli", "compare", "--model", args.model, "--data", str(train),
               "--eval-data", str(held_out), "--output", str(output), "--methods", spec["methods"],
               "--max-steps", str(spec["steps"]), "--eval-examples", str(spec["eval"])]
    options = [arg for arg in rest if "=" not in arg or arg.startswith("--")]  # later flags win
    command += [*options, *spec["settings"], *(arg for arg in rest if arg not in options)]  # so do later key=value
    print(" ".join(command), flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
