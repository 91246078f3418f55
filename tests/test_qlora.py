"""QLoRA: the NF4 storage (torchao), its layouts for odd sizes, training on top, save → load on the
full-precision base, peft, merge and its report, and the CLI. The contract suite runs the
method's rows too (``tests/test_contract.py``, rows ``qlora*``)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.cli import main
from deltatune.data import load_examples, tokenize_examples
from deltatune.errors import DeltatuneError
from deltatune.merge_report import merge_with_report
from deltatune.methods.base_weight import NF4Layout, NF4Weight, nf4_layout, quantize_nf4
from deltatune.methods.lora import LoRALayer, lora_delta, svd_init
from deltatune.methods.qlora import nf4_bits_per_weight, quantized_layers
from deltatune.nf4_model import INDEX_NAME, WEIGHTS_NAME, load_nf4_model, save_nf4_model
from deltatune.peft_format import load_adapter_tensors
from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer
from deltatune.train import TrainConfig, train

from conftest import tiny_gpt2, tiny_llama

NF4_MAX_HALF_GAP = (1.0 - 0.6962) / 2  # the widest gap between NF4 levels is between -1 and -0.6962


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ids(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def randomize(model: dt.DeltaModel, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters(model.active_adapter).values():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.3)


# --- the storage ---------------------------------------------------------------------------
def test_a_4096_square_weight_takes_the_papers_4_127_bits_per_weight():
    weight = quantize_nf4(gaussian(4096, 4096))
    bits = 8 * weight.storage_bytes() / weight.numel()
    # 4-bit codes + an 8-bit scale per 64 + an fp32 factor per 64·256, plus one fp32 mean
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 4096**2, abs=1e-9)
    assert bits <= 4.13


@pytest.mark.parametrize("numel,layout", [
    (4096 * 4096, NF4Layout(64, 256, 4096 * 4096)),  # the paper's layout
    (64 * 64, NF4Layout(64, 64, 64 * 64)),  # stories260K q_proj: 64 blocks, one group of scales
    (64 * 172, NF4Layout(64, 172, 64 * 172)),  # stories260K MLP: 172 blocks, one group
    (192 * 576, NF4Layout(64, 216, 192 * 576)),  # SmolLM2 k_proj: 1728 blocks = 8 groups of 216
    (3 * 172, NF4Layout(64, 9, 9 * 64)),  # 516 values: the 9th block is zero-padded
    (100 * 300, NF4Layout(64, 256, 512 * 64)),  # 469 = 7·67 blocks, no group size fits: padded to 2 groups
])
def test_the_layout_of_a_weight_follows_its_size(numel, layout):
    assert nf4_layout(numel) == layout


def test_dequantised_gaussian_weights_are_within_the_nf4_bound_of_every_block():
    weight = gaussian(256, 1024, seed=2)
    stored = quantize_nf4(weight)
    error = (stored.dequantize() - weight).reshape(-1, 64).abs()  # (blocks, 64)
    absmax = weight.reshape(-1, 64).abs().max(dim=1).values  # (blocks,)
    centred = (absmax - absmax.mean()).reshape(-1, 256).abs().max(dim=1).values  # per group of 256 scales
    # rounding to the nearest level: half the widest gap times the block's absmax; the 8-bit scale
    # is off by at most its step (|centred| / 128 when clamped to 127) times a level of at most 1
    bound = NF4_MAX_HALF_GAP * absmax + centred.repeat_interleave(256) / 128 + 1e-6
    assert (error.max(dim=1).values <= bound).all()
    assert (stored.dequantize() - weight).pow(2).mean().sqrt() < 0.1  # unit Gaussian: about 0.09 rms


@pytest.mark.parametrize("in_features,out_features", [(172, 3), (100, 300), (172, 64), (64, 172), (7, 5)])
def test_odd_layer_sizes_work_as_linear_and_conv1d_layers(in_features, out_features):
    linear = nn.Linear(in_features, out_features)
    conv = Conv1D(out_features, in_features)  # GPT-2: weight (in × out)
    x = gaussian(2, 3, in_features, seed=4)
    for layer in (linear, conv):
        dense = layer.weight.detach().clone()
        layer.weight = nn.Parameter(quantize_nf4(dense), requires_grad=False)
        assert layer.weight.shape == dense.shape and isinstance(layer.weight, NF4Weight)
        assert (layer.weight.dequantize() - dense).abs().max() <= NF4_MAX_HALF_GAP * dense.abs().max() + 1e-3
        deq = layer.weight.dequantize()
        expected = F.linear(x, deq, layer.bias) if layer is linear else x @ deq + layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_the_weight_gets_no_gradient_and_backward_needs_no_dense_copy():
    layer = nn.Linear(64, 32)
    layer.weight = nn.Parameter(quantize_nf4(layer.weight), requires_grad=False)
    x = gaussian(4, 64, seed=5).requires_grad_()
    layer(x).sum().backward()
    assert layer.weight.grad is None
    assert torch.allclose(x.grad, layer.weight.dequantize().sum(dim=0).expand(4, -1), atol=1e-6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum()
    assert not any(t.shape == layer.weight.shape for t in saved)  # the (32 × 64) weight is never saved dense


def holds_no_dense_copy(weight: NF4Weight) -> bool:
    """An NF4 weight is a wrapper without storage of its own; a dense tensor pushed into it through
    ``param.data = ...`` (what ``module.to(dtype)`` did before) would give it one."""
    with torch._C.DisableTorchFunctionSubclass():
        try:
            torch.Tensor.untyped_storage(weight).data_ptr()
        except RuntimeError:  # "invalid python storage": no bytes behind the wrapper
            return True
    return False


def test_casting_the_model_keeps_the_nf4_codes_and_casts_the_rest():
    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4))
    randomize(model)
    nf4 = {name: p for name, p in model.named_parameters() if isinstance(p, NF4Weight)}
    codes = {name: p.packed.quantized_data for name, p in nf4.items()}
    expected = {name: p.dequantize().to(torch.bfloat16) for name, p in nf4.items()}
    model.to(torch.bfloat16)
    after = dict(model.named_parameters())
    for name in nf4:
        weight = after[name]
        assert isinstance(weight, NF4Weight) and weight.dtype == weight.stored_dtype == torch.bfloat16
        assert weight.packed.quantized_data is codes[name] and holds_no_dense_copy(weight)  # still 4 bits, no copy
        assert torch.equal(weight.dequantize(), expected[name])
    assert all(p.dtype == torch.bfloat16 for name, p in after.items() if name not in nf4)  # LoRA, norms, embeddings
    assert model(input_ids=ids()).logits.dtype == torch.bfloat16
    merged = dt.merge(model)
    assert all(type(p) is nn.Parameter and p.dtype == torch.bfloat16 for p in merged.parameters())


def test_nf4_weights_survive_copies_and_moves_but_refuse_writes():
    layer = nn.Linear(64, 64)
    layer.weight = nn.Parameter(quantize_nf4(layer.weight), requires_grad=False)
    moved = layer.to("cpu")
    twin = copy.deepcopy(layer)
    assert isinstance(moved.weight, NF4Weight) and isinstance(twin.weight, NF4Weight)
    assert torch.equal(twin.weight.dequantize(), layer.weight.dequantize())
    assert twin.weight.packed.quantized_data.data_ptr() != layer.weight.packed.quantized_data.data_ptr()
    with pytest.raises(DeltatuneError, match="cannot be changed in place"):
        with torch.no_grad():
            layer.weight.add_(1.0)


# --- the method ----------------------------------------------------------------------------
def test_at_init_the_model_equals_the_quantised_base_and_differs_from_the_full_precision_one():
    method = dt.QLoRA(rank=4)
    model = dt.wrap(tiny_llama(), method)
    quantised = method.prepare_base(tiny_llama())
    assert torch.equal(logits(model, ids()), logits(quantised, ids()))
    assert not torch.allclose(logits(model, ids()), logits(tiny_llama(), ids()), atol=1e-3)
    layers = [m for m in model.modules() if isinstance(m, LoRALayer)]
    assert len(layers) == 14 and all(isinstance(m.base_layer.weight, NF4Weight) for m in layers)  # 7 per layer
    assert not isinstance(model.base_model.lm_head.weight, NF4Weight)  # the head stays
    assert not isinstance(model.base_model.model.embed_tokens.weight, NF4Weight)


def test_a_step_changes_only_lora_and_the_quantised_weights_get_no_optimizer_state():
    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4))
    nf4 = {name: p for name, p in model.named_parameters() if isinstance(p, NF4Weight)}
    before = {name: p.dequantize() for name, p in nf4.items()}
    lora = model.adapter_parameters("default")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    optimizer.step()
    assert {id(p) for p in optimizer.state} == {id(p) for p in lora.values()}
    assert all(p.grad is None and torch.equal(p.dequantize(), before[n]) for n, p in nf4.items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())


def test_bf16_compute_trains_lora_in_bf16_on_an_fp32_model():
    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4, compute_dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in model.adapter_parameters("default").values())
    assert model.base_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    model.train()
    out = model(input_ids=ids(), labels=ids())
    assert out.logits.dtype == torch.float32  # the residual stream keeps the model's dtype
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.adapter_parameters("default").values())


def test_gradient_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4))
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(input_ids=ids(), labels=ids()).loss.backward()
        return {k: p.grad for k, p in model.adapter_parameters("default").items()}

    plain, checkpointed = gradients(False), gradients(True)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_load_adapter_on_the_full_precision_base_rebuilds_the_quantised_model(tmp_path):
    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4, block_size=32, compute_dtype="float32"))
    randomize(model)
    dt.save(model, tmp_path)
    dt.save(dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets="all-linear")), tmp_path / "lora")
    ours, plain = (load_file(str(folder / "adapter_model.safetensors")) for folder in (tmp_path, tmp_path / "lora"))
    assert set(ours) == set(plain)  # the keys of a plain LoRA: A and B, nothing of the quantised base
    described = json.loads((tmp_path / "deltatune_method.json").read_text())
    assert described["method"] == "qlora" and described["settings"]["block_size"] == 32
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["deltatune_quantization"]["layers"]) == 14
    loaded = dt.load_adapter(tiny_llama(), tmp_path)
    settings = lambda method: {k: v for k, v in method.describe().items() if k != "targets"}  # all-linear → names
    assert type(loaded.methods["default"]) is dt.QLoRA
    assert settings(loaded.methods["default"]) == settings(model.methods["default"])
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))


def test_peft_loads_the_folder_as_a_lora_on_the_full_precision_base(tmp_path):
    import peft

    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4))
    randomize(model)
    dt.save(model, tmp_path)
    with pytest.warns(UserWarning, match="deltatune_quantization"):  # peft ignores deltatune's keys, and says so
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    full_precision = dt.wrap(tiny_llama(), model.methods["default"].reference_method())
    load_adapter_tensors(full_precision, "default", load_file(str(tmp_path / "adapter_model.safetensors")))
    assert torch.allclose(logits(theirs, ids()), logits(full_precision, ids()), atol=1e-5)
    # against the training-time model: the quantisation error, which peft's full-precision base does not have
    assert (logits(theirs, ids()) - logits(model, ids())).abs().max() > 1e-3


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_dequantises_and_folds_the_delta_into_a_plain_model(make):
    model = dt.wrap(make(), dt.QLoRA(rank=4))
    randomize(model)
    adapted = logits(model, ids())
    expected = {}
    for path, layer in model.delta_modules():
        if isinstance(layer, LoRALayer):
            expected[path] = layer.base_layer.weight.dequantize().float() + layer.delta("default")
    merged = dt.merge(model)
    assert not any(isinstance(p, NF4Weight) for p in merged.parameters())
    for path, weight in expected.items():
        assert torch.allclose(merged.get_submodule(path).weight, weight, atol=1e-7)
    assert type(merged) is type(make()) and set(merged.state_dict()) == set(make().state_dict())
    assert torch.allclose(logits(merged, ids()), adapted, atol=1e-5)


def test_the_merge_report_gives_float_noise_and_the_quantisation_error(tmp_path):
    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4))
    randomize(model)
    dt.save(model, tmp_path)
    full_precision = dt.wrap(tiny_llama(), dt.LoRA(rank=4, targets="all-linear"))
    load_adapter_tensors(full_precision, "default", load_file(str(tmp_path / "adapter_model.safetensors")))
    prompts = [list(range(3, 12)), list(range(40, 45))]
    reference = torch.cat([logits(full_precision, torch.tensor([p]))[0] for p in prompts])
    merged, report = merge_with_report(dt.load_adapter(tiny_llama(), tmp_path), tmp_path, tiny_llama, prompts)
    out = torch.cat([logits(merged, torch.tensor([p]))[0] for p in prompts])
    assert [d.against for d in report] == ["the adapter model", "the base as loaded + the adapter as lora"]
    assert report[0].max < 1e-5
    assert report[1].max == pytest.approx((out - reference).abs().max().item(), rel=1e-6)
    assert report[1].mean == pytest.approx((out - reference).abs().mean().item(), rel=1e-6)
    assert report[1].max > 1e-3


# --- PiSSA init: the quantised residual (QPiSSA) --------------------------------------------
def test_pissa_quantises_the_residual_so_the_start_is_closer_to_the_full_precision_model():
    full_precision = tiny_llama()
    plain = dt.wrap(tiny_llama(), dt.QLoRA(rank=8))
    pissa = dt.wrap(tiny_llama(), dt.QLoRA(rank=8, init="pissa"))
    for path, layer in pissa.delta_modules():
        weight = full_precision.get_submodule(path).weight.detach()  # (out, in)
        init_A, init_B, _ = svd_init(weight, 8, layer.scaling["default"])
        assert torch.equal(layer.lora_A["default"], init_A) and torch.equal(layer.lora_B["default"], init_B)
        residual = weight - lora_delta(init_A, init_B, layer.scaling["default"])  # W − s·B₀A₀
        assert torch.equal(layer.base_layer.weight.dequantize(), quantize_nf4(residual).dequantize())
        # what the model starts from, vs W: the residual's quantisation error, not W's
        start = layer.base_layer.weight.dequantize() + lora_delta(init_A, init_B, layer.scaling["default"])
        quantised = plain.get_submodule(path).base_layer.weight.dequantize()
        # measured at seed 0: 0.45 to 0.71 of plain QLoRA's error, layer by layer (rank 8 of 32 removed)
        assert (start - weight).norm() < 0.8 * (quantised - weight).norm(), path
    reference = logits(full_precision, ids())
    # measured: 0.48 of plain QLoRA's mean logit error
    assert (logits(pissa, ids()) - reference).abs().mean() < 0.6 * (logits(plain, ids()) - reference).abs().mean()


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_a_pissa_adapter_reloads_onto_the_full_precision_base_to_the_same_codes(tmp_path, compute_dtype):
    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4, init="pissa", compute_dtype=compute_dtype))
    randomize(model)
    dt.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["deltatune_quantization"]["pissa"]["rank"] == 4  # [A; A₀], [B, −B₀] on W
    assert config["deltatune_quantized_base"].endswith("the adapter has rank 4 (the file: rank 8 on W)")  # for info
    loaded = dt.load_adapter(tiny_llama(), tmp_path)
    settings = lambda method: {k: v for k, v in method.describe().items() if k != "targets"}  # all-linear → names
    assert settings(loaded.methods["default"]) == settings(model.methods["default"])
    for (path, ours), (_, theirs) in zip(model.delta_modules(), loaded.delta_modules()):
        for name in ("quantized_data", "quantized_scalers", "quantization_factor"):
            assert torch.equal(getattr(ours.weight.packed, name), getattr(theirs.weight.packed, name)), path
        assert torch.equal(ours.lora_A["default"], theirs.lora_A["default"])
        assert all(torch.equal(a, b) for a, b in zip(ours.svd_init_state["default"], theirs.svd_init_state["default"]))
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))
    with dt.disabled(model), dt.disabled(loaded):  # the base the adapter runs on: deq(nf4(W − s·B₀A₀)) + s·B₀A₀
        assert torch.equal(logits(loaded, ids()), logits(model, ids()))


def test_peft_reads_a_pissa_qlora_folder_as_the_rank_2r_lora_on_the_full_precision_base(tmp_path):
    import peft

    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4, init="pissa"))
    randomize(model)
    dt.save(model, tmp_path)
    reference = model.methods["default"].reference_method()
    assert (reference.rank, reference.alpha, reference.init) == (8, 32.0, "kaiming")
    full_precision = dt.wrap(tiny_llama(), reference)
    load_adapter_tensors(full_precision, "default", load_file(str(tmp_path / "adapter_model.safetensors")))
    with pytest.warns(UserWarning, match="deltatune_quantization"):
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert torch.allclose(logits(theirs, ids()), logits(full_precision, ids()), atol=1e-5)
    # the residual's quantisation error separates them: small, but not float noise
    assert 1e-4 < (logits(theirs, ids()) - logits(model, ids())).abs().max() < 0.5
    merged, report = merge_with_report(dt.load_adapter(tiny_llama(), tmp_path), tmp_path, tiny_llama, [list(range(3, 12))])
    assert report[0].max < 1e-5 and report[1].max > 1e-4


def test_pissa_needs_the_full_precision_weight():
    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4))
    with pytest.raises(DeltatuneError, match="already in NF4, and init='pissa' needs its full-precision weight"):
        model.add_adapter("pissa", dt.QLoRA(rank=4, init="pissa"))


# --- re-quantising a merged model ------------------------------------------------------------
def test_requantize_stores_the_merged_weights_in_nf4_and_reports_what_it_costs(tmp_path):
    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4, block_size=32))
    randomize(model)
    layouts = quantized_layers(model.base_model)
    dt.save(model, tmp_path)
    prompts = [list(range(3, 12)), list(range(40, 45))]
    plain, _ = merge_with_report(dt.load_adapter(tiny_llama(), tmp_path), tmp_path, tiny_llama, prompts)
    merged, report = merge_with_report(dt.load_adapter(tiny_llama(), tmp_path), tmp_path, tiny_llama, prompts,
                                       requantize=True)
    assert quantized_layers(merged) == layouts  # the same layers, layouts and compute dtype as the adapter's base
    for path in layouts:  # nf4(deq(W_nf4) + s·B A), from the merged weights
        assert torch.equal(merged.get_submodule(path).weight.dequantize(),
                           quantize_nf4(plain.get_submodule(path).weight, 32).dequantize())
    before = torch.cat([logits(plain, torch.tensor([p]))[0] for p in prompts])
    after = torch.cat([logits(merged, torch.tensor([p]))[0] for p in prompts])
    line = report[-1]
    assert line.line().startswith("max / mean |logit difference| of the model re-quantised to NF4 vs the merged model")
    assert line.max == pytest.approx((after - before).abs().max().item(), rel=1e-6)
    assert line.mean == pytest.approx((after - before).abs().mean().item(), rel=1e-6)
    assert 1e-4 < line.max


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])  # GPT-2: Conv1D weights, a tied head
def test_an_nf4_model_folder_loads_back_to_the_same_codes(tmp_path, make):
    model = dt.merge(dt.wrap(make(), dt.QLoRA(rank=4)))
    from deltatune.methods.qlora import requantize

    requantize(model)  # a plain model: QLoRA's defaults
    save_nf4_model(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()  # transformers alone refuses it, it does not guess
    loaded = load_nf4_model(tmp_path, type(model))
    ours, theirs = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, weight in ours.items():
        if isinstance(weight, NF4Weight):
            assert isinstance(theirs[name], NF4Weight) and theirs[name].layout == weight.layout
            assert torch.equal(theirs[name].packed.quantized_data, weight.packed.quantized_data)
        else:
            assert torch.equal(theirs[name], weight)
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))
    if make is tiny_gpt2:
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    (tmp_path / INDEX_NAME).write_text(json.dumps({**index, "format": "other/9"}))
    with pytest.raises(DeltatuneError, match="is not a deltatune-nf4-model/1 index"):
        load_nf4_model(tmp_path, type(model))



def test_a_second_adapter_shares_the_quantised_base_and_must_agree_on_its_settings():
    model = dt.wrap(tiny_llama(), dt.QLoRA(rank=4))
    weight = model.base_model.model.layers[0].self_attn.q_proj.weight
    model.add_adapter("second", dt.QLoRA(rank=2))
    assert model.base_model.model.layers[0].self_attn.q_proj.weight is weight  # not quantised twice
    with pytest.raises(DeltatuneError, match="same block_size"):
        model.add_adapter("third", dt.QLoRA(rank=2, block_size=32))


def test_quantising_under_an_adapter_that_runs_on_full_precision_weights_is_refused():
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4))
    with pytest.raises(DeltatuneError, match="add the QLoRA adapter first"):
        model.add_adapter("quantised", dt.QLoRA(rank=4, targets=["q_proj"]))
    assert not any(isinstance(p, NF4Weight) for p in model.parameters())


@pytest.mark.parametrize("settings,message", [
    ({"block_size": 63}, "block_size must be even"),
    ({"compute_dtype": "float16"}, "compute_dtype 'float16' is unknown"),
    ({"scaler_block_size": 0}, "scaler_block_size must be a whole number"),
])
def test_bad_settings_are_refused_in_one_sentence(settings, message):
    with pytest.raises(DeltatuneError, match=re.escape(message)):
        dt.QLoRA(**settings)


def test_the_bitsandbytes_backend_is_refused_in_one_sentence():
    with pytest.raises(DeltatuneError, match="backend='bitsandbytes'.*use backend='torchao'"):
        dt.wrap(tiny_llama(), dt.QLoRA(backend="bitsandbytes"))


def test_asking_for_the_gpu_only_backend_on_a_cpu_machine_is_one_sentence_from_the_cli(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeltatuneError) as refused:
        dt.wrap(tiny_llama(), dt.QLoRA(backend="bitsandbytes"))
    assert str(refused.value) == ("backend='bitsandbytes' needs a CUDA GPU and this machine has none; use "
                                  "backend='torchao', whose NF4 runs on CPU and GPU.")
    assert main(["train", "--model", str(bundled("stories260K")), "--data", str(bundled("e2e/train.jsonl")),
                 "--method", "qlora", "--max-steps", "1", "--output", str(tmp_path / "run"), "--quiet",
                 "backend=bitsandbytes"]) == 1
    assert capsys.readouterr().err.strip() == f"deltatune: error: {refused.value}"


def test_bits_per_weight_of_the_bundled_model():
    model = dt.wrap(load_causal_lm(bundled("stories260K")), dt.QLoRA())
    # every layer is smaller than one group of 256 scales: 4 + 8/64 + (32 per group + 32) / numel
    assert 4.125 < nf4_bits_per_weight(model) < 4.135


# --- real training and the CLI -------------------------------------------------------------
def test_qlora_lowers_held_out_loss_on_real_text(stories_dir, tmp_path):
    tokenizer = load_tokenizer(stories_dir)
    tokens = lambda name, count: tokenize_examples(load_examples(bundled(f"e2e/{name}.jsonl"))[:count], tokenizer, 256)
    model = dt.wrap(load_causal_lm(stories_dir), dt.QLoRA(rank=8, alpha=16))
    config = TrainConfig(max_steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=5, eval_every=30)
    result = train(model, tokens("train", 240), tokens("eval", 24), config, tmp_path, pad_token_id=2,
                   save_model=dt.save, progress=False)
    (_, before), (_, after) = result.eval_losses[0], result.eval_losses[-1]
    assert after < 0.7 * before, (before, after)


def test_the_cli_trains_reports_and_merges_on_bundled_defaults(tmp_path, capsys):
    output = tmp_path / "q_run"
    assert main(["train", "--model", str(bundled("stories260K")), "--data", str(bundled("e2e/train.jsonl")),
                 "--method", "qlora", "--max-steps", "20", "--output", str(output), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 20
    assert main(["info", str(output)]) == 0
    info = capsys.readouterr().out
    assert "LORA (qlora)" in info and re.search(r"quantised base\s+NF4, compute float32: 35 linear layers", info)
    assert "172 blocks" not in info and "8-bit scales in groups of 172 (down_proj, gate_proj, up_proj)" in info
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(bundled("stories260K")), "--adapter", str(output), "--output", str(merged)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    noise, quantisation = (float(re.search(r": ([0-9.e+-]+) /", line).group(1)) for line in lines[1:])
    assert "vs the adapter model" in lines[1] and "vs the base as loaded + the adapter as lora" in lines[2]
    assert noise < 1e-4 < quantisation
    plain = load_causal_lm(merged)
    assert all(type(p) is nn.Parameter for p in plain.parameters())
    # --requantize: an NF4 folder, which deltatune loads and generates from; it replaces the plain weights
    assert main(["merge", "--model", str(bundled("stories260K")), "--adapter", str(output), "--output", str(merged),
                 "--overwrite", "--requantize"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "of the model re-quantised to NF4 vs the merged model before re-quantising" in lines[3]
    assert (merged / WEIGHTS_NAME).is_file() and not (merged / "model.safetensors").exists()
    quantised = load_causal_lm(merged)
    assert sum(isinstance(p, NF4Weight) for p in quantised.parameters()) == 35
    assert main(["generate", "--model", str(merged), "--prompt", "Once upon a time", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")
