"""The fused gated MLP (deltatune.methods.gated_mlp): Llama-style MLPs with LoRA projections keep
g and u for backward instead of g, act(g), u and act(g)·u. Loss and every trainable gradient
equal the op-by-op formulation (the switch off) within 1e-5 in fp32, in every setting where it
runs and where it steps aside; the saved activations shrink by exactly 2 × tokens × intermediate
× 4 bytes per layer; the module tree and state dict do not change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

import deltatune as dt
from deltatune.memory import measure_training_step
from deltatune.methods import gated_mlp
from deltatune.methods.gated_mlp import SWITCH, fuse_gated_mlps, is_gated_mlp

from conftest import tiny_gpt2, tiny_llama

TOKENS = (2, 12)  # batch, length


def batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, TOKENS, generator=generator)
    labels = ids.clone()
    labels[:, :TOKENS[1] // 2] = -100
    return {"input_ids": ids, "labels": labels}


def perturbed(model: nn.Module) -> nn.Module:
    """Trained-looking adapters: LoRA's B starts at zero, which would hide A's gradient."""
    torch.manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model.train()


def wrapped(method: dt.LoRA | None = None, **config) -> nn.Module:
    return perturbed(dt.wrap(tiny_llama(**config), method or dt.LoRA(rank=4, alpha=8, targets="all-linear")))


class Counter:
    """Counts the MLP calls that went through the fused function."""

    def __init__(self, monkeypatch) -> None:
        self.fused = 0
        real = gated_mlp.fusable_terms

        def counting(module, x):
            terms = real(module, x)
            self.fused += terms is not None
            return terms
        monkeypatch.setattr(gated_mlp, "fusable_terms", counting)


def loss_and_grads(model: nn.Module, inputs: dict, seed: int = 7, **kwargs) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    loss = model(**inputs, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_fused_equals_plain(model: nn.Module, monkeypatch, fused_calls: int | None = None, **kwargs) -> None:
    """Loss and every gradient with the switch on equal those with it off, within 1e-5."""
    inputs = batch()
    monkeypatch.setenv(SWITCH, "0")
    expected_loss, expected = loss_and_grads(model, inputs, **kwargs)
    monkeypatch.delenv(SWITCH)
    counter = Counter(monkeypatch)
    loss, grads = loss_and_grads(model, inputs, **kwargs)
    if fused_calls is not None:
        assert counter.fused == fused_calls
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    assert grads.keys() == expected.keys() and grads
    for name in grads:
        assert grads[name].abs().max() > 0, name  # every path carries a gradient
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=1e-5, msg=name)


LAYERS = 2  # tiny_llama's


@pytest.mark.parametrize("settings", [
    {},
    {"dropout": 0.2},
    {"rslora": True, "rank_pattern": {"down_proj": 2}},
    {"targets": ["gate_proj", "q_proj"]},  # up and down stay frozen nn.Linear
    {"targets": ["up_proj", "down_proj"]},  # the MLP's input needs no gradient in layer 0
    {"targets": ["down_proj", "v_proj"]},  # the MLP's input is not kept at all
], ids=["plain", "dropout", "rslora-ranks", "gate-only", "mlp-only", "down-only"])
def test_every_gradient_equals_the_op_by_op_mlp(settings, monkeypatch):
    method = dt.LoRA(**{"rank": 4, "alpha": 8, "targets": "all-linear", **settings})
    assert_fused_equals_plain(wrapped(method), monkeypatch, fused_calls=LAYERS)


def test_trained_biases_and_another_activation(monkeypatch):
    model = wrapped(dt.LoRA(rank=4, alpha=8, targets="all-linear", bias="lora_only"),
                    mlp_bias=True, hidden_act="gelu_pytorch_tanh")
    assert any(n.endswith("mlp.down_proj.biases.default") for n, p in model.named_parameters() if p.requires_grad)
    assert_fused_equals_plain(model, monkeypatch, fused_calls=LAYERS)


def test_gradient_checkpointing_still_gives_the_same_gradients(monkeypatch):
    model = wrapped(dropout=0.0)
    inputs = batch()
    monkeypatch.setenv(SWITCH, "0")
    expected_loss, expected = loss_and_grads(model, inputs)
    monkeypatch.delenv(SWITCH)
    model.gradient_checkpointing_enable()
    counter = Counter(monkeypatch)
    loss, grads = loss_and_grads(model, inputs)
    assert counter.fused == 2 * LAYERS  # the forward and its recompute in the backward
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=1e-5, msg=name)


def test_with_several_adapters_the_active_one_runs_fused(monkeypatch):
    model = wrapped()
    model.add_adapter("other", dt.LoRA(rank=2, alpha=4, targets="all-linear", dropout=0.1))
    perturbed(model)
    for active, fused in (("default", LAYERS), ("other", LAYERS), (["default", "other"], 0)):
        model.set_adapter(active)  # two adapters summed on a layer: the module's own forward
        assert_fused_equals_plain(model, monkeypatch, fused_calls=fused)


def test_mixed_adapter_batches_and_merged_layers_use_the_modules_own_forward(monkeypatch):
    model = wrapped()
    model.add_adapter("other", dt.LoRA(rank=2, alpha=4, targets="all-linear"))
    model.set_adapter("default")
    inputs = batch()
    counter = Counter(monkeypatch)
    per_example = model(**inputs, adapter_names=["default", "other"]).logits
    model.merge_adapter()
    merged = model(**inputs).logits
    model.unmerge_adapter()
    assert counter.fused == 0
    with dt.disabled(model):  # every projection frozen, no LoRA term: fused (keeping g and u) all the same
        base = model(**inputs).logits
    assert counter.fused == LAYERS
    with torch.no_grad():
        monkeypatch.setenv(SWITCH, "0")
        expected_first = model(**inputs).logits[0]
        model.set_adapter("other")
        expected_second = model(**inputs).logits[1]
        model.set_adapter("default")
        expected_merged = model(**inputs).logits
        with dt.disabled(model):
            expected_base = model(**inputs).logits
    torch.testing.assert_close(per_example[0], expected_first, rtol=0, atol=1e-5)
    torch.testing.assert_close(per_example[1], expected_second, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, expected_merged, rtol=0, atol=1e-5)
    torch.testing.assert_close(base, expected_base, rtol=0, atol=1e-5)  # with and without grad: other kernels


def test_the_forward_is_bit_for_bit_the_op_by_op_one(monkeypatch):
    model = wrapped(dropout=0.0)
    inputs = batch()
    fused = model(**inputs).logits
    monkeypatch.setenv(SWITCH, "0")
    assert torch.equal(fused, model(**inputs).logits)


def test_saved_activations_shrink_by_two_wide_tensors_per_layer(monkeypatch):
    def saved_bytes(switch: str) -> int:
        monkeypatch.setenv(SWITCH, switch)
        model = wrapped()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        inputs = batch()
        return measure_training_step(model, optimizer, lambda: model(**inputs).loss.backward()).activations

    config = tiny_llama().config
    tokens = TOKENS[0] * TOKENS[1]
    # act(g) and act(g)·u, fp32, in every layer
    assert saved_bytes("0") - saved_bytes("1") == LAYERS * 2 * tokens * config.intermediate_size * 4


def test_the_module_tree_and_state_dict_do_not_change():
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets="all-linear"))
    fused_keys = list(model.state_dict())
    for layer in model.base_model.model.layers:
        del layer.mlp.forward  # as if fusing had never been installed
    assert list(model.state_dict()) == fused_keys
    assert fuse_gated_mlps(model) == [f"base_model.model.layers.{i}.mlp" for i in range(LAYERS)]
    assert fuse_gated_mlps(model) == [f"base_model.model.layers.{i}.mlp" for i in range(LAYERS)]  # idempotent
    mlp = model.base_model.model.layers[0].mlp
    assert type(mlp) is LlamaMLP and list(model.state_dict()) == fused_keys
    assert "base_model.model.layers.0.mlp.gate_proj.lora_A.default" in fused_keys
    copied = copy.deepcopy(model)  # the copy's forward runs the copy's own layers
    assert copied.base_model.model.layers[0].mlp.forward.args[0] is copied.base_model.model.layers[0].mlp


def test_modules_that_are_not_llamas_mlp_are_left_alone():
    class OtherMLP(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=128)
    model = LlamaForCausalLM(config)
    model.model.layers[0].mlp = OtherMLP(config)
    dt.wrap(model, dt.LoRA(rank=4, targets="all-linear"))
    assert not is_gated_mlp(model.model.layers[0].mlp) and "forward" not in model.model.layers[0].mlp.__dict__
    gpt2 = dt.wrap(tiny_gpt2(), dt.LoRA(rank=4, targets="all-linear"))
    assert not any("forward" in m.__dict__ for m in gpt2.modules())
    inplace = tiny_llama()
    inplace.model.layers[0].mlp.act_fn = nn.ReLU(inplace=True)  # would overwrite g
    model = perturbed(dt.wrap(inplace, dt.LoRA(rank=4, targets="all-linear")))
    assert gated_mlp.fusable_terms(model.base_model.model.layers[0].mlp, torch.zeros(1, 32)) is None


def test_a_hook_on_a_projection_is_honoured(monkeypatch):
    model = wrapped()
    calls = []
    model.base_model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *_: calls.append(1))
    counter = Counter(monkeypatch)
    model(**batch()).loss.backward()
    assert calls == [1] and counter.fused == LAYERS - 1


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_qlora_runs_fused_on_its_nf4_base(dropout, monkeypatch):
    model = perturbed(dt.wrap(tiny_llama(), dt.QLoRA(rank=4, alpha=8, targets="all-linear", dropout=dropout)))
    assert_fused_equals_plain(model, monkeypatch, fused_calls=LAYERS)


def test_a_merged_model_gets_its_own_forward_back():
    model = wrapped()
    assert all("forward" in layer.mlp.__dict__ for layer in model.base_model.model.layers)
    model = dt.merge(model)
    assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)


def test_bf16_is_as_close_to_fp32_as_the_op_by_op_mlp(monkeypatch):
    inputs = batch()
    _, exact = loss_and_grads(wrapped(), inputs)
    model = wrapped().to(torch.bfloat16)
    monkeypatch.setenv(SWITCH, "0")
    _, op_by_op = loss_and_grads(model, inputs)
    monkeypatch.delenv(SWITCH)
    _, fused = loss_and_grads(model, inputs)

    def distance(grads):  # the worst relative distance from fp32 over the trainable tensors
        return max(float((grads[n].float() - exact[n]).norm() / exact[n].norm()) for n in exact)
    # bf16 rounds at other points in the two (dx summed in one buffer): equal up to 5% of bf16's own error
    assert distance(fused) <= 1.05 * distance(op_by_op)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma"])
def test_mlps_copied_from_llamas_are_recognised(family):
    module = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["_"])
    mlp_class = next(getattr(module, name) for name in dir(module) if name.lower() == f"{family}mlp")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="gelu_pytorch_tanh")
    assert is_gated_mlp(mlp_class(config))


def test_gradients_equal_peft_on_the_same_adapter(tmp_path):
    """The reference implementation, op by op: the same adapter loaded by peft gives the same
    loss and the same gradient for every A and B."""
    peft = pytest.importorskip("peft")
    model = wrapped()
    dt.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True).train()
    inputs = batch()
    loss, grads = loss_and_grads(model, inputs)
    their_loss, their_grads = loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=1e-5)
    assert len(grads) == len(their_grads) == 7 * LAYERS * 2
    for name, grad in grads.items():  # base_model.model.X.lora_A.default: peft's base_model.model.model.X...weight
        theirs_name = "base_model.model." + name.removeprefix("base_model.") + ".weight"
        torch.testing.assert_close(grad, their_grads[theirs_name], rtol=0, atol=1e-5, msg=name)
