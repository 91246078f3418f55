"""Training throughput of 1 process vs W processes (DDP or FSDP2) on this machine, 1 thread each.

The same run through the real command line, so everything a user pays is in the figure:
``deltatune train`` on the bundled stories260K Llama and the bundled E2E data (LoRA, rank 8,
q/v), once as one process and once as ``deltatune train --nproc W`` (torchrun, gloo on CPU).
The global micro-batch is the same in both (``batch_size``), so both runs read the same examples
and compute the same updates; W processes each take batch_size / W of every micro-batch.

Each process has one thread (``OMP_NUM_THREADS=1``, which torchrun also sets), so W processes may
use W cores: the ratio says what a second core buys through DDP's gradient all-reduce, after its
communication. Figures: tokens per second over the training steps (the trainer's own
``tokens_per_s``: label and prompt tokens of every process, over the steps' wall time, evaluation
excluded by ``eval_every=0``), the median over ``--repeats`` alternating runs.

    python benchmarks/distributed_throughput.py --quick          # ~1 min: 12 steps, batch 8, one repeat
    python benchmarks/distributed_throughput.py                  # 40 steps, batch 16, three repeats
    python benchmarks/distributed_throughput.py --strategy fsdp --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from deltatune.pretrained import bundled


def run(nproc: int, folder: Path, args: argparse.Namespace) -> float:
    """tokens/s of one ``deltatune train`` run with ``nproc`` processes."""
    output = folder / f"run-{nproc}"
    command = [sys.executable, "-m", "deltatune", "train", "--model", str(bundled("stories260K")),
               "--data", str(bundled("e2e/train.jsonl")), "--output", str(output), "--overwrite", "--quiet",
               "--max-steps", str(args.steps), f"batch_size={args.batch_size}", "eval_every=0", "eval_fraction=0.01",
               "rank=8", "targets=[q_proj,v_proj]", f"strategy={args.strategy}", "log_every=1"]
    if nproc > 1:
        command[4:4] = ["--nproc", str(nproc)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "tokens_per_s" in line][-1]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 steps of batch 8, one repeat")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the parallel run (default 2)")
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.repeats = 12, 8, 1
    with tempfile.TemporaryDirectory() as scratch:
        figures: dict[int, list[float]] = {1: [], args.nproc: []}
        for _ in range(args.repeats):  # alternating, so machine noise falls on both
            for nproc in figures:
                figures[nproc].append(run(nproc, Path(scratch), args))
    single, parallel = (statistics.median(figures[n]) for n in figures)
    print(f"stories260K + LoRA (rank 8, q/v), global batch {args.batch_size}, {args.steps} steps, "
          f"1 thread per process, median of {args.repeats}:")
    print(f"  1 process                    {single:10,.0f} tokens/s")
    print(f"  {args.nproc} processes ({args.strategy}, gloo)     {parallel:10,.0f} tokens/s   "
          f"x{parallel / single:.2f}")
    print(json.dumps({"tokens_per_s": {str(n): values for n, values in figures.items()}}))


if __name__ == "__main__":
    main()
