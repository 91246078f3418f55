"""One contract for every method: each registry row runs on each tiny architecture through the
same closed-form invariants. A method that cannot honour one declares it (``capabilities()``), and
the suite checks the declared refusal instead. Adding a method costs one row in ``ROWS``.

Invariants (each a test below, parametrised over every (row, architecture) cell):
- at init the output equals the base (or keeps the base's shape, for prompt methods);
- inside ``disabled()`` the output equals the base, and after it the adapted output returns;
- merged = unmerged = unloaded; merge then unmerge restores every base tensor, ties kept;
  unmerge with nothing merged touches nothing;
- after one optimizer step only the method's parameters changed;
- save → load is exact; peft loads what peft can express (with equal logits);
- the peft tensors from a gathered copy of the parameters equal those from the live ones;
- gradient checkpointing gives equal gradients; generation with the cache equals without;
  a padded batch equals its examples alone; per-example adapters equal each adapter alone;
- resume from a checkpoint is exact (on the Llama architecture, for every row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.errors import DeltatuneError
from deltatune.methods import METHODS, DeltaModule
from deltatune.peft_format import adapter_state_dict, load_adapter_tensors
from deltatune.train import TrainConfig, train

from conftest import TINY_ARCHITECTURES

GENERATIVE = ("llama", "gpt2", "gpt_neox", "bart", "t5")
CLASSIFIERS = ("bert_cls", "llama_cls")
DECODER_IDS = torch.tensor([[0, 5, 9, 11, 3]])  # fixed decoder tokens for encoder–decoder models
# PiSSA splits W into W_res + s·B A in fp32 (and gives s·B₀A₀ back while off), and a merge rounds
# W + s·B A once: equal up to rounding, which T5's unscaled logits (about 10) carry as ~4e-5
TOLERANCE = 5e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=TOLERANCE)


def head_name(model: nn.Module) -> str:
    return next(n for n in ("lm_head", "embed_out", "classifier", "score") if isinstance(getattr(model, n, None), nn.Module))


def embedding_path(model: nn.Module) -> str:
    """The input embedding the model calls (BART and T5 call encoder/decoder.embed_tokens, which
    share their weight with ``shared``, the module get_input_embeddings returns)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "embed_tokens"
    embedding = model.get_input_embeddings()
    return next(path for path, module in model.named_modules() if module is embedding)


@dataclass(frozen=True)
class Row:
    """One registry entry with its option variant: ``make(model)`` builds the method for a model."""

    make: Callable[[nn.Module], dt.Method]
    archs: tuple[str, ...] = tuple(TINY_ARCHITECTURES)
    slots: tuple[int, int] = (0, 0)  # template slots (negative ids) before and after the text
    refuses: tuple[str, ...] = ()  # architectures the method refuses with one clear sentence


PROMPT_ARCHS = ("llama", "gpt2", "gpt_neox", "bert_cls", "llama_cls")  # the input-side methods: no encoder–decoder


ROWS = {
    "lora": Row(lambda m: dt.LoRA(rank=4)),
    "lora-all-linear-dropout": Row(lambda m: dt.LoRA(rank=4, targets="all-linear", dropout=0.1)),
    "lora-rslora-gaussian": Row(lambda m: dt.LoRA(rank=4, rslora=True, init="gaussian"), archs=("llama", "gpt2")),
    "lora-pissa": Row(lambda m: dt.LoRA(rank=4, alpha=4, init="pissa", targets="all-linear")),
    "lora-bias-lora-only": Row(lambda m: dt.LoRA(rank=4, bias="lora_only")),
    "lora-bias-all": Row(lambda m: dt.LoRA(rank=4, bias="all")),
    "lora-modules-to-save": Row(lambda m: dt.LoRA(rank=4, modules_to_save=(head_name(m),))),
    "lora-embedding": Row(lambda m: dt.LoRA(rank=4, targets=[embedding_path(m)])),
    "prompt": Row(lambda m: dt.PromptTuning(num_virtual_tokens=4), archs=PROMPT_ARCHS, refuses=("bart", "t5")),
    "ptuning-mlp": Row(lambda m: dt.PTuning(num_virtual_tokens=4, encoder_hidden_size=16), archs=PROMPT_ARCHS,
                       refuses=("bart", "t5")),
    "ptuning-lstm": Row(lambda m: dt.PTuning(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=8),
                        archs=("llama", "gpt2", "bert_cls")),
    "ptuning-template": Row(lambda m: dt.PTuning(template="{prompt:2} {text} {prompt:2}", encoder_hidden_size=16),
                            archs=PROMPT_ARCHS, slots=(2, 2)),
    "prefix": Row(lambda m: dt.PrefixTuning(num_virtual_tokens=4, projection_hidden_size=16)),
    "prefix-no-projection": Row(lambda m: dt.PrefixTuning(num_virtual_tokens=4, projection=False)),
    "ptuning-v2": Row(lambda m: dt.PTuningV2(num_virtual_tokens=6)),
    "full": Row(lambda m: dt.FullFineTuning()),
    "freeze": Row(lambda m: dt.FreezeTuning(trainable_layers=1)),
    "adapter-houlsby": Row(lambda m: dt.Adapter(preset="houlsby")),
    "adapter-pfeiffer": Row(lambda m: dt.Adapter(preset="pfeiffer", bottleneck_size=4, layer_norm=True, dropout=0.1)),
    "adapter-parallel": Row(lambda m: dt.Adapter(preset="parallel", activation="gelu", layers=(-1,))),
    # every linear layer but the head in NF4, LoRA on each. Not T5: its NF4-rounded weights make the
    # decoder's first self-attention amplify fp32 rounding, so checkpointed gradients differ by 8e-4
    # (relative) from plain ones — as much for plain LoRA on the same weights dequantised
    "qlora": Row(lambda m: dt.QLoRA(rank=4), archs=tuple(a for a in TINY_ARCHITECTURES if a != "t5")),
    "qlora-options": Row(lambda m: dt.QLoRA(rank=4, targets=None, rslora=True, bias="all", block_size=32,
                                            scaler_block_size=4), archs=("llama", "gpt2", "bert_cls", "t5")),
}
CELLS = [(row, arch) for row in ROWS for arch in ROWS[row].archs]


def test_every_registry_entry_has_a_row():
    made = {type(ROWS[row].make(TINY_ARCHITECTURES["llama"]())) for row in ROWS}
    assert set(METHODS.values()) <= made


@pytest.mark.parametrize("row,arch", [(row, arch) for row in ROWS for arch in ROWS[row].refuses])
def test_an_unsupported_architecture_is_refused_in_one_sentence(row, arch):
    base = build(arch)
    with pytest.raises(DeltatuneError, match="not encoder–decoder"):
        dt.wrap(base, ROWS[row].make(base))


# --- helpers ---------------------------------------------------------------------------------
def build(arch: str, seed: int = 0) -> nn.Module:
    return TINY_ARCHITECTURES[arch](seed)


def prepared_base(row: str, arch: str) -> nn.Module:
    """The base as the row's method runs it (``Method.prepare_base``): the model itself, or for
    QLoRA its target layers in NF4. "Equals the base" and ``disabled()`` are about this model."""
    base = build(arch)
    return ROWS[row].make(base).prepare_base(base)


def wrapped(row: str, arch: str, seed: int = 0) -> dt.DeltaModel:
    base = build(arch, seed)
    return dt.wrap(base, ROWS[row].make(base))


def plain_ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def adapted_ids(row: str, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with the row's template slots around the text (virtual token k is id -(k+1))."""
    before, after = ROWS[row].slots
    slots = lambda start, count: torch.arange(-start - 1, -start - count - 1, -1).expand(ids.shape[0], -1)
    return torch.cat([slots(0, before), ids, slots(before, after)], dim=1)


def call_kwargs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = DECODER_IDS.expand(ids.shape[0], -1)
    return kwargs


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(**call_kwargs(model, ids, mask)).logits


def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    kwargs = call_kwargs(model, ids)
    if type(model.base_model if isinstance(model, dt.DeltaModel) else model).__name__.endswith("Classification"):
        kwargs["labels"] = torch.arange(ids.shape[0]) % 2
    elif model.config.is_encoder_decoder:
        kwargs["labels"] = kwargs["decoder_input_ids"].clone()
    else:
        kwargs["labels"] = ids.clamp(min=0)
    return model(**kwargs).loss


def randomize(model: dt.DeltaModel, seed: int = 7, scale: float = 0.3) -> None:
    """Moderate random values for every adapter parameter, so every delta is visibly non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters(model.active_adapter).values():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def base_tensor_views(model: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """For every parameter and buffer of the unwrapped model, a getter that reads its live value
    later through the module that owns it (wrappers keep the original modules as their base)."""
    views = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name in [*module._parameters, *module._buffers]:
            if getattr(module, name, None) is not None:
                views[f"{path}.{name}"] = (lambda m=module, n=name: getattr(m, n))
    return views


def tie_groups(views: dict[str, Callable[[], torch.Tensor]]) -> list[set[str]]:
    groups: dict[int, set[str]] = {}
    for key, read in views.items():
        groups.setdefault(id(read()), set()).add(key)
    return sorted((g for g in groups.values() if len(g) > 1), key=sorted)


def snapshot(views: dict[str, Callable[[], torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: read().detach().clone() for key, read in views.items()}


# --- the invariants ----------------------------------------------------------------------------
@pytest.mark.parametrize("row,arch", CELLS)
def test_output_at_init(row, arch):
    ids = plain_ids()
    reference = logits(prepared_base(row, arch), ids)
    model = wrapped(row, arch)
    out = logits(model, adapted_ids(row, ids))
    assert out.shape[0] == reference.shape[0] and out.shape[-1] == reference.shape[-1]
    if model.methods["default"].capabilities().equals_base_at_init:
        assert torch.allclose(out, reference, atol=TOLERANCE)
    else:  # the virtual positions are dropped: the base model's shape
        assert out.shape == logits(build(arch), adapted_ids(row, ids).clamp(min=0)).shape


@pytest.mark.parametrize("row,arch", CELLS)
def test_disabled_gives_the_base_and_the_adapter_returns_after(row, arch):
    ids = plain_ids()
    reference = logits(prepared_base(row, arch), ids)
    model = wrapped(row, arch)
    randomize(model)
    adapted = logits(model, adapted_ids(row, ids))
    assert not torch.allclose(adapted[..., : reference.shape[1], :] if adapted.dim() == 3 else adapted,
                              reference[..., : adapted.shape[1], :] if reference.dim() == 3 else reference,
                              atol=1e-4), "the randomized adapter changes nothing: the test would prove nothing"
    if not model.methods["default"].capabilities().reversible:
        with pytest.raises(DeltatuneError):
            with dt.disabled(model):
                pass
        return
    with dt.disabled(model):
        assert torch.allclose(logits(model, ids), reference, atol=TOLERANCE)
    assert torch.equal(logits(model, adapted_ids(row, ids)), adapted)


@pytest.mark.parametrize("row,arch", CELLS)
def test_merge_unmerge_and_unload(row, arch):
    ids = adapted_ids(row, plain_ids())
    base = build(arch)
    views = base_tensor_views(base)
    ties = tie_groups(views)
    model = dt.wrap(base, ROWS[row].make(base))
    randomize(model)
    adapted = logits(model, ids)
    before = snapshot(views)
    model.unmerge_adapter()  # nothing is merged: nothing may change, not even a tensor's identity
    assert tie_groups(views) == ties
    assert all(torch.equal(before[k], read()) for k, read in views.items())
    if not model.methods["default"].capabilities().mergeable:
        with pytest.raises(DeltatuneError):
            dt.merge(model)
        return
    model.merge_adapter()
    assert close(logits(model, ids), adapted)
    if model.methods["default"].capabilities().reversible:  # disabled() unmerges meanwhile, then merges back
        with dt.disabled(model):
            assert close(logits(model, plain_ids()), logits(prepared_base(row, arch), plain_ids()))
        assert close(logits(model, ids), adapted)
    model.unmerge_adapter()
    assert tie_groups(views) == ties
    for key, read in views.items():  # W + s·B A − s·B A: equal up to one rounding
        assert torch.allclose(read(), before[key], atol=1e-6), key
    assert close(logits(model, ids), adapted)
    plain = dt.merge(model)
    assert not any(isinstance(m, DeltaModule) for m in plain.modules())
    assert type(plain) is type(build(arch)) and set(plain.state_dict()) == set(build(arch).state_dict())
    assert close(logits(plain, ids), adapted)


@pytest.mark.parametrize("row,arch", CELLS)
def test_one_optimizer_step_changes_only_the_method_parameters(row, arch):
    base = build(arch)
    views = base_tensor_views(base)
    model = dt.wrap(base, ROWS[row].make(base))
    mine = model.adapter_parameters("default")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in mine.values()}
    untouched = {k: read() for k, read in views.items() if id(read()) not in {id(p) for p in mine.values()}}
    before_base = {k: t.detach().clone() for k, t in untouched.items()}
    before_mine = {k: p.detach().clone() for k, p in mine.items()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    loss(model, adapted_ids(row, plain_ids())).backward()
    optimizer.step()
    for key in untouched:
        assert torch.equal(views[key](), before_base[key]), f"{key} changed but is not the method's"
    assert any(not torch.equal(p, before_mine[k]) for k, p in mine.items())


@pytest.mark.parametrize("row,arch", CELLS)
def test_save_load_is_exact_and_peft_loads_what_it_can_express(row, arch, tmp_path):
    ids = adapted_ids(row, plain_ids())
    model = wrapped(row, arch)
    randomize(model)
    adapted = logits(model, ids)
    dt.save(model, tmp_path)
    if model.methods["default"].artifact == "model":  # a whole model folder
        assert torch.equal(logits(type(model.base_model).from_pretrained(tmp_path).eval(), ids), adapted)
        return
    loaded = logits(dt.load_adapter(build(arch), tmp_path), ids)
    assert torch.equal(loaded, adapted) if model.methods["default"].capabilities().exact_reload else close(loaded, adapted)
    resumed = dt.load_adapter(build(arch), tmp_path, trainable=True)  # the training-time form
    for key, param in model.adapter_parameters("default").items():
        assert torch.equal(resumed.adapter_parameters("default")[key], param), key
    reason = model.methods["default"].peft_incompatibility(model.base_model)
    if reason is None:
        import peft

        theirs = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
        theirs_logits = logits(theirs, ids)
        if theirs_logits.dim() == 3:  # peft keeps the virtual positions in the logits; deltatune drops them
            theirs_logits = theirs_logits[:, -adapted.shape[1]:]
        reference = model.methods["default"].reference_method()  # peft runs the adapter on the base as loaded
        if reference != model.methods["default"]:  # (QLoRA: the same LoRA on the full-precision weights)
            twin = dt.wrap(build(arch), reference)
            load_adapter_tensors(twin, "default", load_file(str(tmp_path / "adapter_model.safetensors")))
            adapted = logits(twin, ids)
        assert close(theirs_logits, adapted)
    else:
        assert "peft" in reason


@pytest.mark.parametrize("row,arch", CELLS)
def test_peft_tensors_from_a_gathered_copy_equal_the_live_ones(row, arch):
    model = wrapped(row, arch)
    randomize(model)
    gathered = {k: p.detach().clone() for k, p in model.adapter_parameters("default").items()}
    live = adapter_state_dict(model, "default")
    from_copy = adapter_state_dict(model, "default", gathered)
    assert live.keys() == from_copy.keys()
    assert all(torch.equal(live[k], from_copy[k]) for k in live)
    shifted = {k: t + 0.5 for k, t in gathered.items()}  # a copy that differs from the live parameters
    randomize(model, seed=0, scale=0.0)
    with torch.no_grad():
        for key, param in model.adapter_parameters("default").items():
            param.copy_(shifted[key])
    after = adapter_state_dict(model, "default")
    assert all(torch.allclose(after[k], t, atol=1e-6) for k, t in adapter_state_dict(model, "default", shifted).items())


@pytest.mark.parametrize("row", [r for r in ROWS if "llama" in ROWS[r].archs])
def test_saving_a_gathered_copy_writes_what_saving_those_values_live_writes(row, tmp_path):
    model = wrapped(row, "llama")
    randomize(model)
    gathered = {k: p.detach().clone() + 0.25 for k, p in model.adapter_parameters("default").items()}
    dt.save(model, tmp_path / "gathered", parameters=gathered)
    with torch.no_grad():
        for key, param in model.adapter_parameters("default").items():
            param.copy_(gathered[key])
    dt.save(model, tmp_path / "live")
    for name in ("adapter_model.safetensors", "adapter_training_state.safetensors", "model.safetensors"):
        if (tmp_path / "live" / name).is_file():
            live, copy = load_file(str(tmp_path / "live" / name)), load_file(str(tmp_path / "gathered" / name))
            assert live.keys() == copy.keys() and all(torch.allclose(live[k], copy[k], atol=1e-6) for k in live)


@pytest.mark.parametrize("row,arch", CELLS)
def test_gradient_checkpointing_gives_equal_gradients(row, arch):
    ids = adapted_ids(row, plain_ids())

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = wrapped(row, arch)
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(0)  # the same dropout masks in both runs
        loss(model, ids).backward()
        return {k: p.grad for k, p in model.adapter_parameters("default").items() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and plain
    for key in plain:
        assert close(plain[key], checkpointed[key]), key


@pytest.mark.parametrize("row,arch", [(r, a) for r, a in CELLS if a in GENERATIVE])
def test_generation_with_the_cache_equals_without(row, arch):
    model = wrapped(row, arch)
    randomize(model)
    ids = adapted_ids(row, plain_ids(length=5))

    def greedy(use_cache: bool) -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                 min_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0)
        return out[:, -5:]

    assert torch.equal(greedy(True), greedy(False))


@pytest.mark.parametrize("row,arch", CELLS)
def test_a_padded_batch_equals_its_examples_alone(row, arch):
    model = wrapped(row, arch)
    randomize(model)
    short, long = adapted_ids(row, plain_ids(1, 4, seed=1)), adapted_ids(row, plain_ids(1, 7, seed=2))
    pad = long.shape[1] - short.shape[1]
    left = arch not in ("bert_cls", "bart", "t5")  # decoders pad on the left (as for generation), encoders on the right
    zeros, ones = torch.zeros(1, pad, dtype=torch.long), torch.ones(1, short.shape[1], dtype=torch.long)
    padded = torch.cat([zeros, short], 1) if left else torch.cat([short, zeros], 1)
    mask = torch.cat([torch.cat([zeros, ones], 1) if left else torch.cat([ones, zeros], 1), torch.ones_like(long)])
    kwargs = call_kwargs(model, torch.cat([padded, long]), mask)
    if left:  # positions count real tokens only, as generate() computes them
        kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(**kwargs).logits
    alone_short, alone_long = logits(model, short), logits(model, long)
    assert close(batch[1], alone_long[0])
    if batch.dim() == 2 or model.config.is_encoder_decoder:  # one row per example, or decoder positions
        assert close(batch[0], alone_short[0])
    else:  # the real positions of the padded example
        real = batch[0, pad:] if left else batch[0, : short.shape[1]]
        assert close(real, alone_short[0])


@pytest.mark.parametrize("row,arch", CELLS)
def test_per_example_adapters_equal_each_adapter_alone(row, arch):
    base = build(arch)
    model = dt.wrap(base, ROWS[row].make(base), adapter_name="a")
    randomize(model, seed=1)
    ids = adapted_ids(row, plain_ids(3))
    if not model.methods["a"].capabilities().per_example_adapters:
        with pytest.raises(DeltatuneError, match="per example"):
            model(**call_kwargs(model, ids), adapter_names=["a", "__base__", "a"])
        return
    model.add_adapter("b", ROWS[row].make(base))
    randomize(model, seed=2)
    names = ["a", "b", "a"]
    with torch.no_grad():
        mixed = model(**call_kwargs(model, ids), adapter_names=names).logits
    for index, name in enumerate(names):
        model.set_adapter(name)
        # the same batch with one adapter for all: equal shapes, so no batch-size rounding differs
        # (T5 on NF4 weights turns that rounding into 1.5e-4 with 2 threads)
        assert close(mixed[index], logits(model, ids)[index])


@pytest.mark.parametrize("row", [r for r in ROWS if "llama" in ROWS[r].archs])
def test_resume_from_a_checkpoint_is_exact(row, tmp_path):
    examples = [{"input_ids": [int(t) for t in adapted_ids(row, plain_ids(1, 6, seed=s))[0]],
                 "labels": [-100] * (ROWS[row].slots[0] + 3) + [int(t) for t in plain_ids(1, 6, seed=s)[0, 3:]]
                 + [-100] * ROWS[row].slots[1]} for s in range(6)]
    settings = TrainConfig(max_steps=4, batch_size=2, learning_rate=1e-2, save_every=2, eval_every=0, log_every=1)
    save = lambda model, folder: dt.save(model, folder)
    whole = wrapped(row, "llama")
    train(whole, examples, [], settings, tmp_path / "whole", pad_token_id=0, save_model=save, progress=False)
    first = wrapped(row, "llama")
    train(first, examples, [], TrainConfig(**{**settings.__dict__, "max_steps": 4}), tmp_path / "split",
          pad_token_id=0, save_model=save, progress=False)
    for newest in sorted((tmp_path / "split").glob("checkpoint-4")):
        import shutil

        shutil.rmtree(newest)  # as if the run had stopped after step 2
    resumed = wrapped(row, "llama")
    train(resumed, examples, [], settings, tmp_path / "split", pad_token_id=0, save_model=save, resume=True,
          progress=False)
    for key, param in whole.adapter_parameters("default").items():
        assert torch.equal(param, resumed.adapter_parameters("default")[key]), key


@pytest.mark.parametrize("row", [r for r in ROWS if "llama" in ROWS[r].archs])
def test_a_bf16_model_trains_saves_and_loads(row, tmp_path):
    base = TINY_ARCHITECTURES["llama"]().to(torch.bfloat16)
    model = dt.wrap(base, ROWS[row].make(base))
    randomize(model)
    ids = adapted_ids(row, plain_ids())
    model.train()
    loss(model, ids).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.adapter_parameters("default").values())
    model.eval()
    adapted = logits(model, ids)
    assert adapted.dtype == torch.bfloat16
    dt.save(model, tmp_path)
    if model.methods["default"].artifact == "model":  # (from_pretrained keeps RoPE's inv_freq in fp32: compare weights)
        loaded = dict(type(base).from_pretrained(tmp_path, dtype=torch.bfloat16).named_parameters())
        assert all(torch.equal(loaded[name], p) for name, p in model.base_model.named_parameters())
        return
    loaded = dt.load_adapter(TINY_ARCHITECTURES["llama"]().to(torch.bfloat16), tmp_path)
    assert torch.allclose(logits(loaded, ids).float(), adapted.float(), atol=2e-2)  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("name", ["", "../x", "x.y", "__base__", 3])
def test_an_unusable_adapter_name_is_refused_before_the_model_changes(name):
    model = dt.wrap(build("llama"), dt.LoRA(rank=2))
    before = [type(m) for m in model.modules()]
    with pytest.raises(DeltatuneError, match="not usable"):
        model.add_adapter(name, dt.LoRA(rank=2))
    assert [type(m) for m in model.modules()] == before
    model.add_adapter("second", dt.LoRA(rank=2))  # the model still takes a good one


def test_wrap_needs_a_method():
    with pytest.raises(DeltatuneError, match="needs a method"):
        dt.wrap(build("llama"), "lora")


def test_a_hyphenated_adapter_name_works():
    model = dt.wrap(build("llama"), dt.LoRA(rank=2), adapter_name="summarise-v2")
    assert list(model.adapter_parameters("summarise-v2"))
