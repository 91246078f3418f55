"""Per-token decode time of each method relative to the base model, interleaved in one process.

For every method the same prompt is decoded greedily with the KV cache. Decode time per token
is (time to generate N tokens − time to generate 1 token) / (N − 1), so the prompt's prefill is
left out. Each round times every variant once, in a rotating order; the table gives the median
over rounds of the per-round ratio variant / base. Goal: within 1.10× of the base.

    python benchmarks/decode_overhead.py [--rounds 15] [--tokens 48] [--model stories260K|llama27M|smollm135M] [--device cuda] [--json out.json]
    python benchmarks/decode_overhead.py --quick          # smoke run: 2 rounds of 8 tokens, numbers meaningless
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.pretrained import bundled, load_causal_lm
from lora_vs_peft import smollm_135m_shape, timed


def base_model(name: str) -> torch.nn.Module:
    if name == "stories260K":
        return load_causal_lm(bundled("stories260K"))
    torch.manual_seed(0)
    if name == "smollm135M":  # SmolLM2-135M's shape, random weights
        return smollm_135m_shape().eval()
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def variants(name: str) -> dict[str, torch.nn.Module]:
    def wrapped(method):
        torch.manual_seed(1)
        model = dt.wrap(base_model(name), method)
        with torch.no_grad():  # trained-looking values: small and non-zero
            for param in model.adapter_parameters("default").values():
                param.copy_(torch.randn_like(param) * 0.02)
        return model.eval()

    prefix = wrapped(dt.PrefixTuning(num_virtual_tokens=20))
    prefix.base_model.deltatune_prefix.fold("default")  # inference form: the MLP folded away
    return {
        "base": base_model(name),
        "lora (unmerged, all-linear r8)": wrapped(dt.LoRA(rank=8, targets="all-linear")),
        "lora merged": dt.merge(wrapped(dt.LoRA(rank=8, targets="all-linear"))),
        "prompt (20 tokens)": wrapped(dt.PromptTuning(num_virtual_tokens=20)),
        "prefix (20, folded)": prefix,
        "ptuning-v2 (64)": wrapped(dt.PTuningV2(num_virtual_tokens=64)),
    }


@torch.no_grad()
def generate_seconds(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    return timed(lambda: model.generate(input_ids=prompt, max_new_tokens=tokens, min_new_tokens=tokens,
                                        do_sample=False, pad_token_id=0), prompt.device.type)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stories260K", choices=["stories260K", "llama27M", "smollm135M"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 8 tokens")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = 2, 8
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {name: model.to(args.device) for name, model in variants(args.model).items()}
    prompt = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0)).to(args.device)
    per_token: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for name in names:  # warm-up
        generate_seconds(models[name], prompt, 4)
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            one = generate_seconds(models[name], prompt, 1)
            many = generate_seconds(models[name], prompt, args.tokens)
            per_token[name].append((many - one) / (args.tokens - 1))
    ratios = {name: statistics.median(t / b for t, b in zip(per_token[name], per_token["base"])) for name in names}
    print(f"\n{args.model}: greedy decode with KV cache, prompt 24 tokens, {args.tokens} new tokens, "
          f"{args.rounds} interleaved rounds, "
          f"{args.device if args.device != 'cpu' else f'{torch.get_num_threads()} threads'}\n")
    print("| variant | ms / token (median) | × base (median of per-round ratios) |")
    print("|---|---:|---:|")
    for name in names:
        print(f"| {name} | {1000 * statistics.median(per_token[name]):.2f} | {ratios[name]:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "device": args.device, "per_token_s": per_token, "ratio_to_base": ratios}, handle, indent=2)


if __name__ == "__main__":
    main()
