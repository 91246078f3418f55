"""Freeze tuning (the last 2 layers) vs full fine-tuning: step time and training memory.

The claim under test: with the embeddings and every layer below the first trained one frozen,
and no input requiring grad, autograd records no graph below that layer, so the backward pass
stops there. The variants, on the 27.2M Llama of benchmarks/lora_vs_peft.py (hidden 512,
6 layers, vocab 8000, untied head), fp32, batch 8 × 128, AdamW over the trainable parameters:

    full            every parameter trains
    freeze-2        dt.FreezeTuning(trainable_layers=2): layers 4 and 5 train
    freeze-2 +gc    the same with gradient checkpointing switched on as deltatune's trainer does
                    (transformers' activation_checkpointing_enable, which also calls
                    enable_input_require_grads(): the embeddings' output then requires grad)
    freeze-2 +gc, no input grads    the same, then disable_input_require_grads()

Every variant runs in ONE process, INTERLEAVED: each round takes one timed step of every variant
(the order rotates), and the figures are medians of raw times and of per-round ratios to full.
Memory is deltatune.memory.measure_training_step: parameters + gradients + AdamW state + the
tensors autograd saves for backward, counted byte by byte for one step (not the process RSS).
"reaches layer" is the lowest decoder layer whose output requires grad: the backward pass goes
no lower than that.

    python benchmarks/freeze_vs_full.py                 # ~1 min on 2 CPU cores
    python benchmarks/freeze_vs_full.py --rounds 3      # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import deltatune as dt
from deltatune.memory import MIB, measure_training_step

SEED, LR, BATCH, LENGTH = 0, 1e-5, 8, 128


def llama_27m() -> LlamaForCausalLM:
    """The 27.2M-parameter Llama of benchmarks/lora_vs_peft.py, with the same seed every time."""
    torch.manual_seed(SEED)
    config = LlamaConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1376, vocab_size=8000, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def variant(name: str) -> torch.nn.Module:
    method = dt.FullFineTuning() if name == "full" else dt.FreezeTuning(trainable_layers=2)
    model = dt.wrap(llama_27m(), method)
    if "+gc" in name:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # as train.py
        if "no input grads" in name:
            model.disable_input_require_grads()
    return model.train()


class Trainee:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def forward_backward(self, ids: torch.Tensor) -> None:
        self.model(input_ids=ids, labels=ids).loss.backward()

    def step(self, ids: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward(ids)
        self.optimizer.step()


def lowest_layer_with_grad(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """The lowest decoder layer whose output requires grad in a training forward."""
    seen: list[bool] = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad)) for layer in model.base_model.model.layers]
    model(input_ids=ids, labels=ids)
    for hook in hooks:
        hook.remove()
    return seen.index(True)


def interleave(runners: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="also write every figure and the raw times here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    hf_logging.set_verbosity_error()
    ids = torch.randint(0, 8000, (BATCH, LENGTH), generator=torch.Generator().manual_seed(SEED))
    names = ["full", "freeze-2", "freeze-2 +gc", "freeze-2 +gc, no input grads"]
    trainees = {name: Trainee(variant(name)) for name in names}
    rows = {}
    for name, trainee in trainees.items():  # memory first: one counted step each (it also warms up)
        memory = measure_training_step(trainee.model, trainee.optimizer, lambda t=trainee: t.forward_backward(ids))
        trainable, total = dt.trainable_parameters(trainee.model)
        rows[name] = {"memory_mib": memory.as_mib(), "trainable": trainable, "total": total,
                      "reaches_layer": lowest_layer_with_grad(trainee.model, ids)}
    for _ in range(args.warmup):
        for trainee in trainees.values():
            trainee.step(ids)
    times = interleave({name: (lambda t=trainee: t.step(ids)) for name, trainee in trainees.items()}, args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"batch {BATCH} x {LENGTH}, fp32, {args.rounds} interleaved rounds (medians)")
    print(f"{'variant':<30} {'step ms':>8} {'x full':>7} {'memory MiB':>10} {'x full':>7} {'activations':>11} "
          f"{'trainable':>11} {'reaches layer':>13}")
    full_memory = rows["full"]["memory_mib"]["total"]
    for name in names:
        row = rows[name]
        row["step_ms"] = 1000 * statistics.median(times[name])
        row["step_ratio_to_full"] = statistics.median(a / b for a, b in zip(times[name], times["full"]))
        row["memory_ratio_to_full"] = row["memory_mib"]["total"] / full_memory
        print(f"{name:<30} {row['step_ms']:>8.1f} {row['step_ratio_to_full']:>7.3f} {row['memory_mib']['total']:>10.1f} "
              f"{row['memory_ratio_to_full']:>7.3f} {row['memory_mib']['activations']:>11.1f} "
              f"{row['trainable']:>11,} {row['reaches_layer']:>13}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows, "times_s": times, "bytes_per_mib": MIB}, handle, indent=2)


if __name__ == "__main__":
    main()
