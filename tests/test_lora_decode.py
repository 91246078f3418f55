"""LoRA's no-grad path (decoding, evaluation): the layer reads its tensors from the module dicts
directly and runs two in-place matmuls. Its output is the grad-enabled kernel's bit for bit where
it runs, and equals h = W x + b + s·B A x (or the general path) in every other setting."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lora import LoRALayer

from conftest import tiny_llama


def layer_with(bias: bool = True, **adapter) -> LoRALayer:
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(16, 12, bias=bias))
    layer.base_layer.requires_grad_(False)
    layer.add_adapter("default", **{"rank": 4, "alpha": 8, **adapter})
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    return layer.eval()


def reference(layer: LoRALayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """W x + b + s·B A x, written out."""
    base = layer.base_layer
    out = x @ base.weight.T + (base.bias if base.bias is not None else 0)
    return out + layer.scaling[name] * (x @ layer.lora_A[name].T @ layer.lora_B[name].T)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 16), (3, 5, 16), (7, 16)])
def test_without_grad_it_is_the_grad_kernel_bit_for_bit(bias, shape):
    layer = layer_with(bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert layer._fused_terms(x) is not None  # the fast path runs
        fast = layer(x)
    assert torch.equal(fast, layer(x))  # grad enabled: the fused autograd kernel
    torch.testing.assert_close(fast, reference(layer, x), rtol=0, atol=1e-5)


def test_settings_it_does_not_cover_take_the_general_path():
    x = torch.randn(2, 3, 16)
    cases = {"two adapters": layer_with(), "merged": layer_with(), "autocast": layer_with()}
    cases["two adapters"].add_adapter("other", rank=2, alpha=2)
    cases["two adapters"].set_active(["default", "other"])
    cases["merged"].merge(["default"])
    for what, layer in cases.items():
        with torch.no_grad(), torch.autocast("cpu", enabled=what == "autocast"):
            assert layer._fused_terms(x) is None, what
    with torch.no_grad():  # and what they give is still W x + Σ s·B A x
        both = cases["two adapters"]
        torch.testing.assert_close(both(x), reference(both, x) + both.scaling["other"] * (
            x @ both.lora_A["other"].T @ both.lora_B["other"].T), rtol=0, atol=1e-5)
        torch.testing.assert_close(cases["merged"](x), reference(layer_with(), x), rtol=0, atol=1e-5)


def test_an_own_bias_a_running_pissa_adapter_and_dropout_take_the_fast_path_too():
    x = torch.randn(2, 3, 16)
    own_bias = layer_with(train_bias=True)
    with torch.no_grad():
        own_bias.biases["default"].normal_()
        assert own_bias._fused_terms(x) is not None
        torch.testing.assert_close(own_bias(x), reference(own_bias, x) - own_bias.bias + own_bias.biases["default"],
                                   rtol=0, atol=1e-5)
    pissa = layer_with(init="pissa")  # W holds the residual W − s·B₀A₀; the running adapter adds s·B A
    original = layer_with().base_layer.weight
    with torch.no_grad():
        assert pissa._fused_terms(x) is not None
        torch.testing.assert_close(pissa(x), reference(pissa, x), rtol=0, atol=1e-5)
        pissa.set_active([])  # switched off: W's s·B₀A₀ comes back through the general path
        torch.testing.assert_close(pissa(x), x @ original.T + pissa.bias, rtol=0, atol=1e-5)
    dropped = layer_with(dropout=0.5).train()
    with torch.no_grad():
        assert dropped._fused_terms(x) is not None
        with mock.patch("torch.nn.functional.dropout", side_effect=lambda x, p, *a, **k: x * 0) as dropout:
            torch.testing.assert_close(dropped(x), dropped.base_layer(x), rtol=0, atol=1e-6)  # every input dropped
        assert dropout.call_args.args[1] == 0.5


def test_unmerged_decoding_gives_the_merged_models_tokens():
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, alpha=8, targets="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.adapter_parameters("default").values():
            param.add_(torch.randn_like(param) * 0.2)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        unmerged = model.generate(input_ids=prompt, **kwargs)
        logits = model(input_ids=prompt).logits
        with dt.disabled(model):
            base = model(input_ids=prompt).logits
    merged = dt.merge(model)
    with torch.no_grad():
        assert torch.equal(merged.generate(input_ids=prompt, **kwargs), unmerged)
        torch.testing.assert_close(merged(input_ids=prompt).logits, logits, rtol=0, atol=1e-5)
    assert not torch.allclose(base, logits, atol=1e-3)  # the adapter changes the output


def change_lora_B_in_place(layer):  # an optimizer step
    with torch.no_grad():
        layer.lora_B["default"].add_(1.0)


def replace_lora_A_data(layer):
    layer.lora_A["default"].data = torch.randn(4, 16)


def replace_weight_data(layer):
    layer.base_layer.weight.data = torch.randn(12, 16)


def switch_adapter(layer):
    layer.add_adapter("other", rank=2, alpha=6)
    with torch.no_grad():
        layer.lora_B["other"].normal_()
    layer.set_active(["other"])


def re_add_adapter(layer):
    layer.delete_adapter("default")
    layer.add_adapter("default", rank=3, alpha=3)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    layer.set_active(["default"])


def change_scale(layer):
    layer.scaling["default"] = 0.25


def to_float64(layer):
    layer.double()


def merge_it(layer):
    layer.merge(["default"])


def unmerge_it(layer):
    layer.merge(["default"])
    layer.unmerge()


@pytest.mark.parametrize("change", [change_lora_B_in_place, replace_lora_A_data, replace_weight_data, switch_adapter,
                                    re_add_adapter, change_scale, to_float64, merge_it, unmerge_it])
def test_the_kept_plan_follows_every_change_to_the_layer(change):
    """After any change to the layer (made between two no-grad calls), its output is still
    W x + b + s·B A x of what the layer holds now."""
    layer = layer_with()
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        layer(x)
        change(layer)
        x = x.to(layer.base_layer.weight.dtype)
        name = layer.active_adapters[0]
        expected = reference(layer, x, name) if not layer.merged_adapters else x @ layer.base_layer.weight.T + layer.bias
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)

