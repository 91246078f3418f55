"""Adapters cross between peft and deltatune in both directions with equal logits (fp32, 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt

from conftest import TINY_MODELS, logits_of, tiny_llama
from test_lora import randomize

peft = pytest.importorskip("peft", reason="peft is a test extra: pip install -e '.[test]'")

CASES = {  # arch: (peft kwargs, deltatune method)
    "llama": (dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
              dt.LoRA(rank=4, alpha=8, targets="all-linear")),
    "gpt2": (dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
             dt.LoRA(rank=4, alpha=8, targets=["c_attn", "c_proj"])),
    "bert": (dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
             dt.LoRA(rank=4, alpha=8, targets=["query", "value"], modules_to_save=("classifier",))),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_deltatune_adapter_loads_in_peft(arch, tmp_path, input_ids):
    model = dt.wrap(TINY_MODELS[arch](), CASES[arch][1])
    randomize(model)
    expected = logits_of(model, input_ids)
    dt.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS[arch](), str(tmp_path)).eval()
    assert torch.allclose(logits_of(theirs, input_ids), expected, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_adapter_loads_here(arch, tmp_path, input_ids):
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **CASES[arch][0])
    theirs = peft.get_peft_model(TINY_MODELS[arch](), config).eval()
    expected = logits_of(theirs, input_ids)
    theirs.save_pretrained(str(tmp_path))
    ours = dt.load_adapter(TINY_MODELS[arch](), tmp_path)
    assert torch.allclose(logits_of(ours, input_ids), expected, atol=1e-5)
    assert torch.allclose(logits_of(dt.merge(ours), input_ids), expected, atol=1e-5)


def test_rslora_and_rank_pattern_cross_both_ways(tmp_path, input_ids):
    method = dt.LoRA(rank=4, alpha=8, rslora=True, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                     alpha_pattern={"q_proj": 3.0})
    model = dt.wrap(tiny_llama(), method)
    randomize(model)
    expected = logits_of(model, input_ids)
    dt.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert torch.allclose(logits_of(theirs, input_ids), expected, atol=1e-5)


def test_embedding_adapter_crosses_to_peft(tmp_path, input_ids):
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets=["embed_tokens", "q_proj"]))
    randomize(model)
    expected = logits_of(model, input_ids)
    dt.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert torch.allclose(logits_of(theirs, input_ids), expected, atol=1e-5)


def test_unknown_config_keys_are_ignored_with_a_warning(tmp_path, input_ids):
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets=["q_proj"]))
    randomize(model)
    dt.save_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["a_key_from_the_future"] = {"x": 1}
    config_path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="a_key_from_the_future"):
        loaded = dt.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(logits_of(loaded, input_ids), logits_of(model, input_ids))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_adapter_with_trained_biases_loads_here(bias, tmp_path, input_ids):
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["c_attn"], bias=bias,
                             fan_in_fan_out=True)
    theirs = peft.get_peft_model(TINY_MODELS["gpt2"](), config)
    with torch.no_grad():  # as if trained: move every bias the adapter trains away from the base model's
        for name, param in theirs.named_parameters():
            if name.endswith("bias") and param.requires_grad:
                param.add_(0.1)
    theirs.eval()
    expected = logits_of(theirs, input_ids)
    theirs.save_pretrained(str(tmp_path))
    ours = dt.load_adapter(TINY_MODELS["gpt2"](), tmp_path)
    assert torch.allclose(logits_of(ours, input_ids), expected, atol=1e-5)
    with dt.disabled(ours):
        assert torch.equal(logits_of(ours, input_ids), logits_of(TINY_MODELS["gpt2"](), input_ids))
