"""The main job on bundled defaults: LoRA on E2E restaurant descriptions with stories260K.

Shows generations for held-out meaning representations before and after training, merges
the adapter into the base weights and shows the merged model gives the same tokens.
Needs nothing outside the package: the model and data ship with it (bundled/ATTRIBUTION.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

import deltatune as dt
from deltatune.atomic import is_own_file, remove_own_files
from deltatune.config import build_run
from deltatune.data import load_examples
from deltatune.errors import DeltatuneError
from deltatune.generation import encode_prompt, generate_text
from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer
from deltatune.runner import run_training

SHOWN = 3  # held-out examples shown before and after


def demo_settings(output: str, max_steps: int) -> dict:
    return {
        "model": str(bundled("stories260K")), "data": str(bundled("e2e/train.jsonl")),
        "eval_data": str(bundled("e2e/eval.jsonl")), "output": output, "method": "lora",
        "rank": 8, "alpha": 16, "targets": "all-linear", "max_steps": max_steps, "batch_size": 16,
        "learning_rate": 3e-3, "warmup_steps": 20, "eval_every": 100, "log_every": 10, "max_length": 256,
    }


def _fresh(output: Path) -> None:
    """Clear an earlier demo run's files; refuse a folder that holds anything deltatune did not write."""
    if output.exists() and not output.is_dir():
        raise DeltatuneError(f"--output {str(output)!r} is a file; name a folder for the demo run.")
    foreign = sorted(p.name for p in output.iterdir() if not is_own_file(p)) if output.is_dir() else []
    if foreign:
        raise DeltatuneError(f"{output} holds {foreign[0]!r}, which deltatune did not write; "
                             "pass --output to a new folder.")
    remove_own_files(output)


def _show(title: str, prompts: list[str], texts: list[str]) -> None:
    print(f"\n== {title}")
    for prompt, text in zip(prompts, texts):
        print(f"  {prompt.strip()}\n    -> {text.strip()}")


def run_demo(output: str = "runs/demo", max_steps: int = 300, progress: bool = True) -> None:
    torch.manual_seed(0)
    run = build_run(demo_settings(output, max_steps))
    _fresh(Path(run.output))
    tokenizer = load_tokenizer(run.model)
    prompts = [example.prompt for example in load_examples(run.eval_data)[:SHOWN]]

    base = load_causal_lm(run.model)
    _show("base model (stories260K, trained on children's stories)", prompts, generate_text(base, tokenizer, prompts, 48))

    trainable, total = dt.trainable_parameters(dt.wrap(load_causal_lm(run.model), run.method))
    print(f"\nLoRA rank {run.method.rank} on all linear layers: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")
    result = run_training(run, progress=progress)
    first_eval = result.eval_losses[0][1] if result.eval_losses else float("nan")
    print(f"trained {result.step} steps at {result.tokens_per_s:,.0f} tokens/s; held-out loss "
          f"{first_eval:.3f} (step {result.eval_losses[0][0]}) -> {result.eval_losses[-1][1]:.3f}")

    adapted = dt.load_adapter(load_causal_lm(run.model), run.output)
    after = generate_text(adapted, tokenizer, prompts, 48)
    _show("with the LoRA adapter", prompts, after)

    probe = torch.tensor([encode_prompt(tokenizer, prompts[0])])
    with torch.no_grad():
        adapter_logits = adapted(input_ids=probe).logits
        merged = dt.merge(adapted)
        merged_logits = merged(input_ids=probe).logits
    merged_texts = generate_text(merged, tokenizer, prompts, 48)
    same = merged_texts == after
    print(f"\n== merged (W' = W + s*BA, no adapter left): same generations: {'yes' if same else 'NO'}; "
          f"max |logit difference| {(merged_logits - adapter_logits).abs().max().item():.2e}")
    if not same:
        raise DeltatuneError("The merged model generated different text from the adapter; please report this bug.")
    print(f"\nadapter (peft format) in {run.output}/ — try:\n"
          f"  deltatune info {run.output}\n"
          f"  deltatune generate --model {run.model} --adapter {run.output} --escapes --prompt '{prompts[0].strip()}\\n'")
