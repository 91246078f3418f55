"""deltatune LoRA vs peft LoRA vs full fine-tuning: step time, training memory, merged inference.

Everything runs in ONE process and INTERLEAVED: each round takes one timed step of every
variant (the order rotates from round to round), so a noisy machine slows all variants alike.
Reported figures are MEDIANS over rounds of PER-ROUND RATIOS (and medians of raw times).

    python benchmarks/lora_vs_peft.py                     # full run, CPU (~3 min on 2 idle cores)
    python benchmarks/lora_vs_peft.py --quick             # smoke run (~10 s), numbers meaningless
    python benchmarks/lora_vs_peft.py --device cuda --json bench.json
    python benchmarks/lora_vs_peft.py --profile 3         # + torch.profiler tables, dt vs peft

What is measured
- step time: zero_grad + forward (with labels, so the HF loss) + backward + AdamW.step, fp32.
- training memory, CPU: deltatune.memory.measure_training_step, a deterministic count for one
  step = parameter bytes + gradient bytes + AdamW state bytes + bytes of the tensors autograd
  saves for backward (each storage once, storages of parameters excluded). It is not the
  process RSS. CUDA: torch.cuda.max_memory_allocated over one step with only that model
  resident (deltatune.memory.PeakMemory).
- inference: eval-mode forward (no KV cache) of the merged model (dt.merge of the trained
  all-linear / q,v adapter) vs the untouched base model, and the unmerged wrapped model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import deltatune as dt
from deltatune.memory import PeakMemory, measure_training_step

try:
    import peft
except ImportError:  # a benchmark against peft needs peft
    sys.exit("This benchmark compares against peft; install it with: pip install -e '.[bench]'")

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"  # ../shared next to the repository
TARGETS = {"all-linear": "all-linear", "q,v": ["q_proj", "v_proj"]}
RANK, ALPHA, LR, SEED = 8, 16, 1e-4, 0
DROPOUT = 0.0  # set by --dropout


# --- models and variants -------------------------------------------------------------------
@dataclass
class ModelSpec:
    name: str
    build: Callable[[], LlamaForCausalLM]
    vocab: int
    rounds_factor: int = 1  # a tiny model's step is cheap and noisy: give it more rounds


def llama_27m() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1376, vocab_size=8000, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def stories_260k() -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(STORIES)


def fresh(spec: ModelSpec, device: str) -> LlamaForCausalLM:
    """A new copy of the model with the same weights every time (same seed, same file)."""
    torch.manual_seed(SEED)
    return spec.build().to(device)


def make_variant(kind: str, spec: ModelSpec, targets: str | list[str] | None, device: str) -> torch.nn.Module:
    model = fresh(spec, device)
    torch.manual_seed(SEED + 1)
    if kind == "dt":
        model = dt.wrap(model, dt.LoRA(rank=RANK, alpha=ALPHA, targets=targets, dropout=DROPOUT))
    elif kind == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                                           lora_dropout=DROPOUT))
    return model.to(device).train()


class Trainee:
    """One model under training and its AdamW, which sees only the trainable parameters."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(self, ids: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward(ids)
        self.optimizer.step()

    def forward_backward(self, ids: torch.Tensor) -> None:
        self.model(input_ids=ids, labels=ids).loss.backward()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleave(runners: dict[str, Callable[[], None]], rounds: int, device: str) -> dict[str, list[float]]:
    """Time every runner once per round; round r starts at runner r (mod n) so none is always first."""
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(runners[name], device))
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


# --- memory (counted and measured by deltatune.memory) -------------------------------------
def cpu_training_memory(trainee: Trainee, ids: torch.Tensor) -> dict[str, int]:
    """Deterministic byte count for one step: params + grads + optimizer state + saved activations."""
    breakdown = measure_training_step(trainee.model, trainee.optimizer, lambda: trainee.forward_backward(ids))
    return breakdown.to_dict()


def cuda_training_memory(kind: str, spec: ModelSpec, targets, ids: torch.Tensor, device: str) -> dict[str, int]:
    """Peak allocated bytes over one step (after a warm-up step), with only this model resident."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    trainee = Trainee(make_variant(kind, spec, targets, device))
    trainee.step(ids)  # AdamW state now exists
    sync(device)
    peak_memory = PeakMemory(device)  # resets the peak
    trainee.step(ids)
    sync(device)
    peak = peak_memory.peak_bytes() - before
    del trainee
    gc.collect()
    torch.cuda.empty_cache()
    return {"total": peak}


# --- one model -----------------------------------------------------------------------------
def bench_model(spec: ModelSpec, args: argparse.Namespace) -> list[dict]:
    device, rounds = args.device, args.rounds * spec.rounds_factor
    torch.manual_seed(SEED)
    ids = torch.randint(0, spec.vocab, (args.batch, args.seq), device=device)

    trainees = {"full": Trainee(make_variant("full", spec, None, device))}
    for tname, targets in TARGETS.items():
        for kind in ("dt", "peft"):
            trainees[f"{kind} {tname}"] = Trainee(make_variant(kind, spec, targets, device))
    n_params = sum(p.numel() for p in dict.fromkeys(trainees["full"].model.parameters()))
    print(f"\n## {spec.name}: {n_params:,} parameters, batch {args.batch} x {args.seq} tokens, device {device}, "
          f"{rounds} rounds")

    counts = {}
    for label, trainee in trainees.items():
        counts[label] = dt.trainable_parameters(trainee.model)[0]
    for tname in TARGETS:
        ours, theirs = counts[f"dt {tname}"], counts[f"peft {tname}"]
        assert ours == theirs, f"trainable parameters differ for {tname}: deltatune {ours:,} vs peft {theirs:,}"

    # warm-up (interleaved too), then the CPU memory count on one more step
    interleave({k: (lambda t=t: t.step(ids)) for k, t in trainees.items()}, args.warmup, device)
    memory = {}
    if device == "cpu":
        for label, trainee in trainees.items():
            memory[label] = cpu_training_memory(trainee, ids)

    step_times = interleave({k: (lambda t=t: t.step(ids)) for k, t in trainees.items()}, rounds, device)

    kept = {k: t.model for k, t in trainees.items() if k.startswith("dt ")}  # trained: merged below
    del trainees
    gc.collect()
    if device != "cpu":  # an isolated peak per variant, with the timing pool gone
        for label in ["full"] + [f"{kind} {t}" for t in TARGETS for kind in ("dt", "peft")]:
            kind, _, tname = label.partition(" ")
            memory[label] = cuda_training_memory(kind, spec, TARGETS.get(tname), ids, device)

    # merged-model inference: base vs dt.merge(trained adapter) vs the wrapped model itself
    base = fresh(spec, device).eval()
    infer = {"base": base}
    max_diff = {}
    for tname in TARGETS:
        wrapped = kept[f"dt {tname}"].eval()
        merged = dt.merge(copy.deepcopy(wrapped)).eval()
        with torch.inference_mode():
            max_diff[tname] = (merged(input_ids=ids).logits - wrapped(input_ids=ids).logits).abs().max().item()
        infer[f"merged {tname}"], infer[f"unmerged {tname}"] = merged, wrapped

    def forward(model):
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    interleave({k: (lambda m=m: forward(m)) for k, m in infer.items()}, args.warmup, device)
    infer_times = interleave({k: (lambda m=m: forward(m)) for k, m in infer.items()}, rounds, device)

    rows = []
    med = statistics.median
    for tname in TARGETS:
        d, p, f = step_times[f"dt {tname}"], step_times[f"peft {tname}"], step_times["full"]
        rows.append({
            "model": spec.name, "parameters": n_params, "targets": tname, "device": device,
            "batch": args.batch, "seq": args.seq, "rounds": rounds,
            "step_s": {"dt": med(d), "peft": med(p), "full": med(f)},
            "ratio_dt_peft": median_ratio(d, p), "ratio_dt_full": median_ratio(d, f),
            "memory_bytes": {k: memory[lbl] for k, lbl in (("dt", f"dt {tname}"), ("peft", f"peft {tname}"),
                                                             ("full", "full"))},
            "trainable": {"dt": counts[f"dt {tname}"], "peft": counts[f"peft {tname}"], "full": counts["full"]},
            "infer_s": {"base": med(infer_times["base"]), "merged": med(infer_times[f"merged {tname}"]),
                        "unmerged": med(infer_times[f"unmerged {tname}"])},
            "ratio_merged_base": median_ratio(infer_times[f"merged {tname}"], infer_times["base"]),
            "ratio_unmerged_base": median_ratio(infer_times[f"unmerged {tname}"], infer_times["base"]),
            "merged_vs_unmerged_max_abs_logit_diff": max_diff[tname],
            "raw_step_times_s": {"dt": d, "peft": p, "full": f},
            "raw_infer_times_s": {k: infer_times[k] for k in ("base", f"merged {tname}", f"unmerged {tname}")},
        })
        r = rows[-1]
        print(f"  {tname:>10}: step dt {r['step_s']['dt']*1e3:.1f} ms, peft {r['step_s']['peft']*1e3:.1f} ms, "
              f"full {r['step_s']['full']*1e3:.1f} ms | dt/peft {r['ratio_dt_peft']:.3f}, "
              f"dt/full {r['ratio_dt_full']:.3f} | merged/base {r['ratio_merged_base']:.3f}, "
              f"unmerged/base {r['ratio_unmerged_base']:.3f} | merged-vs-unmerged max |dlogit| {max_diff[tname]:.1e}")
    return rows


# --- report --------------------------------------------------------------------------------
def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[dict], device: str) -> str:
    what = ("params+grads+optimizer+activations, MiB" if device == "cpu"
            else "torch.cuda.max_memory_allocated, MiB")
    lines = [
        f"| model | targets | dt step (ms) | peft step (ms) | dt/peft | full-FT step (ms) | dt/full "
        f"| memory dt / peft / full ({what}) | trainable dt / peft | merged/base infer | unmerged/base infer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["memory_bytes"]
        lines.append(
            f"| {r['model']} | {r['targets']} | {r['step_s']['dt']*1e3:.1f} | {r['step_s']['peft']*1e3:.1f} "
            f"| {r['ratio_dt_peft']:.3f} | {r['step_s']['full']*1e3:.1f} | {r['ratio_dt_full']:.3f} "
            f"| {mib(m['dt']['total'])} / {mib(m['peft']['total'])} / {mib(m['full']['total'])} "
            f"| {r['trainable']['dt']:,} / {r['trainable']['peft']:,} "
            f"| {r['ratio_merged_base']:.3f} | {r['ratio_unmerged_base']:.3f} |")
    return "\n".join(lines)


def memory_breakdown(rows: list[dict]) -> str:
    lines = ["| model | variant | params | grads | AdamW state | saved activations | total (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    entries = {}  # (model, variant) -> figures; full FT is shared by a model's rows
    for r in rows:
        for kind in ("dt", "peft", "full"):
            label = "full FT" if kind == "full" else f"{kind} {r['targets']}"
            entries[(r["model"], label)] = r["memory_bytes"][kind]
    for (model, label), m in entries.items():
        lines.append(f"| {model} | {label} | {mib(m['parameters'])} | {mib(m['gradients'])} | "
                     f"{mib(m['optimizer_state'])} | {mib(m['activations'])} | {mib(m['total'])} |")
    return "\n".join(lines)


# --- profile -------------------------------------------------------------------------------
def profile(spec: ModelSpec, args: argparse.Namespace) -> None:
    """torch.profiler over a few steps of dt and peft (all-linear): where the time goes."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.manual_seed(SEED)
    ids = torch.randint(0, spec.vocab, (args.batch, args.seq), device=args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    for kind in ("dt", "peft"):
        trainee = Trainee(make_variant(kind, spec, "all-linear", args.device))
        for _ in range(args.warmup):
            trainee.step(ids)
        with torch_profile(activities=activities) as prof:
            for _ in range(args.profile):
                trainee.step(ids)
                sync(args.device)
        print(f"\n### profile: {kind}, {spec.name}, all-linear, {args.profile} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        del trainee
        gc.collect()


# --- main ----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20,
                        help="timed interleaved rounds (default 20; stories260K gets 5x as many)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout for both libraries (default 0)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--models", default="stories260K,llama27M", help="comma-separated: stories260K, llama27M")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 warm-up, batch 2 x 32")
    parser.add_argument("--json", type=Path, help="write every figure (and raw per-round times) here")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS steps of dt and peft on each model (all-linear)")
    args = parser.parse_args()
    global DROPOUT
    DROPOUT = args.dropout
    if args.quick:
        args.rounds, args.warmup, args.batch, args.seq = 2, 1, 2, 32
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no CUDA device.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    specs = {"stories260K": ModelSpec("stories260K", stories_260k, 512, rounds_factor=5),
             "llama27M": ModelSpec("llama27M", llama_27m, 8000)}
    chosen = []
    for name in args.models.split(","):
        if name not in specs:
            sys.exit(f"Unknown model {name!r}; choose from {', '.join(specs)}.")
        if name == "stories260K" and not (STORIES / "config.json").exists():
            print(f"Skipping stories260K: no model at {STORIES}.")
            continue
        chosen.append(specs[name])

    print(f"# deltatune {dt.__version__} vs peft {peft.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"LoRA rank {RANK}, alpha {ALPHA}, dropout {DROPOUT}, fp32, AdamW lr {LR}; {args.rounds} interleaved rounds "
          f"(x5 for stories260K) after {args.warmup} warm-up steps; figures are medians of per-round ratios.")
    if args.quick:
        print("--quick: a smoke run; the numbers are not meaningful.")
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.2f} on {os.cpu_count()} CPUs")
    if load > (os.cpu_count() or 1) - 0.5:
        print("WARNING: the machine is busy. With as many torch threads as cores, other processes make every\n"
              "parallel op wait for a descheduled thread (tiny models slow down up to 100x); rerun when idle\n"
              "or pass --threads 1.")

    start = time.perf_counter()
    rows = []
    for spec in chosen:
        rows += bench_model(spec, args)

    memory_what = ("CPU training memory = params + grads + AdamW state + tensors saved for backward "
                   "(deterministic byte count of one step; each storage once; not RSS)"
                   if args.device == "cpu" else "CUDA training memory = torch.cuda.max_memory_allocated over one step, "
                   "only that model resident")
    print(f"\n{memory_what}. Inference: eval forward, no KV cache; merged = dt.merge(trained adapter), "
          "unmerged = the wrapped model.\n")
    print(table(rows, args.device))
    if args.device == "cpu":
        print("\nMemory breakdown (MiB):\n")
        print(memory_breakdown(rows))
    print(f"\nwall time {time.perf_counter() - start:.0f} s; load average at end: {os.getloadavg()[0]:.2f}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "versions": {"deltatune": dt.__version__, "peft": peft.__version__, "torch": torch.__version__},
            "threads": torch.get_num_threads(), "load_average_end": os.getloadavg()[0],
            "args": {k: str(v) for k, v in vars(args).items()},
            "memory_measured": memory_what, "rows": rows,
        }, indent=2))
        print(f"wrote {args.json}")

    if args.profile:
        for spec in chosen:
            profile(spec, args)


if __name__ == "__main__":
    main()
