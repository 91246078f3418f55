"""LoRA trained by the one training loop: real text gets easier, and resume is exact with LoRA dropout."""

from __future__ import annotations

import json

import torch

import deltatune as dt
from deltatune.data import load_examples, tokenize_examples
from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer
from deltatune.train import TrainConfig, train

from conftest import tiny_llama


def e2e_tokens(name: str, count: int):
    tokenizer = load_tokenizer(bundled("stories260K"))
    return tokenize_examples(load_examples(bundled(f"e2e/{name}.jsonl"))[:count], tokenizer, 256)


def test_lora_lowers_held_out_loss_on_real_text(tmp_path):
    """stories260K (children's stories) learns E2E restaurant descriptions; held-out MRs only."""
    model = dt.wrap(load_causal_lm(bundled("stories260K")), dt.LoRA(rank=8, alpha=16, targets="all-linear"))
    config = TrainConfig(max_steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=5, eval_every=30)
    result = train(model, e2e_tokens("train", 240), e2e_tokens("eval", 24), config, tmp_path, pad_token_id=2,
                   save_model=dt.save_adapter, progress=False)
    (_, before), (_, after) = result.eval_losses[0], result.eval_losses[-1]
    assert after < 0.7 * before, (before, after)


def test_resume_with_lora_dropout_equals_the_uninterrupted_run(tmp_path):
    rows = [{"input_ids": list(range(i, i + 10)), "labels": list(range(i, i + 10))} for i in range(12)]

    def run(folder, max_steps, resume=False):
        torch.manual_seed(0)
        model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, dropout=0.3, targets="all-linear"))
        config = TrainConfig(max_steps=6, batch_size=4, learning_rate=1e-2, save_every=3)
        if max_steps < 6:  # interrupted: stop after the step-3 checkpoint by failing the next save
            calls = []

            def save_then_crash(m, d):
                calls.append(d)
                if len(calls) > 1:
                    raise KeyboardInterrupt
                dt.save_adapter(m, d)
            try:
                train(model, rows, [], config, folder, pad_token_id=0, save_model=save_then_crash, progress=False)
            except KeyboardInterrupt:
                pass
            model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, dropout=0.3, targets="all-linear"))
            resume = True
        train(model, rows, [], config, folder, pad_token_id=0, save_model=dt.save_adapter, resume=resume,
              progress=False)
        return model

    whole = run(tmp_path / "whole", 6)
    split = run(tmp_path / "split", 3)
    for (name, a), (_, b) in zip(whole.adapter_parameters("default").items(), split.adapter_parameters("default").items()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "split" / "checkpoint-6" / "adapter_config.json").read_text())["r"] == 4


def test_lora_gradients_are_the_same_with_gradient_checkpointing():
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))

    def gradients(checkpointing: bool):
        model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, dropout=0.2, targets="all-linear"))
        with torch.no_grad():
            for name, param in model.adapter_parameters("default").items():
                param.normal_(std=0.1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(0)  # the same dropout masks (checkpointing replays the RNG state)
        model(input_ids=x, labels=x).loss.backward()
        return {k: p.grad.clone() for k, p in model.adapter_parameters("default").items()}

    plain, checkpointed = gradients(False), gradients(True)
    for key in plain:  # recomputation repeats the same fp32 ops: equal up to summation order
        assert torch.allclose(plain[key], checkpointed[key], atol=1e-6), key
