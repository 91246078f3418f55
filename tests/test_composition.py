"""Composition: several methods active on one model at once (methods/composition.py).

Invariants, in closed form on tiny Llamas with fixed seeds:
- parts that are the identity at init (LoRA, bottlenecks) compose to the base model; a part that
  is not (prefix, prompt) composed with identities equals that part alone;
- two LoRAs on one layer are summed: the composition equals the merge of both (W + Σ s·B A);
- one AdamW step trains every part and leaves the base untouched;
- save → load restores the composition and its activation bit-exactly (each part's folder loads
  alone too, in peft where peft has the method); disabled() gives the base;
- what cannot compose is refused with one sentence, before anything changes;
- ``deltatune train --method prefix+adapter`` trains both parts from the CLI.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.cli import main
from deltatune.config import build_run, merge_settings, parse_overrides
from deltatune.errors import DeltatuneError
from deltatune.generation import prompt_encoder
from deltatune.methods import METHODS
from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer
from deltatune.train import TrainConfig

from conftest import TINY_ARCHITECTURES, tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 5, 9, 11, 3, 7], [2, 4, 6, 8, 10, 12]])
# LoRA's fused kernel computes x Wᵀ as one addmm, the base layer as F.linear: equal up to fp32 rounding
ROUNDING = 1e-6


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def prefix() -> dt.PrefixTuning:
    return dt.PrefixTuning(num_virtual_tokens=4, projection_hidden_size=16)


def prefix_and_adapter(seed: int = 0) -> dt.DeltaModel:
    torch.manual_seed(seed)
    return dt.wrap(tiny_llama(), dt.Composition({"prefix": prefix(), "adapter": dt.Adapter(preset="parallel")}))


def randomize(model: dt.DeltaModel, names: list[str], seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for param in model.adapter_parameters(name).values():
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def step(model: dt.DeltaModel) -> None:
    """One AdamW step on the language-model loss (lr 1e-2, no weight decay: a change is a gradient's)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


# --- equal to the sum of its parts at init ----------------------------------------------------
def test_identity_parts_compose_to_the_base_model():
    base = logits(tiny_llama())
    model = dt.wrap(tiny_llama(), dt.Composition({"lora": dt.LoRA(rank=4, targets="all-linear"),
                                                   "adapter": dt.Adapter(preset="parallel")}))
    assert model.active_adapters == ("lora", "adapter")
    assert torch.allclose(logits(model), base, rtol=0, atol=ROUNDING)


@pytest.mark.parametrize("order", [["prefix", "adapter"], ["adapter", "prefix"]])
def test_prefix_with_a_parallel_adapter_equals_the_prefix_alone_at_init(order):
    model = prefix_and_adapter()
    model.set_adapter("prefix")
    alone = logits(model)
    model.set_adapter(order)
    assert torch.equal(logits(model), alone)  # the adapter adds s·0 exactly
    with dt.disabled(model):
        assert not torch.allclose(logits(model), alone)  # the prefix is not the identity


def test_lora_with_prompt_tuning_equals_the_prompt_alone_at_init():
    torch.manual_seed(0)
    model = dt.wrap(tiny_llama(), dt.PromptTuning(num_virtual_tokens=3), adapter_name="prompt")
    model.add_adapter("lora", dt.LoRA(rank=4))
    model.set_adapter("prompt")
    alone = logits(model)
    model.set_adapter(["lora", "prompt"])
    assert logits(model).shape == alone.shape == (2, 6, 128)  # the virtual positions are dropped
    assert torch.allclose(logits(model), alone, rtol=0, atol=ROUNDING)


def test_two_loras_are_summed_and_merge_into_one_weight():
    torch.manual_seed(0)
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=4), adapter_name="a")
    model.add_adapter("b", dt.LoRA(rank=2, alpha=8, targets=["q_proj", "k_proj"]))
    randomize(model, ["a", "b"])
    each = []
    for name in ("a", "b"):
        model.set_adapter(name)
        each.append(logits(model))
    model.set_adapter(["a", "b"])
    both = logits(model)
    assert not torch.allclose(both, each[0], atol=1e-3) and not torch.allclose(both, each[1], atol=1e-3)
    merged = dt.merge(model)  # default: the active adapters, W' = W + s_a·B_a A_a + s_b·B_b A_b
    assert not any(isinstance(m, dt.DeltaModule) for m in merged.modules())
    # merged weights are summed in fp32 and rounded once; the unmerged path adds the terms per layer
    assert torch.allclose(logits(merged), both, rtol=0, atol=1e-5)


# --- training --------------------------------------------------------------------------------
def test_one_adamw_step_trains_both_parts_and_leaves_the_base_untouched():
    model = prefix_and_adapter()
    parts = {name: model.adapter_parameters(name) for name in ("prefix", "adapter")}
    assert trainable_ids(model) == {id(p) for params in parts.values() for p in params.values()}
    own = {id(p) for params in parts.values() for p in params.values()}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in own}
    before = {name: {k: p.detach().clone() for k, p in params.items()} for name, params in parts.items()}
    trainable, total = dt.trainable_parameters(model)
    assert trainable == sum(p.numel() for params in parts.values() for p in params.values()) < total
    step(model)
    for name, params in parts.items():
        changed = [k for k, p in params.items() if not torch.equal(p, before[name][k])]
        assert changed, f"no parameter of {name} changed"
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if id(p) not in own)


def test_gradient_checkpointing_gives_the_same_gradients_to_both_parts():
    grads = []
    for checkpointing in (False, True):
        model = prefix_and_adapter()
        randomize(model, ["adapter"])  # W_up ≠ 0: W_down gets a gradient too
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(grads[0][n].abs().sum() > 0 for n in grads[0] if ".up." in n or "down" in n)
    # the recomputed forward repeats the same fp32 operations: equal up to summation order
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])


def test_switching_back_to_one_adapter_trains_only_that_one():
    model = prefix_and_adapter()
    model.set_adapter("adapter")
    assert model.active_adapter == "adapter" and model.active_adapters == ("adapter",)
    assert trainable_ids(model) == {id(p) for p in model.adapter_parameters("adapter").values()}
    model.set_adapter(["prefix", "adapter"])
    model.delete_adapter("prefix")
    assert model.active_adapters == ("adapter",)
    assert trainable_ids(model) == {id(p) for p in model.adapter_parameters("adapter").values()}


# --- save and load -----------------------------------------------------------------------------
def test_save_load_round_trip_is_exact_with_both_parts_active(tmp_path):
    model = prefix_and_adapter()
    step(model)
    expected = logits(model)
    model.set_adapter("prefix")
    prefix_alone = logits(model)
    model.set_adapter(["prefix", "adapter"])
    dt.save(model, tmp_path)
    assert json.loads((tmp_path / "deltatune_composition.json").read_text())["adapters"] == ["prefix", "adapter"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "prefix").iterdir()}
    assert not (tmp_path / "adapter_config.json").exists()

    loaded = dt.load_adapter(tiny_llama(), tmp_path)
    assert loaded.active_adapters == ("prefix", "adapter")
    assert torch.equal(logits(loaded), expected)
    assert not trainable_ids(loaded)
    resumed = dt.load_adapter(tiny_llama(), tmp_path, trainable=True)  # the prefix MLP comes back
    assert torch.equal(logits(resumed), expected)
    assert trainable_ids(resumed) == {id(p) for n in ("prefix", "adapter")
                                      for p in resumed.adapter_parameters(n).values()}
    assert torch.equal(logits(dt.load_adapter(tiny_llama(), tmp_path / "prefix")), prefix_alone)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "prefix")).eval()  # the part peft knows
    assert torch.allclose(logits(theirs), prefix_alone, rtol=0, atol=1e-5)


def test_lora_and_prompt_round_trip_and_a_single_save_replaces_the_composition(tmp_path):
    torch.manual_seed(0)
    model = dt.wrap(tiny_llama(), dt.Composition({"lora": dt.LoRA(rank=4), "prompt": dt.PromptTuning(num_virtual_tokens=3)}))
    randomize(model, ["lora", "prompt"])
    expected = logits(model)
    dt.save(model, tmp_path)
    assert torch.equal(logits(dt.load_adapter(tiny_llama(), tmp_path)), expected)
    dt.save(model, tmp_path, adapter_name="lora")  # a named adapter alone: a plain folder, no composition left
    assert not (tmp_path / "deltatune_composition.json").exists()
    assert dt.load_adapter(tiny_llama(), tmp_path).active_adapters == ("default",)


def test_disabled_gives_the_base_and_the_composition_returns_after():
    base = logits(tiny_llama())
    model = prefix_and_adapter()
    randomize(model, ["adapter"])
    composed = logits(model)
    with dt.disabled(model):
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), composed)
    assert model.active_adapters == ("prefix", "adapter")


GENERATIVE = ("llama", "gpt2", "gpt_neox", "bart", "t5")


def call(model: nn.Module) -> torch.Tensor:
    """Logits for IDS; encoder–decoder models get IDS on the decoder side too."""
    decoder = getattr(model.config, "is_encoder_decoder", False)
    with torch.no_grad():
        return model(input_ids=IDS, **({"decoder_input_ids": IDS} if decoder else {})).logits


@pytest.mark.parametrize("arch", GENERATIVE)
def test_prefix_and_parallel_adapter_on_every_generative_architecture(arch, tmp_path):
    build = TINY_ARCHITECTURES[arch]
    base = call(build())
    torch.manual_seed(0)
    model = dt.wrap(build(), dt.Composition({"prefix": prefix(), "adapter": dt.Adapter(preset="parallel")}))
    composed = call(model)
    model.set_adapter("prefix")
    assert torch.equal(call(model), composed)  # the adapter starts at zero: the prefix alone
    model.set_adapter(["prefix", "adapter"])
    randomize(model, ["prefix", "adapter"])
    composed = call(model)
    with dt.disabled(model):
        assert torch.equal(call(model), base)
    dt.save(model, tmp_path)
    loaded = dt.load_adapter(build(), tmp_path)
    assert loaded.active_adapters == ("prefix", "adapter")
    assert torch.equal(call(loaded), composed)


# --- refusals --------------------------------------------------------------------------------
def test_merge_refuses_a_composition_with_an_unmergeable_part():
    model = prefix_and_adapter()
    with pytest.raises(DeltatuneError, match=r"^Adapter 'prefix' \(prefix\) cannot be merged into the base weights, "
                                             r"so neither can the composition it is part of; keep it loaded"):
        dt.merge(model)
    assert model.active_adapters == ("prefix", "adapter")  # nothing changed
    mixed = dt.wrap(tiny_llama(), dt.Composition({"lora": dt.LoRA(rank=4), "adapter": dt.Adapter()}))
    with pytest.raises(DeltatuneError, match=r"^Adapter 'adapter' \(adapter\) cannot be merged"):
        mixed.merge_adapter()  # refused before the LoRA layers are touched
    assert not any(module.merged_adapters for _, module in mixed.delta_modules())
    with pytest.raises(DeltatuneError, match=r"add_adapter takes one method; pass the Composition to deltatune.wrap"):
        mixed.add_adapter("both", dt.Composition({"lora": dt.LoRA(), "adapter": dt.Adapter()}))


@pytest.mark.parametrize("parts,message", [
    ({"prompt": dt.PromptTuning(), "ptuning": dt.PTuning()}, r"Adapters 'prompt' \(prompt\) and 'ptuning' \(ptuning\) "
                                                              r"both rewrite the model's input"),
    ({"prefix": dt.PrefixTuning(), "prompt": dt.PromptTuning()}, r"both rewrite the model's input"),
    ({"lora": dt.LoRA(), "full": dt.FullFineTuning()}, r"Adapter 'full' \(full\) trains the base weights in place"),
    ({"freeze": dt.FreezeTuning(), "adapter": dt.Adapter()}, r"Adapter 'freeze' \(freeze\) trains the base weights"),
    ({"lora": dt.LoRA()}, r"needs at least two methods"),
    ((("a", dt.LoRA()), ("a", dt.Adapter())), r"names 'a' twice"),
    ({"lora": dt.LoRA(), "x": "adapter"}, r"part 'x' is a str, not a method"),
])
def test_compositions_that_cannot_run_are_refused_before_any_model(parts, message):
    with pytest.raises(DeltatuneError, match=message):
        dt.Composition(parts)


SMALL = {"prompt": {"num_virtual_tokens": 4}, "prefix": {"num_virtual_tokens": 4, "projection_hidden_size": 16},
         "ptuning-v2": {"num_virtual_tokens": 4}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_adapters_of_one_method_compose_exactly_when_the_protocol_allows(name):
    """Two of one method: summed (LoRA, QLoRA) or stacked (bottlenecks) when the capabilities allow,
    refused with one sentence when they do not (call-rewriting methods, full and freeze tuning)."""
    method = METHODS[name](**SMALL.get(name, {}))
    capabilities = method.capabilities()
    refused = not capabilities.reversible or capabilities.rewrites_call
    torch.manual_seed(0)
    if refused:
        with pytest.raises(DeltatuneError):
            model = dt.wrap(tiny_llama(), method, adapter_name="a")
            model.add_adapter("b", method)
            model.set_adapter(["a", "b"])
        return
    model = dt.wrap(tiny_llama(), method, adapter_name="a")
    model.add_adapter("b", method)
    model.set_adapter(["a", "b"])
    assert trainable_ids(model) == {id(p) for n in "ab" for p in model.adapter_parameters(n).values()}
    with dt.disabled(model):
        base = logits(model)  # the prepared base (QLoRA: NF4 weights)
    if capabilities.equals_base_at_init:
        assert torch.allclose(logits(model), base, rtol=0, atol=ROUNDING)
    randomize(model, ["a", "b"])
    model.set_adapter("a")
    only_a = logits(model)
    model.set_adapter(["a", "b"])
    assert not torch.allclose(logits(model), only_a, atol=1e-4)  # b runs too


def test_set_adapter_refuses_two_call_rewriting_adapters_and_keeps_the_active_one():
    torch.manual_seed(0)
    model = dt.wrap(tiny_llama(), prefix(), adapter_name="p1")
    model.add_adapter("p2", prefix())
    with pytest.raises(DeltatuneError, match=r"^Adapters 'p1' \(prefix\) and 'p2' \(prefix\) both rewrite"):
        model.set_adapter(["p1", "p2"])
    assert model.active_adapters == ("p2",)
    for names, message in ([[], r"needs at least one adapter"], [["p1", "p1"], r"names an adapter twice"],
                           [["p1", "nope"], r"no adapter named 'nope'"]):
        with pytest.raises(DeltatuneError, match=message):
            model.set_adapter(names)


def test_modules_that_run_one_adapter_at_a_time_refuse_to_compose():
    model = dt.wrap(tiny_gpt2(), dt.LoRA(rank=4, bias="lora_only"), adapter_name="a")
    model.add_adapter("b", dt.LoRA(rank=4, bias="lora_only"))
    with pytest.raises(DeltatuneError, match=r"^These adapters cannot be active together: at '.*c_attn' 'a', 'b' each "
                                             r"train their own bias.*keep bias='none' on all but one of them\.$"):
        model.set_adapter(["a", "b"])
    classifier = tiny_bert()  # both parts would train their own copy of the fresh head
    expected = logits(classifier)
    with pytest.raises(DeltatuneError, match=r"at 'classifier' TrainedCopy runs one adapter at a time"):
        dt.wrap(classifier, dt.Composition({"lora": dt.LoRA(rank=4), "adapter": dt.Adapter()}))
    assert not any(isinstance(m, dt.DeltaModule) for m in classifier.modules())  # taken out again
    assert torch.equal(logits(classifier), expected)


def test_prompts_are_laid_out_by_the_part_that_places_virtual_tokens():
    tokenizer = load_tokenizer(str(bundled("stories260K")))
    ptuning = dt.PTuning(template="{prompt:2} {text} {prompt:2} Description:", encoder_hidden_size=16)
    model = dt.wrap(load_causal_lm(str(bundled("stories260K"))),
                    dt.Composition({"lora": dt.LoRA(rank=4), "ptuning": ptuning}))
    expected = ptuning.encode_prompt(tokenizer, "name : Aromi")
    assert min(expected) < 0  # template slots: negative ids
    assert model.active_method.encode_prompt(tokenizer, "name : Aromi") == expected
    assert prompt_encoder(model, tokenizer)("name : Aromi") == expected
    model.set_adapter("lora")
    assert min(prompt_encoder(model, tokenizer)("name : Aromi")) >= 0


# --- config and CLI ----------------------------------------------------------------------------
PATHS = {"model": "m", "data": "d.jsonl", "output": "o"}


def test_config_splits_a_composed_method_and_namespaced_options():
    run = build_run(merge_settings(PATHS, {"method": "prefix+adapter"}, parse_overrides(
        ["prefix.num_virtual_tokens=20", "adapter.preset=parallel"])))
    assert isinstance(run.method, dt.Composition) and run.method.names == ["prefix", "adapter"]
    assert run.method.parts[0][1] == dt.PrefixTuning(num_virtual_tokens=20)
    assert run.method.parts[1][1] == dt.Adapter(preset="parallel")
    # one learning rate for the run: the first part's default (a later part's where the first sets none)
    defaults = {**dt.Adapter.training_defaults, **dt.PrefixTuning.training_defaults}
    assert run.train.learning_rate == defaults.get("learning_rate", TrainConfig().learning_rate)
    assert run.method.training_defaults == defaults
    assert build_run(run.as_settings()) == run  # the run record reads back
    nested = build_run({**PATHS, "method": {"name": "prefix+adapter", "prefix": {"num_virtual_tokens": 20},
                                            "adapter": {"preset": "parallel"}}})
    assert nested == run
    assert build_run({**PATHS, "method": "lora+prompt", "learning_rate": 5e-3}).train.learning_rate == 5e-3
    assert build_run({**PATHS, "method": "adapter", "adapter.preset": "parallel"}).method == dt.Adapter(preset="parallel")


@pytest.mark.parametrize("settings,message", [
    ({"method": "prefix+adapter", "rank": 4}, r"Setting 'rank' does not say which part of prefix\+adapter"),
    ({"method": "prefix+adapter", "lora.rank": 4}, r"'lora.rank' is for method lora, which is not part of"),
    ({"method": "lora", "prefix.num_virtual_tokens": 4}, r"compose them with method lora\+prefix"),
    ({"method": "lora+lora"}, r"names lora twice"),
    ({"method": "lora+"}, r"has an empty part"),
    ({"method": "lora+bogus"}, r"Unknown method 'bogus'"),
    ({"method": "prompt+ptuning"}, r"both rewrite the model's input"),
    ({"method": "full+lora"}, r"trains the base weights in place"),
])
def test_config_refusals(settings, message):
    with pytest.raises(DeltatuneError, match=message):
        build_run({**PATHS, **settings})


def test_cli_trains_prefix_plus_adapter_on_the_bundled_data(tmp_path, capsys):
    output = tmp_path / "comp_run"
    assert main(["train", "--model", str(bundled("stories260K")), "--data", str(bundled("e2e/train.jsonl")),
                 "--eval-data", str(bundled("e2e/eval.jsonl")), "--method", "prefix+adapter", "--max-steps", "20",
                 "--output", str(output), "--quiet", "prefix.num_virtual_tokens=8", "adapter.preset=parallel"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert summary["steps"] == 20 and evals[-1] < evals[0]
    assert {"prefix", "adapter", "deltatune_composition.json", "deltatune_run.yaml"} <= {p.name for p in output.iterdir()}
    loaded = dt.load_adapter(load_causal_lm(str(bundled("stories260K"))), output)
    assert loaded.active_adapters == ("prefix", "adapter")
    trained = {name: loaded.adapter_parameters(name) for name in loaded.active_adapters}
    assert any(p.abs().sum() > 0 for k, p in trained["adapter"].items() if "up" in k)  # W_up left zero
    assert main(["info", str(output)]) == 0
    info = capsys.readouterr().out
    assert "composition  prefix + adapter" in info and "PREFIX_TUNING (prefix)" in info and "BOTTLENECK (adapter)" in info
    assert main(["generate", "--model", str(bundled("stories260K")), "--adapter", str(output),
                 "--prompt", "name : Aromi", "--max-new-tokens", "4"]) == 0
