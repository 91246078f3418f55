"""A batch mixing LoRA adapters per example runs every row's adapter in two batched matmuls
(methods/per_example.py). Invariants: each row equals that adapter alone, gradients included, with
ranks that differ, a layer an adapter does not touch, and rows on the base; a factor changed in
place is seen by the next batch (the stacked factors kept between no-grad calls are refreshed)."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.methods.lora import LoRALayer
from deltatune.methods.per_example import FEW_TOKENS, add_per_example_low_rank, stacked_factors

from conftest import tiny_llama


def two_adapters() -> dt.DeltaModel:
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets="all-linear"), adapter_name="a")
    model.add_adapter("b", dt.LoRA(rank=2, targets=["q_proj"]))  # rank 2, and only on q_proj
    torch.manual_seed(3)
    with torch.no_grad():
        for name in ("a", "b"):
            for param in model.adapter_parameters(name).values():
                param.copy_(torch.randn_like(param) * 0.1)
    model.set_adapter("a")
    return model


def ids(batch: int = 4, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("slots", [[1, 2, 0], [1, 1, 1], [2, 2, 2], [2, 0, 2]],
                         ids=["b, base, a", "b only", "base only", "a and base"])
@pytest.mark.parametrize("tokens", [1, FEW_TOKENS, FEW_TOKENS + 1, 9], ids=lambda n: f"{n} tokens")
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no grad"])
def test_the_kernel_is_each_rows_own_low_rank_term(tokens, slots, grad):
    torch.manual_seed(0)
    x, out = torch.randn(3, tokens, 8), torch.randn(3, tokens, 6)
    factors = [(torch.randn(4, 8), torch.randn(6, 4), 0.5), (torch.randn(2, 8), torch.randn(6, 2), 2.0)]
    slots = torch.tensor(slots)  # slot 2 is the zero slot: no adapter
    with torch.set_grad_enabled(grad):
        got = add_per_example_low_rank(out.clone(), x, stacked_factors(factors, torch.float32), slots)
    for row, slot in enumerate(slots.tolist()):
        lora_A, lora_B, scale = factors[slot] if slot < 2 else (torch.zeros(1, 8), torch.zeros(6, 1), 0.0)
        want = out[row] + scale * (x[row] @ lora_A.T) @ lora_B.T
        assert torch.allclose(got[row], want, atol=1e-6)


@pytest.mark.parametrize("length", [2, 6], ids=["few tokens", "many tokens"])
def test_mixed_rows_and_their_gradients_equal_each_adapter_alone(length):
    model, names = two_adapters(), ["a", "b", "__base__", "a"]
    weights = torch.randn(4, length, 128, generator=torch.Generator().manual_seed(1))
    mixed = model(input_ids=ids(length=length), adapter_names=names).logits
    (mixed * weights).sum().backward()
    trained = model.adapter_parameters("a")
    got = {key: param.grad.clone() for key, param in trained.items()}
    model.zero_grad()
    rows = [0, 3]  # the rows on "a", alone: the same loss terms
    alone = model(input_ids=ids(length=length)[rows]).logits
    (alone * weights[rows]).sum().backward()
    assert torch.allclose(mixed[rows], alone, atol=1e-5)
    for key, param in trained.items():
        assert torch.allclose(got[key], param.grad, atol=1e-5), key
    with torch.no_grad(), dt.disabled(model):
        assert torch.allclose(mixed[2], model(input_ids=ids(length=length)[[2]]).logits[0], atol=1e-5)


def test_a_factor_changed_in_place_is_seen_by_the_next_mixed_batch():
    model, names = two_adapters(), ["b", "a", "b", "a"]
    with torch.no_grad():
        model(input_ids=ids(), adapter_names=names)  # the stacked factors are kept now
        assert any("_stacked_cache" in vars(m) for m in model.modules() if isinstance(m, LoRALayer))
        for param in model.adapter_parameters("b").values():
            param.mul_(3.0)
        mixed = model(input_ids=ids(), adapter_names=names).logits
        model.set_adapter("b")
        assert torch.allclose(mixed[[0, 2]], model(input_ids=ids()[[0, 2]]).logits, atol=1e-5)


def test_mixed_greedy_decoding_gives_each_row_its_own_adapters_tokens():
    """Decoding runs the few-tokens path in place, with the stack and the row masks kept between steps."""
    model, names = two_adapters(), ["b", "a", "__base__", "a"]
    prompts = ids(length=5)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=prompts, adapter_names=names, **kwargs)
        for name in ("a", "b"):
            rows = [row for row, n in enumerate(names) if n == name]
            model.set_adapter(name)
            assert torch.equal(mixed[rows], model.generate(input_ids=prompts[rows], **kwargs)), name
        with dt.disabled(model):
            assert torch.equal(mixed[[2]], model.generate(input_ids=prompts[[2]], **kwargs))


def test_layers_an_adapter_adds_after_a_mixed_batch_are_routed_too():
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets=["q_proj"]), adapter_name="a")
    with torch.no_grad():
        model(input_ids=ids(), adapter_names=["a", "__base__", "a", "a"])  # routes the q_proj layers
        model.add_adapter("b", dt.LoRA(rank=2, targets="all-linear"))  # layers that were plain before
        for param in model.adapter_parameters("b").values():
            param.copy_(torch.randn_like(param) * 0.1)
        names = ["a", "b", "__base__", "b"]
        mixed = model(input_ids=ids(), adapter_names=names).logits
        model.set_adapter("b")
        assert torch.allclose(mixed[[1, 3]], model(input_ids=ids()[[1, 3]]).logits, atol=1e-5)
        model.set_adapter("a")
        assert torch.allclose(mixed[[0]], model(input_ids=ids()[[0]]).logits, atol=1e-5)
        with dt.disabled(model):
            assert torch.allclose(mixed[[2]], model(input_ids=ids()[[2]]).logits, atol=1e-5)
        model.delete_adapter("b")  # its layers go back to plain ones
        mixed = model(input_ids=ids(), adapter_names=["__base__", "a", "a", "__base__"]).logits
        model.set_adapter("a")
        assert torch.allclose(mixed[[1, 2]], model(input_ids=ids()[[1, 2]]).logits, atol=1e-5)
