"""Per-architecture defaults beyond the causal LMs: BART and T5 (encoder–decoder), GPT-NeoX's fused
query_key_value (the ChatGLM/BLOOM/Falcon layout), each equal to the base at init and after merge."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.methods.lora import LoRALayer
from deltatune.targets import DEFAULT_TARGETS

from conftest import tiny_bart, tiny_neox, tiny_t5
from test_lora import randomize


MODELS = {"bart": tiny_bart, "t5": tiny_t5, "gpt_neox": tiny_neox}


def forward(model, ids):
    with torch.no_grad():
        if getattr(model.config, "is_encoder_decoder", False):
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_default_targets_wrap_merge_and_round_trip(arch, tmp_path, input_ids):
    reference = forward(MODELS[arch](), input_ids)
    model = dt.wrap(MODELS[arch](), dt.LoRA(rank=4))  # no targets: the architecture's defaults
    names = {p.rsplit(".", 1)[-1] for p, m in model.base_model.named_modules() if isinstance(m, LoRALayer)}
    assert names == set(DEFAULT_TARGETS[arch])
    assert torch.equal(forward(model, input_ids), reference)
    randomize(model)
    adapted = forward(model, input_ids)
    dt.save_adapter(model, tmp_path)
    assert torch.equal(forward(dt.load_adapter(MODELS[arch](), tmp_path), input_ids), adapted)
    assert torch.allclose(forward(dt.merge(model), input_ids), adapted, atol=1e-5)


def test_bart_lora_reaches_encoder_decoder_and_cross_attention():
    model = dt.wrap(tiny_bart(), dt.LoRA(rank=2))
    paths = [p for p, m in model.base_model.named_modules() if isinstance(m, LoRALayer)]
    assert any(".encoder." in p for p in paths)
    assert any(".decoder." in p and "encoder_attn" in p for p in paths)
    assert any(".decoder." in p and "self_attn" in p for p in paths)


def test_bf16_model_merges_in_fp32(input_ids):
    from conftest import tiny_llama

    model = dt.wrap(tiny_llama().to(torch.bfloat16), dt.LoRA(rank=4, targets=["q_proj"]))
    randomize(model)
    layer = model.base_model.model.layers[0].self_attn.q_proj
    expected = (layer.base_layer.weight.float() + layer.delta("default")).to(torch.bfloat16)
    plain = dt.merge(model)
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(plain.model.layers[0].self_attn.q_proj.weight, expected)
