"""deltatune LoRA vs peft LoRA vs full fine-tuning: step time, training memory, merged inference.

Everything runs in ONE process and INTERLEAVED: each round takes one timed step of every
variant (the order rotates from round to round), so a noisy machine slows all variants alike.
Reported figures are MEDIANS over rounds of PER-ROUND RATIOS (and medians of raw times).

    python benchmarks/lora_vs_peft.py                     # full run, CPU (~3 min on 2 idle cores)
    python benchmarks/lora_vs_peft.py --quick             # smoke run (~10 s), numbers meaningless
    python benchmarks/lora_vs_peft.py --device cuda --json bench.json
    python benchmarks/lora_vs_peft.py --profile 3         # + torch.profiler tables, dt vs peft
    python benchmarks/lora_vs_peft.py --models llama27M --prompt-fraction 0.5 --targets all-linear  # SFT batch
    python benchmarks/lora_vs_peft.py --models smollm135M --batch 4 --seq 256 --prompt-fraction 0.5 \
        --targets all-linear --skip-full --no-inference --rounds 6

What is measured
- step time: zero_grad + forward + loss + backward + AdamW.step, fp32. "dt" computes the loss as
  deltatune's trainer does (deltatune.losses.model_loss: logits only where labels are set, in
  chunks); "dt plain-loss" is the same model with model(**batch).loss, as peft and full FT use.
  With --prompt-fraction F the first F of each row is prompt (labels -100), as in SFT.
  --unfused adds "dt-unfused": dt with DELTATUNE_FUSED_MLP=0, each gated MLP run op by op (what
  deltatune did before its fused gated MLP), so the two compare within one process.
- frozen-base limit: the same model with no trainable parameter at all; its input embeddings
  require grad, so the backward runs through every layer and computes no weight gradient
  (model(**batch).loss, no optimizer). LoRA cannot be cheaper than this without skipping work.
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
from deltatune.losses import model_loss
from deltatune.methods import gated_mlp
from deltatune.memory import PeakMemory, measure_training_step
from deltatune.pretrained import bundled

try:
    import peft
except ImportError:  # a benchmark against peft needs peft
    sys.exit("This benchmark compares against peft; install it with: pip install -e '.[bench]'")

STORIES = bundled("stories260K")  # the package's own copy of ../shared/models/stories260K
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


def smollm_135m_shape() -> LlamaForCausalLM:
    """A Llama with SmolLM2-135M's shape (random weights: no download): 134.5M parameters."""
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, head_dim=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def stories_260k() -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(STORIES)


def model_specs() -> dict[str, ModelSpec]:
    """The benchmark models by name (stories260K gets 5x the rounds: its steps are short)."""
    return {"stories260K": ModelSpec("stories260K", stories_260k, 512, rounds_factor=5),
            "llama27M": ModelSpec("llama27M", llama_27m, 8000),
            "smollm135M": ModelSpec("smollm135M", smollm_135m_shape, 49152)}


def fresh(spec: ModelSpec, device: str) -> LlamaForCausalLM:
    """A new copy of the model with the same weights every time (same seed, same file)."""
    torch.manual_seed(SEED)
    return spec.build().to(device)


def make_variant(kind: str, spec: ModelSpec, targets: str | list[str] | None, device: str) -> torch.nn.Module:
    model = fresh(spec, device)
    torch.manual_seed(SEED + 1)
    if kind == "frozen":
        model.requires_grad_(False)
    elif kind.startswith("dt"):
        model = dt.wrap(model, dt.LoRA(rank=RANK, alpha=ALPHA, targets=targets, dropout=DROPOUT))
    elif kind == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                                           lora_dropout=DROPOUT))
    return model.to(device).train()


def plain_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def unfused_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The trainer's loss with the fused gated MLP switched off (the forward decides; the backward follows)."""
    before = os.environ.get(gated_mlp.SWITCH)
    os.environ[gated_mlp.SWITCH] = "0"
    try:
        return model_loss(model, batch)
    finally:
        if before is None:
            del os.environ[gated_mlp.SWITCH]
        else:
            os.environ[gated_mlp.SWITCH] = before


def frozen_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen-base limit: embeddings that require grad, so backward crosses every layer."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    return model(inputs_embeds=embeds, labels=batch["labels"]).loss


class Trainee:
    """One model under training and its AdamW, which sees only the trainable parameters."""

    def __init__(self, model: torch.nn.Module, loss=plain_loss) -> None:
        self.model = model
        self.loss = loss
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=LR)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward(batch)
        self.optimizer.step()

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> None:
        self.loss(self.model, batch).backward()


def sft_batch(spec: "ModelSpec", args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Random ids; the first ``--prompt-fraction`` of every row is prompt (label -100)."""
    torch.manual_seed(SEED)
    ids = torch.randint(0, spec.vocab, (args.batch, args.seq), device=args.device)
    labels = ids.clone()
    labels[:, :int(args.seq * args.prompt_fraction)] = -100
    return {"input_ids": ids, "labels": labels}


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
def cpu_training_memory(trainee: Trainee, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Deterministic byte count for one step: params + grads + optimizer state + saved activations."""
    breakdown = measure_training_step(trainee.model, trainee.optimizer, lambda: trainee.forward_backward(batch))
    return breakdown.to_dict()


def make_trainee(kind: str, spec: ModelSpec, targets, device: str) -> Trainee:
    loss = {"dt": model_loss, "dt-unfused": unfused_loss, "frozen": frozen_loss}.get(kind, plain_loss)
    return Trainee(make_variant(kind, spec, targets, device), loss)


def cuda_training_memory(kind: str, spec: ModelSpec, targets, batch: dict[str, torch.Tensor],
                         device: str) -> dict[str, int]:
    """Peak allocated bytes over one step (after a warm-up step), with only this model resident."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    trainee = make_trainee(kind, spec, targets, device)
    trainee.step(batch)  # AdamW state now exists
    sync(device)
    peak_memory = PeakMemory(device)  # resets the peak
    trainee.step(batch)
    sync(device)
    peak = peak_memory.peak_bytes() - before
    del trainee
    gc.collect()
    torch.cuda.empty_cache()
    return {"total": peak}


# --- one model -----------------------------------------------------------------------------
def variant_labels(args: argparse.Namespace) -> list[str]:
    """"full", "frozen", then per target: "dt T", "dt-unfused T" (--unfused), "dt-plain T" (all-linear only),
    "peft T"."""
    labels = ([] if args.skip_full else ["full"]) + ["frozen"]
    for tname in chosen_targets(args):
        labels += ([f"dt {tname}"] + ([f"dt-unfused {tname}"] if args.unfused else [])
                   + ([f"dt-plain {tname}"] if tname == "all-linear" else []) + [f"peft {tname}"])
    return labels


def chosen_targets(args: argparse.Namespace) -> list[str]:
    return list(TARGETS) if args.targets == "both" else [args.targets]


def bench_model(spec: ModelSpec, args: argparse.Namespace) -> list[dict]:
    device, rounds = args.device, args.rounds * spec.rounds_factor
    batch = sft_batch(spec, args)
    scored = int((batch["labels"][:, 1:] != -100).sum())

    trainees = {}
    for label in variant_labels(args):
        kind, _, tname = label.partition(" ")
        trainees[label] = make_trainee(kind, spec, TARGETS.get(tname), device)
    any_model = next(iter(trainees.values())).model
    n_params = sum(p.numel() for p in dict.fromkeys(any_model.parameters()))
    print(f"\n## {spec.name}: {n_params:,} parameters, batch {args.batch} x {args.seq} tokens "
          f"({scored} scored), device {device}, {rounds} rounds")

    counts = {label: dt.trainable_parameters(t.model)[0] for label, t in trainees.items()}
    for tname in chosen_targets(args):
        ours, theirs = counts[f"dt {tname}"], counts[f"peft {tname}"]
        assert ours == theirs, f"trainable parameters differ for {tname}: deltatune {ours:,} vs peft {theirs:,}"

    # warm-up (interleaved too), then the CPU memory count on one more step
    interleave({k: (lambda t=t: t.step(batch)) for k, t in trainees.items()}, args.warmup, device)
    memory = {}
    if device == "cpu":
        for label, trainee in trainees.items():
            memory[label] = cpu_training_memory(trainee, batch)

    step_times = interleave({k: (lambda t=t: t.step(batch)) for k, t in trainees.items()}, rounds, device)

    kept = {k: t.model for k, t in trainees.items() if k.startswith("dt ")}  # trained: merged below
    del trainees
    gc.collect()
    if device != "cpu":  # an isolated peak per variant, with the timing pool gone
        for label in variant_labels(args):
            kind, _, tname = label.partition(" ")
            memory[label] = cuda_training_memory(kind, spec, TARGETS.get(tname), batch, device)

    infer_times, max_diff = {}, {}
    if not args.no_inference:  # merged-model inference: base vs dt.merge(trained adapter) vs the wrapped model
        ids = batch["input_ids"]
        infer = {"base": fresh(spec, device).eval()}
        for tname in chosen_targets(args):
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
    for tname in chosen_targets(args):
        labels = {kind: f"{kind} {tname}" if kind.startswith(("dt", "peft")) else kind for kind in KINDS}
        labels = {kind: label for kind, label in labels.items() if label in step_times}
        times = {kind: step_times[label] for kind, label in labels.items()}
        ratios = {f"{a}/{b}": median_ratio(times[a], times[b]) for a, b in
                  (("dt", "peft"), ("dt", "frozen"), ("dt", "full"), ("dt-plain", "peft"), ("dt", "dt-plain"),
                   ("peft", "frozen"), ("dt", "dt-unfused"), ("dt-unfused", "peft")) if a in times and b in times}
        row = {
            "model": spec.name, "parameters": n_params, "targets": tname, "device": device,
            "batch": args.batch, "seq": args.seq, "prompt_fraction": args.prompt_fraction, "scored_tokens": scored,
            "rounds": rounds, "step_s": {k: med(v) for k, v in times.items()}, "ratios": ratios,
            "ratio_dt_peft": ratios["dt/peft"],
            "memory_bytes": {kind: memory[label] for kind, label in labels.items()},
            "trainable": {kind: counts[label] for kind, label in labels.items()},
            "raw_step_times_s": times,
        }
        if infer_times:
            row.update({
                "infer_s": {"base": med(infer_times["base"]), "merged": med(infer_times[f"merged {tname}"]),
                            "unmerged": med(infer_times[f"unmerged {tname}"])},
                "ratio_merged_base": median_ratio(infer_times[f"merged {tname}"], infer_times["base"]),
                "ratio_unmerged_base": median_ratio(infer_times[f"unmerged {tname}"], infer_times["base"]),
                "merged_vs_unmerged_max_abs_logit_diff": max_diff[tname],
                "raw_infer_times_s": {k: infer_times[k] for k in ("base", f"merged {tname}", f"unmerged {tname}")},
            })
        rows.append(row)
        shown = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row["step_s"].items())
        print(f"  {tname:>10}: step {shown} | " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return rows


# --- report --------------------------------------------------------------------------------
def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


KINDS = ("dt", "dt-unfused", "dt-plain", "peft", "frozen", "full")


def table(rows: list[dict], device: str) -> str:
    what = ("params+grads+optimizer+activations" if device == "cpu" else "torch.cuda.max_memory_allocated")
    kinds = [k for k in KINDS if k != "dt-unfused" or any(k in r["step_s"] for r in rows)]
    lines = [f"| model | targets | batch | step ms ({' / '.join(kinds)}) | dt/peft | dt/frozen | dt-plain/peft "
             f"| dt/full | memory MiB ({what}; {' / '.join(kinds)}) | dt/peft memory | merged/base infer |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = " / ".join(f"{r['step_s'][k] * 1e3:.0f}" if k in r["step_s"] else "-" for k in kinds)
        mem = " / ".join(mib(r["memory_bytes"][k]["total"]) if k in r["memory_bytes"] else "-" for k in kinds)
        ratio = lambda key: f"{r['ratios'][key]:.3f}" if key in r["ratios"] else "-"
        memory_ratio = r["memory_bytes"]["dt"]["total"] / r["memory_bytes"]["peft"]["total"]
        infer = f"{r['ratio_merged_base']:.3f}" if "ratio_merged_base" in r else "-"
        lines.append(f"| {r['model']} | {r['targets']} | {r['batch']}x{r['seq']}, prompt {r['prompt_fraction']:g} "
                     f"| {step} | {ratio('dt/peft')} | {ratio('dt/frozen')} | {ratio('dt-plain/peft')} "
                     f"| {ratio('dt/full')} | {mem} | {memory_ratio:.3f} | {infer} |")
    return "\n".join(lines)


def memory_breakdown(rows: list[dict]) -> str:
    lines = ["| model | variant | params | grads | AdamW state | saved activations | total (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    entries = {}  # (model, variant) -> figures; full FT and frozen are shared by a model's rows
    for r in rows:
        for kind, m in r["memory_bytes"].items():
            label = kind if kind in ("full", "frozen") else f"{kind} {r['targets']}"
            entries[(r["model"], label)] = m
    for (model, label), m in entries.items():
        lines.append(f"| {model} | {label} | {mib(m['parameters'])} | {mib(m['gradients'])} | "
                     f"{mib(m['optimizer_state'])} | {mib(m['activations'])} | {mib(m['total'])} |")
    return "\n".join(lines)


# --- profile -------------------------------------------------------------------------------
def profile(spec: ModelSpec, args: argparse.Namespace) -> None:
    """torch.profiler over a few steps of dt and peft (all-linear): where the time goes."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    batch = sft_batch(spec, args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    for kind in ("dt", "dt-plain", "peft"):
        trainee = make_trainee(kind, spec, "all-linear", args.device)
        for _ in range(args.warmup):
            trainee.step(batch)
        with torch_profile(activities=activities) as prof:
            for _ in range(args.profile):
                trainee.step(batch)
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
    parser.add_argument("--models", default="stories260K,llama27M",
                        help="comma-separated: stories260K, llama27M, smollm135M (SmolLM2-135M's shape, random weights)")
    parser.add_argument("--prompt-fraction", type=float, default=0.0,
                        help="first fraction of every row is prompt, label -100 (default 0: every token scored)")
    parser.add_argument("--targets", default="both", choices=["both", *TARGETS], help="LoRA targets to run")
    parser.add_argument("--skip-full", action="store_true", help="leave full fine-tuning out (large models)")
    parser.add_argument("--unfused", action="store_true",
                        help="also run dt with DELTATUNE_FUSED_MLP=0 (gated MLPs op by op) as variant dt-unfused")
    parser.add_argument("--no-inference", action="store_true", help="leave the merged-inference timing out")
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
        args.prompt_fraction = args.prompt_fraction or 0.5
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no CUDA device.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    specs = model_specs()
    chosen = []
    for name in args.models.split(","):
        if name not in specs:
            sys.exit(f"Unknown model {name!r}; choose from {', '.join(specs)}.")
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
          "unmerged = the wrapped model. dt = deltatune with its trainer's loss (label-only logits), dt-plain = "
          "deltatune with model(**batch).loss, dt-unfused = dt with DELTATUNE_FUSED_MLP=0 (--unfused), frozen = the "
          "frozen-base limit. Ratios: medians of per-round ratios.\n")
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
