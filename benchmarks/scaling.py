"""How step time and training memory grow with sequence length, batch size and LoRA rank.

For each setting, LoRA (all-linear, deltatune's trainer loss) and full fine-tuning take turns,
one step each per round (the order rotates), on an SFT batch whose first half is prompt. The
table gives median step times, tokens per second, and the memory of one step broken down
(deltatune.memory.measure_training_step: params, grads, AdamW state, saved activations), so a
user can see where each method's cost goes: LoRA's grows with tokens (activations), full
fine-tuning's is dominated by the optimizer until the sequence is long.

    python benchmarks/scaling.py                               # llama27M: seq 128..1024, batch 1..8, rank 4..64
    python benchmarks/scaling.py --quick                       # smoke run, numbers meaningless
    python benchmarks/scaling.py --seqs 128,256 --batches 4 --ranks 8 --rounds 3 --json scaling.json
    python benchmarks/scaling.py --device cuda --model smollm135M   # on a GPU: the same byte counts, CUDA step times
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

import deltatune as dt
from deltatune.losses import model_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_vs_peft import (ModelSpec, Trainee, cpu_training_memory, fresh, interleave, median_ratio,  # noqa: E402
                          model_specs, sft_batch)

SEED = 0


def trainee(kind: str, spec: ModelSpec, rank: int, device: str = "cpu") -> Trainee:
    model = fresh(spec, device)
    torch.manual_seed(SEED + 1)
    if kind == "lora":
        model = dt.wrap(model, dt.LoRA(rank=rank, alpha=2 * rank, targets="all-linear"))
    else:
        model = dt.wrap(model, dt.FullFineTuning())
    return Trainee(model.train(), model_loss)


def settings(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """(batch, seq, rank): every sequence length at the first batch and rank, then the other batches and ranks."""
    seqs, batches, ranks = ([int(x) for x in text.split(",")] for text in (args.seqs, args.batches, args.ranks))
    chosen = [(batches[0], seq, ranks[0]) for seq in seqs]
    chosen += [(batch, seqs[0], ranks[0]) for batch in batches[1:]]
    chosen += [(batches[0], seqs[0], rank) for rank in ranks[1:]]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama27M", choices=["stories260K", "llama27M", "smollm135M"])
    parser.add_argument("--seqs", default="128,256,512,1024")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--ranks", default="8,4,16,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: seq 32,64, batch 1,2, rank 8,16, 1 round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.seqs, args.batches, args.ranks, args.rounds = "32,64", "1,2", "8,16", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.set_verbosity_error()
    spec = model_specs()[args.model]
    device = args.device
    print(f"# {args.model} on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.rounds} interleaved rounds per setting"
          + (" (--quick: meaningless)" if args.quick else ""))
    rows = []
    for batch_size, seq, rank in settings(args):
        args.batch, args.seq, args.prompt_fraction = batch_size, seq, 0.5
        batch = sft_batch(spec, args)
        pair = {kind: trainee(kind, spec, rank, device) for kind in ("lora", "full")}
        memory = {kind: cpu_training_memory(t, batch) for kind, t in pair.items()}  # also the warm-up step
        times = interleave({kind: (lambda t=t: t.step(batch)) for kind, t in pair.items()}, args.rounds, device)
        del pair
        row = {"batch": batch_size, "seq": seq, "rank": rank, "memory_bytes": memory, "raw_step_times_s": times,
               "step_s": {k: statistics.median(v) for k, v in times.items()},
               "ratio_lora_full": median_ratio(times["lora"], times["full"])}
        rows.append(row)
        print(f"  batch {batch_size} seq {seq} rank {rank}: lora {row['step_s']['lora'] * 1e3:.0f} ms, "
              f"full {row['step_s']['full'] * 1e3:.0f} ms, lora/full {row['ratio_lora_full']:.3f}", flush=True)
    mib = lambda n: f"{n / 2**20:.0f}"
    print("\n| batch × seq | rank | LoRA step ms | LoRA tokens/s | full step ms | LoRA/full time "
          "| LoRA MiB (params+grads+AdamW / activations) | full MiB (params+grads+AdamW / activations) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = []
        for kind in ("lora", "full"):
            m = r["memory_bytes"][kind]
            cells.append(f"{mib(m['parameters'] + m['gradients'] + m['optimizer_state'])} / {mib(m['activations'])}")
        print(f"| {r['batch']} × {r['seq']} | {r['rank']} | {r['step_s']['lora'] * 1e3:.0f} "
              f"| {r['batch'] * r['seq'] / r['step_s']['lora']:.0f} | {r['step_s']['full'] * 1e3:.0f} "
              f"| {r['ratio_lora_full']:.3f} | {cells[0]} | {cells[1]} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
