"""A batch that mixes several LoRA adapters (one per example) against a batch on one adapter.

The model holds four all-linear rank-8 LoRA adapters with trained-looking values. Each round
times, in a rotating order, a forward pass without gradients (the prefill of serving) over one
batch of the same tokens:

    one adapter        set_adapter("a0"), no adapter_names: the plain path
    per-example, 1     adapter_names=["a0"] * batch: the per-example path, one adapter
    mixed 4            adapter_names cycling a0, a1, a2, a3
    mixed 2 + base     adapter_names cycling a0, a1, "__base__"

and also one decode step with the KV cache (batch × 1 new token after the batch's prefix), where
per-row work dominates. The table gives the median over rounds of each variant's time over the
one-adapter time of the same round. Goal (issue 10): mixed within 1.15× of one adapter.

    python benchmarks/mixed_adapters.py [--model llama27M|stories260K|smollm135M] [--batch 8] [--seq 128] [--rounds 10] [--device cuda]
    python benchmarks/mixed_adapters.py --quick      # smoke run: 2 rounds, numbers meaningless
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

import deltatune as dt
from decode_overhead import base_model  # the same models: stories260K, the 27M Llama, SmolLM2-135M's shape
from lora_vs_peft import sync

ADAPTERS = ("a0", "a1", "a2", "a3")


def four_adapters(name: str) -> torch.nn.Module:
    torch.manual_seed(1)
    model = dt.wrap(base_model(name), dt.LoRA(rank=8, targets="all-linear"), adapter_name=ADAPTERS[0])
    for adapter in ADAPTERS[1:]:
        model.add_adapter(adapter, dt.LoRA(rank=8, targets="all-linear"))
    with torch.no_grad():  # trained-looking values: small and non-zero
        for adapter in ADAPTERS:
            for param in model.adapter_parameters(adapter).values():
                param.copy_(torch.randn_like(param) * 0.02)
    model.set_adapter(ADAPTERS[0])
    return model.eval()


def choices(batch: int) -> dict[str, list[str] | None]:
    return {
        "one adapter": None,
        "per-example, 1 adapter": [ADAPTERS[0]] * batch,
        "mixed 4 adapters": [ADAPTERS[i % 4] for i in range(batch)],
        "mixed 2 + base": [(ADAPTERS[0], ADAPTERS[1], "__base__")[i % 3] for i in range(batch)],
    }


@torch.no_grad()
def prefill_seconds(model, ids, names) -> float:
    sync(ids.device.type)
    started = time.perf_counter()
    model(input_ids=ids, adapter_names=names)
    sync(ids.device.type)
    return time.perf_counter() - started


@torch.no_grad()
def decode_seconds(model, ids, names, steps: int) -> float:
    """Time of ``steps`` single-token steps after a prefill of ``ids`` (the prefill not timed)."""
    cache = DynamicCache()
    out = model(input_ids=ids, adapter_names=names, cache=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    sync(ids.device.type)
    started = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, adapter_names=names, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    sync(ids.device.type)
    return time.perf_counter() - started


def measure(name: str, batch: int, seq: int, rounds: int, steps: int,
            device: str = "cpu") -> dict[str, dict[str, float]]:
    model = four_adapters(name).to(device)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    variants = choices(batch)
    kinds = {"prefill": lambda names: prefill_seconds(model, ids, names),
             "decode": lambda names: decode_seconds(model, ids[:, : max(1, seq // 4)], names, steps)}
    for kind in kinds.values():  # warm-up
        for names in variants.values():
            kind(names)
    ratios: dict[str, dict[str, list[float]]] = {kind: {v: [] for v in variants} for kind in kinds}
    seconds: dict[str, dict[str, list[float]]] = {kind: {v: [] for v in variants} for kind in kinds}
    order = list(variants)
    for round_index in range(rounds):
        for kind, run in kinds.items():
            rotated = order[round_index % len(order):] + order[: round_index % len(order)]
            timed = {variant: run(variants[variant]) for variant in rotated}
            for variant, spent in timed.items():
                seconds[kind][variant].append(spent)
                ratios[kind][variant].append(spent / timed["one adapter"])
    return {kind: {variant: {"ms": 1e3 * statistics.median(seconds[kind][variant]),
                             "ratio": statistics.median(ratios[kind][variant])} for variant in variants}
            for kind in kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama27M", choices=["llama27M", "stories260K", "smollm135M"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 rounds")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.model, args.rounds, args.seq, args.steps = "stories260K", 2, 16, 2
    figures = measure(args.model, args.batch, args.seq, args.rounds, args.steps, args.device)
    print(f"{args.model}, batch {args.batch} x {args.seq}, {args.rounds} rounds, {args.device} "
          "(median ms; median ratio to one adapter)")
    print(f"| variant | prefill ms | × one adapter | decode ms ({args.steps} steps) | × one adapter |")
    print("|---|---:|---:|---:|---:|")
    for variant in figures["prefill"]:
        prefill, decode = figures["prefill"][variant], figures["decode"][variant]
        print(f"| {variant} | {prefill['ms']:.1f} | {prefill['ratio']:.3f} | {decode['ms']:.1f} "
              f"| {decode['ratio']:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "batch": args.batch, "seq": args.seq, "figures": figures}, handle, indent=2)


if __name__ == "__main__":
    main()
