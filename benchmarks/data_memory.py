"""Peak memory of reading and tokenizing a training file, against the file's size.

    python benchmarks/data_memory.py                 # 50 MB and 500 MB JSONL files
    python benchmarks/data_memory.py --sizes 5 --quick

Writes JSONL files of the given sizes (MB) by repeating the bundled E2E records into a temporary
folder, then, in a fresh process per file, runs what ``deltatune train`` runs on its data
(``runner.tokenized_data``: read one record at a time, tokenize with the bundled stories260K
tokenizer, append to a ``TokenStore``) and reports how far the process's peak resident memory
rose above where it stood before the data was read. For contrast, the smallest file is also
tokenized into in-memory lists (when it is at most 100 MB) (``data.tokenize_examples``, what training held before).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from deltatune.pretrained import bundled

MODEL = str(bundled("stories260K"))
WORKER = textwrap.dedent("""
    import json, resource, sys, time
    from deltatune.config import build_run
    from deltatune.data import iter_examples, tokenize_examples
    from deltatune.pretrained import load_tokenizer
    from deltatune.runner import tokenized_data
    model, data, how = sys.argv[1:4]
    run = build_run({"model": model, "data": data, "output": data + ".out", "method": "lora", "eval_fraction": 0.01})
    tokenizer = load_tokenizer(model, False)
    tokenizer("warm up")
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    if how == "store":
        train, held_out = tokenized_data(run, tokenizer)
        examples, tokens = len(train) + len(held_out), int(train.lengths().sum() + held_out.lengths().sum())
    else:
        items = tokenize_examples(iter_examples(data), tokenizer, run.train.max_length)
        examples, tokens = len(items), sum(len(item["input_ids"]) for item in items)
    print(json.dumps({"grown_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                      "examples": examples, "tokens": tokens, "seconds": time.perf_counter() - started}))
""")


def write_file(path: Path, megabytes: float) -> int:
    lines = [line for line in bundled("e2e/train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    size = 0
    with path.open("w", encoding="utf-8") as file:
        while size < megabytes * 1e6:
            for line in lines:
                file.write(line + "\n")
                size += len(line.encode()) + 1
    return size


def measure(path: Path, how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, MODEL, str(path), how], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50,500", help="file sizes in MB, comma-separated")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 MB, no in-memory contrast")
    args = parser.parse_args()
    sizes = [1.0] if args.quick else [float(size) for size in args.sizes.split(",")]
    print(f"{'file MB':>8} {'how':>10} {'examples':>10} {'tokens':>12} {'peak RSS rise MiB':>18} {'s':>7}")
    with tempfile.TemporaryDirectory(prefix="deltatune-data-memory-") as folder:
        for index, megabytes in enumerate(sizes):
            path = Path(folder) / f"data-{megabytes:g}MB.jsonl"
            real = write_file(path, megabytes)
            hows = ["store"] + (["lists"] if index == 0 and megabytes <= 100 and not args.quick else [])
            for how in hows:
                started = time.perf_counter()
                row = measure(path, how)
                print(f"{real / 1e6:8.1f} {how:>10} {row['examples']:10,} {row['tokens']:12,} "
                      f"{row['grown_mib']:18.1f} {time.perf_counter() - started:7.0f}", flush=True)
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
