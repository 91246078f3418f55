"""Full and freeze tuning: which weights train, in closed form, and real learning on stories260K
with each method's own learning rate. The shared invariants are in test_contract.py."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.config import build_run
from deltatune.data import load_examples, tokenize_examples
from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer
from deltatune.train import TrainConfig, train

from conftest import tiny_bart, tiny_llama, tiny_llama_classifier


def trained(model: dt.DeltaModel) -> set[str]:
    return {name for name, p in model.base_model.named_parameters() if p.requires_grad}


def test_full_trains_every_weight_once():
    base = tiny_llama(tie_word_embeddings=True)
    model = dt.wrap(base, dt.FullFineTuning())
    assert trained(model) == {name for name, _ in base.named_parameters()}
    assert dt.trainable_parameters(model) == (sum(p.numel() for p in base.parameters()),) * 2


@pytest.mark.parametrize("layers,expected", [(1, "model.layers.1."), (-1, "model.layers.0.")])
def test_freeze_trains_the_last_or_first_layers(layers, expected):
    model = dt.wrap(tiny_llama(), dt.FreezeTuning(trainable_layers=layers))
    names = trained(model)
    assert names and all(name.startswith(expected) for name in names)
    assert names == {n for n, _ in tiny_llama().named_parameters() if n.startswith(expected)}


def test_freeze_counts_each_stack_and_adds_named_modules():
    model = dt.wrap(tiny_bart(), dt.FreezeTuning(trainable_layers=1, modules=("layernorm_embedding",)))
    names = trained(model)
    assert any(n.startswith("model.encoder.layers.1.") for n in names)
    assert any(n.startswith("model.decoder.layers.1.") for n in names)
    assert not any(".layers.0." in n for n in names)
    assert {"model.encoder.layernorm_embedding.weight", "model.decoder.layernorm_embedding.weight"} <= names
    assert "model.encoder.layernorm_embedding.weight" in names and "model.decoder.layernorm_embedding.weight" in names


def test_freeze_trains_a_classifier_head_by_default():
    model = dt.wrap(tiny_llama_classifier(), dt.FreezeTuning(trainable_layers=1))
    assert "score.weight" in trained(model)


@pytest.mark.parametrize("bad,words", [(dict(trainable_layers=0), "trains nothing"),
                                       (dict(trainable_layers=1.5), "whole number"),
                                       (dict(modules=("nowhere",)), "match no module")])
def test_bad_freeze_settings_are_one_sentence(bad, words):
    with pytest.raises(dt.DeltatuneError, match=words):
        dt.wrap(tiny_llama(), dt.FreezeTuning(**bad))


def test_weight_training_methods_refuse_disabled_and_a_second_adapter():
    model = dt.wrap(tiny_llama(), dt.FullFineTuning())
    with pytest.raises(dt.DeltatuneError, match="changed the base weights in place"):
        with dt.disabled(model):
            pass
    with pytest.raises(dt.DeltatuneError, match="one adapter per model"):
        model.add_adapter("second", dt.FreezeTuning())


def test_each_method_ships_its_own_learning_rate(tmp_path):
    settings = {"model": "m", "data": "d", "output": str(tmp_path)}
    assert build_run({**settings, "method": "full"}).train.learning_rate == 2e-5
    assert build_run({**settings, "method": "freeze"}).train.learning_rate == 5e-5
    assert build_run({**settings, "method": "full", "learning_rate": 1e-4}).train.learning_rate == 1e-4  # the user's wins
    assert build_run({**settings, "method": "lora"}).train.learning_rate == TrainConfig().learning_rate


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_each_lowers_held_out_loss_on_stories260k_with_its_default_learning_rate(method, tmp_path):
    tokenizer = load_tokenizer(bundled("stories260K"))
    data = lambda name, n: tokenize_examples(load_examples(bundled(f"e2e/{name}.jsonl"))[:n], tokenizer, 200)
    torch.manual_seed(0)
    model = dt.wrap(load_causal_lm(bundled("stories260K")), dt.METHODS[method]())
    learning_rate = dt.METHODS[method].training_defaults["learning_rate"]
    config = TrainConfig(max_steps=25, batch_size=8, learning_rate=learning_rate, warmup_steps=3, eval_every=25)
    result = train(model, data("train", 200), data("eval", 16), config, tmp_path, pad_token_id=2,
                   save_model=dt.save, progress=False)
    (_, before), (_, after) = result.eval_losses[0], result.eval_losses[-1]
    assert after < before - 0.1, (before, after)
    reloaded = type(model.base_model).from_pretrained(tmp_path / "checkpoint-25")
    assert all(torch.equal(p, dict(model.base_model.named_parameters())[n]) for n, p in reloaded.named_parameters())
