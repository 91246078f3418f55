"""LoRA's invariants in closed form, on tiny Llama, GPT-2 and BERT models with fixed seeds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.lora import LoRALayer, lora_scale, merged_weight, svd_init
from deltatune.combine import add_weighted_adapter

from conftest import TINY_MODELS, logits_of, tiny_llama

ARCHS = sorted(TINY_MODELS)


def randomize(model: dt.DeltaModel, name: str = "default", seed: int = 3) -> None:
    """Give every adapter tensor a non-zero value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters(name).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


# --- merge is a pure function on tensors ---------------------------------------------------
def test_merged_weight_on_hand_written_matrices():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # out 3, in 2
    lora_A = torch.tensor([[1.0, 2.0]])  # r 1, in 2
    lora_B = torch.tensor([[1.0], [0.0], [-1.0]])  # out 3, r 1
    expected = torch.tensor([[1.5, 1.0], [0.0, 1.0], [1.5, 1.0]])  # W + 0.5 · B A
    assert torch.equal(merged_weight(weight, lora_A, lora_B, 0.5), expected)
    assert torch.equal(merged_weight(weight.T, lora_A, lora_B, 0.5, transposed=True), expected.T)


def test_merged_weight_sums_in_fp32_for_bf16():
    weight = torch.full((4, 4), 256.0, dtype=torch.bfloat16)
    lora_A, lora_B = torch.full((1, 4), 0.5), torch.full((4, 1), 0.5)
    # 256 + 0.25·4 = 257 is not a bf16 value; fp32 sum then one rounding gives 256 (round to even)
    # while adding four bf16 partial sums would also round; what matters: the result is one rounding.
    merged = merged_weight(weight, lora_A, lora_B, 4.0)  # 256 + 4·0.25 = 257 → bf16 rounds to 256
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (weight.float() + 1.0).to(torch.bfloat16))


def test_scaling_alpha_over_rank_and_rslora():
    assert lora_scale(8, 16) == 2.0
    assert lora_scale(16, 16, rslora=True) == 4.0
    assert lora_scale(4, 8, rslora=True) == pytest.approx(8 / math.sqrt(4))


def test_svd_init_keeps_the_weight_and_takes_the_top_singular_directions():
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    lora_A, lora_B, residual = svd_init(weight, rank=2, scale=0.5)
    assert torch.allclose(residual + 0.5 * lora_B @ lora_A, weight, atol=1e-5)
    singular = torch.linalg.svdvals(weight)
    assert torch.allclose(torch.linalg.svdvals(0.5 * lora_B @ lora_A)[:2], singular[:2], atol=1e-5)
    assert torch.allclose(torch.linalg.svdvals(residual)[:3], singular[2:5], atol=1e-5)


# --- the wrapped model ---------------------------------------------------------------------
def test_trainable_parameter_count_in_closed_form():
    base = tiny_llama()
    total_before = sum(p.numel() for p in base.parameters())
    model = dt.wrap(base, dt.LoRA(rank=4, targets=["q_proj", "v_proj"]))
    # q: 32→32, v: 32→16 (2 kv heads × 8), two layers: r·(in+out) each
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert dt.trainable_parameters(model) == (expected, total_before + expected)


def test_gpt2_conv1d_is_wrapped_with_transposed_weights(input_ids):
    model = dt.wrap(TINY_MODELS["gpt2"](), dt.LoRA(rank=2))  # default targets: c_attn
    layer = model.base_model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALayer) and isinstance(layer.base_layer, Conv1D) and layer.transposed
    assert layer.lora_A["default"].shape == (2, 32) and layer.lora_B["default"].shape == (96, 2)


def test_embedding_lora_merges(input_ids):
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets=["embed_tokens"]))
    randomize(model)
    adapted = logits_of(model, input_ids)
    plain = dt.merge(model)
    assert torch.allclose(logits_of(plain, input_ids), adapted, atol=1e-5)


def test_merge_into_tied_embeddings_unties_them(input_ids):
    base = tiny_llama(tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = dt.wrap(base, dt.LoRA(rank=4, targets=["embed_tokens"]))
    randomize(model)
    adapted = logits_of(model, input_ids)
    plain = dt.merge(model)
    assert plain.config.tie_word_embeddings is False
    assert torch.allclose(logits_of(plain, input_ids), adapted, atol=1e-5)


def test_rslora_scale_is_alpha_over_sqrt_rank():
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=16, alpha=8, rslora=True, targets=["q_proj"]))
    assert model.base_model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0


def test_rank_and_alpha_patterns_apply_per_layer():
    method = dt.LoRA(rank=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                     alpha_pattern={"v_proj": 1.0})
    model = dt.wrap(tiny_llama(), method)
    layers = model.base_model.model.layers
    assert layers[0].self_attn.q_proj.lora_A["default"].shape[0] == 4
    assert layers[1].self_attn.q_proj.lora_A["default"].shape[0] == 2
    assert layers[1].self_attn.q_proj.scaling["default"] == 8 / 2
    assert layers[0].self_attn.v_proj.scaling["default"] == 1.0 / 4


def test_dropout_is_active_only_in_training(input_ids):
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, dropout=0.5, targets="all-linear"))
    randomize(model)
    model.eval()
    assert torch.equal(logits_of(model, input_ids), logits_of(model, input_ids))
    model.train()
    torch.manual_seed(0)
    first = logits_of(model, input_ids)
    assert not torch.equal(first, logits_of(model, input_ids))


def test_bias_lora_only_trains_a_copy_of_the_wrapped_biases():
    model = dt.wrap(TINY_MODELS["gpt2"](), dt.LoRA(rank=2, bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.transformer.h.0.attn.c_attn.biases.default" in trainable
    assert "base_model.transformer.h.0.attn.c_proj.bias" not in trainable
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("base_layer.bias"))


def test_bias_all_trains_a_copy_of_every_bias():
    base = TINY_MODELS["gpt2"]()
    bias_count = sum(1 for n, _ in base.named_parameters() if n.endswith("bias"))
    model = dt.wrap(base, dt.LoRA(rank=2, bias="all"))
    params = model.adapter_parameters("default")
    assert sum(1 for key in params if key.endswith("bias")) == bias_count
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".bias"))  # originals frozen


# --- PiSSA ---------------------------------------------------------------------------------
def test_pissa_init_equals_base_and_saves_as_plain_lora(tmp_path, input_ids):
    reference = logits_of(tiny_llama(), input_ids)
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, alpha=4, init="pissa", targets="all-linear"))
    # W_res + s·B A recomposes W up to the SVD's fp32 rounding
    assert torch.allclose(logits_of(model, input_ids), reference, atol=1e-4)
    randomize(model, seed=5)
    adapted = logits_of(model, input_ids)
    dt.save_adapter(model, tmp_path)
    loaded = dt.load_adapter(tiny_llama(), tmp_path)  # a plain rank-8 LoRA on the original weights
    assert loaded.base_model.model.layers[0].self_attn.q_proj.lora_A["default"].shape[0] == 8
    assert torch.allclose(logits_of(loaded, input_ids), adapted, atol=1e-4)


# --- several adapters ----------------------------------------------------------------------
def test_add_switch_delete_and_per_example_adapters(input_ids):
    reference = logits_of(tiny_llama(), input_ids)
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets="all-linear"))
    randomize(model, "default", seed=1)
    model.add_adapter("other", dt.LoRA(rank=2, targets=["q_proj"]))
    randomize(model, "other", seed=2)
    other = logits_of(model, input_ids)
    model.set_adapter("default")
    default = logits_of(model, input_ids)
    assert not torch.allclose(other, default)
    assert all(p.requires_grad for p in model.adapter_parameters("default").values())
    assert not any(p.requires_grad for p in model.adapter_parameters("other").values())
    mixed = model(input_ids=input_ids, adapter_names=["other", "__base__", "default"]).logits.detach()
    assert torch.allclose(mixed[0], other[0], atol=1e-6)
    assert torch.allclose(mixed[1], reference[1], atol=1e-6)
    assert torch.allclose(mixed[2], default[2], atol=1e-6)
    model.delete_adapter("default")
    assert list(model.methods) == ["other"]
    assert torch.allclose(logits_of(model, input_ids), other, atol=1e-6)
    model.delete_adapter("other")
    assert not any(isinstance(m, dt.DeltaModule) for m in model.base_model.modules())
    assert torch.equal(logits_of(model, input_ids), reference)


# --- errors --------------------------------------------------------------------------------
def test_target_that_matches_nothing_lists_the_real_names():
    with pytest.raises(dt.DeltatuneError, match=r"match no module.*q_proj"):
        dt.wrap(tiny_llama(), dt.LoRA(targets=["query"]))


def test_unsupported_target_type_is_named():
    with pytest.raises(dt.DeltatuneError, match="LlamaRMSNorm"):
        dt.wrap(tiny_llama(), dt.LoRA(targets=["input_layernorm"]))


@pytest.mark.parametrize("bad", [dict(rank=0), dict(dropout=1.0), dict(init="zeros"), dict(bias="some")])
def test_bad_config_is_refused_on_construction(bad):
    with pytest.raises(dt.DeltatuneError):
        dt.LoRA(**bad)


def test_unknown_model_type_needs_explicit_targets():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(dt.DeltatuneError, match="all-linear"):
        dt.wrap(model, dt.LoRA())
    wrapped = dt.wrap(nn.Sequential(nn.Linear(4, 4)), dt.LoRA(targets="all-linear"))
    assert isinstance(wrapped.base_model[0], LoRALayer)


# --- weighted combinations -----------------------------------------------------------------
def two_adapter_model():
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, alpha=8, targets=["q_proj", "v_proj"]), "first")
    model.add_adapter("second", dt.LoRA(rank=2, alpha=2, targets=["q_proj"]))
    randomize(model, "first", seed=1)
    randomize(model, "second", seed=2)
    return model


def delta_of(model, name, path="model.layers.0.self_attn.q_proj"):
    return model.base_model.get_submodule(path).delta(name)


def test_linear_combination_is_exact():
    model = two_adapter_model()
    add_weighted_adapter(model, ["first", "second"], [0.7, -0.3], "mix", combination="linear")
    expected = 0.7 * delta_of(model, "first") - 0.3 * delta_of(model, "second")
    assert torch.allclose(delta_of(model, "mix"), expected, atol=1e-6)
    v_proj = "model.layers.1.self_attn.v_proj"  # only the first adapter has it
    assert torch.allclose(delta_of(model, "mix", v_proj), 0.7 * delta_of(model, "first", v_proj), atol=1e-6)
    assert model.active_adapter == "mix"


def test_svd_combination_is_the_best_rank_r_approximation(tmp_path, input_ids):
    model = two_adapter_model()
    add_weighted_adapter(model, ["first", "second"], [1.0, 1.0], "mix", combination="svd", rank=3)
    target = delta_of(model, "first") + delta_of(model, "second")
    singular = torch.linalg.svdvals(target)
    error = torch.linalg.matrix_norm(delta_of(model, "mix") - target)
    assert torch.allclose(error, singular[3:].norm(), atol=1e-5)  # Eckart–Young
    adapted = logits_of(model, input_ids)
    dt.save_adapter(model, tmp_path, "mix")
    assert torch.allclose(logits_of(dt.load_adapter(tiny_llama(), tmp_path), input_ids), adapted, atol=1e-6)


def test_save_pretrained_writes_the_adapter_like_peft(tmp_path, input_ids):
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets=["q_proj"]))
    randomize(model)
    model.save_pretrained(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "deltatune_method.json"]
    assert torch.equal(logits_of(dt.load_adapter(tiny_llama(), tmp_path), input_ids), logits_of(model, input_ids))


def test_save_and_load_round_trip_bit_exactly(tmp_path):
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets="all-linear", modules_to_save=("lm_head",)))
    randomize(model)
    dt.save_adapter(model, tmp_path)
    loaded = dt.load_adapter(tiny_llama(), tmp_path)
    ours, theirs = model.adapter_parameters("default"), loaded.adapter_parameters("default")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_modules_to_save_keeps_one_copy_per_adapter(input_ids):
    reference = logits_of(tiny_llama(), input_ids)
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=2, targets=["q_proj"], modules_to_save=("lm_head",)), "a")
    model.add_adapter("b", dt.LoRA(rank=2, targets=["q_proj"], modules_to_save=("lm_head",)))
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    model.set_adapter("a")
    first = logits_of(model, input_ids)
    model.set_adapter("b")
    assert not torch.allclose(logits_of(model, input_ids), first)
    with dt.disabled(model):
        assert torch.equal(logits_of(model, input_ids), reference)
    model.set_adapter("a")
    assert torch.equal(logits_of(model, input_ids), first)
    assert torch.allclose(logits_of(dt.merge(model), input_ids), first, atol=1e-5)


def test_pissa_training_state_resumes_the_native_factors(tmp_path, input_ids):
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, alpha=4, init="pissa", targets=["q_proj"]))
    randomize(model, seed=5)
    dt.save_adapter(model, tmp_path)
    resumed = dt.load_adapter(tiny_llama(), tmp_path, trainable=True)
    layer = resumed.base_model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].shape[0] == 4  # PiSSA's own rank, not the rank-2r export
    assert torch.allclose(logits_of(resumed, input_ids), logits_of(model, input_ids), atol=1e-5)


def test_plain_lora_writes_no_training_state(tmp_path):
    dt.save_adapter(dt.wrap(tiny_llama(), dt.LoRA(rank=2, targets=["q_proj"])), tmp_path)
    assert not (tmp_path / "adapter_training_state.safetensors").exists()


# --- the fused kernel equals the plain autograd path ---------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_linear_matches_the_reference_path(dropout):
    layer = LoRALayer(nn.Linear(16, 12))
    layer.add_adapter("default", rank=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    layer.base_layer.weight.requires_grad_(False)
    layer.base_layer.bias.requires_grad_(False)
    layer.train()
    x = torch.randn(3, 5, 16, requires_grad=True)

    def run(fused: bool):
        for p in (x, layer.lora_A["default"], layer.lora_B["default"]):
            p.grad = None
        torch.manual_seed(0)
        if fused:
            out = layer(x)
        else:  # the reference: base + s·B A drop(x), with the same keep-mask
            keep = torch.rand(15, 16) >= dropout
            dropped = (x.reshape(15, 16) * keep / (1 - dropout)).view_as(x)
            out = layer.base_layer(x) + layer.scaling["default"] * (
                dropped @ layer.lora_A["default"].T @ layer.lora_B["default"].T)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), x.grad.clone(), layer.lora_A["default"].grad.clone(), layer.lora_B["default"].grad.clone()

    assert layer._fused_terms(x) is not None
    for fused, reference in zip(run(True), run(False)):
        assert torch.allclose(fused, reference, atol=1e-5)  # the same sums in another order


def test_fused_path_saves_a_bool_mask_not_a_copy_of_the_input():
    layer = LoRALayer(nn.Linear(64, 64))
    layer.add_adapter("default", rank=4, alpha=8, dropout=0.1)
    layer.base_layer.requires_grad_(False)
    layer.train()
    saved = []
    x = torch.randn(8, 64)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    full_size = [t for t in saved if t.shape == x.shape]
    assert sorted(str(t.dtype) for t in full_size) == ["torch.bool", "torch.float32"]  # x once, and the mask


# --- the bugs a new user found (each is also a cell of the contract suite) ---------------------
def stories(stories_dir):
    from deltatune.pretrained import load_causal_lm

    return load_causal_lm(str(stories_dir), "float32", False).eval()


def test_pissa_disabled_is_the_base_model_on_stories260k(stories_dir):
    ids = torch.tensor([[1, 403, 407, 261, 378, 429, 266, 300]])
    reference = logits_of(stories(stories_dir), ids)
    model = dt.wrap(stories(stories_dir), dt.LoRA(rank=4, init="pissa", targets="all-linear"))
    randomize(model)  # as after training: the residual alone would be far from the base
    with dt.disabled(model):
        assert torch.allclose(logits_of(model, ids), reference, atol=1e-4)  # W_res + s·B₀A₀ rounds once
    model.delete_adapter("default")  # deleting gives W back to the base weight too
    assert torch.allclose(logits_of(model, ids), reference, atol=1e-4)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_are_copies_so_disabled_and_merge_work_on_gpt2(bias, input_ids):
    reference = logits_of(TINY_MODELS["gpt2"](), input_ids)
    model = dt.wrap(TINY_MODELS["gpt2"](), dt.LoRA(rank=2, bias=bias))
    randomize(model)
    adapted = logits_of(model, input_ids)
    with dt.disabled(model):
        assert torch.equal(logits_of(model, input_ids), reference)
    model.merge_adapter()
    assert torch.allclose(logits_of(model, input_ids), adapted, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(logits_of(dt.merge(model), input_ids), adapted, atol=1e-5)


def test_merge_then_unmerge_keeps_stories260k_ties_and_weights(stories_dir):
    base = stories(stories_dir)
    embedding = base.model.embed_tokens.weight
    assert base.lm_head.weight is embedding
    model = dt.wrap(base, dt.LoRA(rank=4, targets=["embed_tokens", "q_proj"]))
    randomize(model)
    model.merge_adapter()
    assert base.lm_head.weight is embedding  # the head kept the original: only the input side changed
    model.unmerge_adapter()
    assert base.model.embed_tokens.weight is embedding and base.lm_head.weight is embedding  # tie restored


def test_unmerge_with_nothing_merged_touches_no_weight():
    base = tiny_llama(tie_word_embeddings=True)
    model = dt.wrap(base, dt.LoRA(rank=4, targets=["embed_tokens", "lm_head", "q_proj"]))
    before = {name: p for name, p in base.named_parameters(remove_duplicate=False)}
    model.unmerge_adapter()
    with dt.disabled(model):
        pass
    assert all(p is before[name] for name, p in base.named_parameters(remove_duplicate=False))


class KeptWeight(nn.Parameter):
    """Stands in for a quantised storage: it cannot be written in place."""


class KeptWeightBackend:
    writes_in_place = False

    def handles(self, weight):
        return type(weight) is KeptWeight

    def dense(self, weight):
        return weight.detach().as_subclass(torch.Tensor)

    def stored(self, like, dense):
        return KeptWeight(dense.to(like.dtype), requires_grad=False)


def test_a_weight_storage_plugs_in_as_one_backend(input_ids):
    from deltatune.methods.base_weight import BACKENDS

    BACKENDS.append(KeptWeightBackend())
    try:
        base = tiny_llama()
        layer = base.model.layers[0].self_attn.q_proj
        layer.weight = KeptWeight(layer.weight.detach().clone(), requires_grad=False)
        original = layer.weight
        model = dt.wrap(base, dt.LoRA(rank=4, targets=["q_proj"]))
        randomize(model)
        adapted = logits_of(model, input_ids)
        model.merge_adapter()
        assert type(layer.weight) is KeptWeight and layer.weight is not original  # stored by the backend
        assert torch.allclose(logits_of(model, input_ids), adapted, atol=1e-5)
        model.unmerge_adapter()
        assert layer.weight is original  # the very tensor back: nothing re-quantised
    finally:
        BACKENDS.pop()


def test_the_no_grad_path_equals_the_autograd_kernel():
    from deltatune.methods.lora import fused_lora_linear

    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 16), torch.randn(8, 16), torch.randn(8)
    lora_A, lora_B = torch.randn(4, 16), torch.randn(8, 4)
    with torch.no_grad():
        inference = fused_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.0)
    training = fused_lora_linear(x, weight, bias, lora_A.requires_grad_(), lora_B, 0.5, 0.0)
    reference = x @ weight.T + bias + 0.5 * (x @ lora_A.T @ lora_B.T)
    assert torch.equal(inference, training.detach())
    assert torch.allclose(inference, reference.detach(), atol=1e-5)
