"""Prompt tuning, P-Tuning v1, prefix tuning and P-Tuning v2: deltatune vs peft's same method.

Step time and training memory on the same SFT batch, every variant in ONE process and
INTERLEAVED (the order rotates each round); figures are MEDIANS of PER-ROUND RATIOS.

    python benchmarks/prompt_vs_peft.py                   # llama27M, batch 8 x 128, half prompt
    python benchmarks/prompt_vs_peft.py --quick           # smoke run, numbers meaningless
    python benchmarks/prompt_vs_peft.py --models smollm135M --batch 4 --seq 256 --rounds 6
    python benchmarks/prompt_vs_peft.py --device cuda --json prompt.json

Each method runs three ways on a fresh copy of the same model: "dt" (deltatune, loss as its
trainer computes it: deltatune.losses.model_loss), "dt-plain" (deltatune, model(**batch).loss)
and "peft" (peft.get_peft_model with the config deltatune itself writes for that adapter, so the
settings are the same; model(**batch).loss). The script asserts equal trainable parameter counts.
Memory, CPU: deltatune.memory.measure_training_step (params + grads + AdamW state + tensors saved
for backward, a deterministic byte count); CUDA: max_memory_allocated over one step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

import deltatune as dt
from deltatune.losses import model_loss
from deltatune.memory import PeakMemory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_vs_peft import (ModelSpec, Trainee, cpu_training_memory, fresh, interleave, median_ratio,  # noqa: E402
                          model_specs, plain_loss, sft_batch, sync)

import peft  # noqa: E402  (lora_vs_peft has already said how to install it when it is missing)

LR, SEED = 1e-3, 0
METHODS = {
    "prompt tuning (20)": lambda: dt.PromptTuning(num_virtual_tokens=20),
    "P-Tuning v1 (20, MLP)": lambda: dt.PTuning(num_virtual_tokens=20),
    "prefix tuning (20, MLP 512)": lambda: dt.PrefixTuning(num_virtual_tokens=20),
    "P-Tuning v2 (64)": lambda: dt.PTuningV2(num_virtual_tokens=64),
}
KINDS = ("dt", "dt-plain", "peft")


def make_trainee(kind: str, method_name: str, spec: ModelSpec, device: str) -> Trainee:
    model = fresh(spec, device)
    torch.manual_seed(SEED + 1)
    method = METHODS[method_name]()
    if kind == "peft":
        saved = {k: v for k, v in method.peft_config(model).items() if not k.startswith("deltatune")}
        model = peft.get_peft_model(model, peft.get_peft_config({**saved, "task_type": "CAUSAL_LM"}))
    else:
        model = dt.wrap(model, method)
    trainee = Trainee(model.to(device).train(), model_loss if kind == "dt" else plain_loss)
    trainee.optimizer.param_groups[0]["lr"] = LR
    return trainee


def cuda_memory(kind: str, method_name: str, spec: ModelSpec, batch, device: str) -> dict[str, int]:
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    trainee = make_trainee(kind, method_name, spec, device)
    trainee.step(batch)
    sync(device)
    peak = PeakMemory(device)
    trainee.step(batch)
    sync(device)
    total = peak.peak_bytes() - before
    del trainee
    gc.collect()
    return {"total": total}


def bench(spec: ModelSpec, args: argparse.Namespace) -> list[dict]:
    batch = sft_batch(spec, args)
    trainees = {(m, k): make_trainee(k, m, spec, args.device) for m in METHODS for k in KINDS}
    config = trainees[(next(iter(METHODS)), "dt")].model.config
    grouped_query = getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)
    for method_name in METHODS:
        counts = {k: dt.trainable_parameters(trainees[(method_name, k)].model)[0] for k in KINDS}
        if counts["dt"] != counts["peft"] and method_name.startswith("prefix") and grouped_query:
            # peft's prefix MLP takes kv_heads × head_dim wide virtual embeddings, deltatune's hidden-wide ones
            print(f"  {method_name}: trainable parameters dt {counts['dt']:,}, peft {counts['peft']:,} (the MLP's "
                  "input width: hidden for deltatune, the key/value width for peft; the tables are the same size)")
            continue
        assert counts["dt"] == counts["peft"], f"{method_name}: trainable parameters differ: {counts}"
    runners = {f"{m} | {k}": (lambda t=t: t.step(batch)) for (m, k), t in trainees.items()}
    interleave(runners, args.warmup, args.device)
    memory = {}
    if args.device == "cpu":
        memory = {key: cpu_training_memory(t, batch) for key, t in trainees.items()}
    times = interleave(runners, args.rounds, args.device)
    del trainees, runners
    gc.collect()
    if args.device != "cpu":
        memory = {(m, k): cuda_memory(k, m, spec, batch, args.device) for m in METHODS for k in KINDS}

    rows = []
    for method_name in METHODS:
        t = {k: times[f"{method_name} | {k}"] for k in KINDS}
        m = {k: memory[(method_name, k)] for k in KINDS}
        rows.append({
            "model": spec.name, "method": method_name, "batch": args.batch, "seq": args.seq,
            "prompt_fraction": args.prompt_fraction, "rounds": args.rounds, "device": args.device,
            "step_s": {k: statistics.median(v) for k, v in t.items()},
            "ratio_dt_peft": median_ratio(t["dt"], t["peft"]),
            "ratio_dtplain_peft": median_ratio(t["dt-plain"], t["peft"]),
            "memory_bytes": m, "memory_ratio_dt_peft": m["dt"]["total"] / m["peft"]["total"],
            "raw_step_times_s": t,
        })
        r = rows[-1]
        print(f"  {method_name:>28}: step dt {r['step_s']['dt'] * 1e3:.0f} ms, dt-plain "
              f"{r['step_s']['dt-plain'] * 1e3:.0f} ms, peft {r['step_s']['peft'] * 1e3:.0f} ms | dt/peft "
              f"{r['ratio_dt_peft']:.3f}, dt-plain/peft {r['ratio_dtplain_peft']:.3f} | memory dt/peft "
              f"{r['memory_ratio_dt_peft']:.3f}")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | method | step ms dt / dt-plain / peft | dt/peft | dt-plain/peft "
             "| memory MiB dt / dt-plain / peft | dt/peft memory | saved activations MiB dt / peft |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = r["memory_bytes"]
        acts = (f"{mem['dt']['activations'] / 2**20:.1f} / {mem['peft']['activations'] / 2**20:.1f}"
                if "activations" in mem["dt"] else "-")
        lines.append(f"| {r['model']} {r['batch']}x{r['seq']} | {r['method']} | "
                     + " / ".join(f"{r['step_s'][k] * 1e3:.0f}" for k in KINDS)
                     + f" | {r['ratio_dt_peft']:.3f} | {r['ratio_dtplain_peft']:.3f} | "
                     + " / ".join(f"{mem[k]['total'] / 2**20:.1f}" for k in KINDS)
                     + f" | {r['memory_ratio_dt_peft']:.3f} | {acts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama27M", help="comma-separated: stories260K, llama27M, smollm135M")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prompt-fraction", type=float, default=0.5, help="first fraction of each row is prompt")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, batch 2 x 32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.batch, args.seq = 2, 1, 2, 32
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no CUDA device.")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.set_verbosity_error()
    specs = model_specs()
    print(f"# deltatune {dt.__version__} vs peft {peft.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"{args.rounds} interleaved rounds, medians of per-round ratios" + (" (--quick: meaningless)" if args.quick else ""))
    started, rows = time.perf_counter(), []
    for name in args.models.split(","):
        if name not in specs:
            sys.exit(f"Unknown model {name!r}; choose from {', '.join(specs)}.")
        print(f"\n## {name}, batch {args.batch} x {args.seq}, first {args.prompt_fraction:g} of each row prompt")
        rows += bench(specs[name], args)
    print("\n" + table(rows))
    print(f"\nwall time {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
