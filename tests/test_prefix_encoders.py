"""Prefix tuning and P-tuning v2 beyond decoder-only models: encoder–decoder (BART, T5) with prefixes in
the encoder, the decoder and cross-attention, encoder-only classifiers (BERT), and a decoder last-token
classifier (Llama). Closed-form invariants on tiny models with fixed seeds, and peft interop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

import deltatune as dt
from deltatune.methods.prefix_tuning import AttentionLayout

from conftest import tiny_bart, tiny_bert, tiny_llama_classifier, tiny_t5
from test_prompt_learning import ids, shrink


SEQ2SEQ = {"bart": tiny_bart, "t5": tiny_t5}
MODELS = {**SEQ2SEQ, "bert": tiny_bert}
SIDES = ("encoder", "decoder", "cross")


def method(**overrides):
    return dt.PTuningV2(num_virtual_tokens=3, **overrides)


def run(model, x, mask=None, grad=False):
    """One call; seq2seq models decode the fixed tokens 3…7 (the same for every row, so rows compare)."""
    kwargs = {"attention_mask": mask}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = torch.arange(3, 8).expand(x.shape[0], -1)
    with torch.set_grad_enabled(grad):
        return model(input_ids=x, **kwargs)


def logits(model, x, mask=None):
    return run(model, x, mask).logits


def loss(model, x):
    if model.config.is_encoder_decoder:
        return run(model, x, grad=True).logits.logsumexp(-1).mean()  # any scalar of every output will do
    return model(input_ids=x, labels=torch.arange(x.shape[0]) % 2).loss


def greedy(model, x, mask=None, **kwargs):
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             **kwargs)
    return out[:, -6:]


def prefix_module(model):
    return model.base_model.deltatune_prefix


# --- the three sides of an encoder–decoder model -------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("arch", sorted(SEQ2SEQ))
def test_changing_only_one_side_changes_the_output(arch, side):
    model = dt.wrap(SEQ2SEQ[arch](), method())
    shrink(model)
    x = ids()
    before = run(model, x)
    table = prefix_module(model).tables[side].embeddings["default"]
    with torch.no_grad():
        table.add_(torch.randn(table.shape, generator=torch.Generator().manual_seed(5)))
    after = run(model, x)
    encoder_change = (after.encoder_last_hidden_state - before.encoder_last_hidden_state).abs().max()
    if side == "encoder":
        assert encoder_change > 1e-3
    else:  # decoder-side prefixes leave the encoder exactly as it was
        assert encoder_change == 0
    # a random tiny BART passes little from its encoder to the logits (weights ~ N(0, 0.02)): ~1e-4 here,
    # still three orders above float noise
    assert (after.logits - before.logits).abs().max() > 1e-5


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_disabled_and_deleted_equal_base(arch):
    x = ids()
    reference = logits(MODELS[arch](), x)
    model = dt.wrap(MODELS[arch](), method())
    shrink(model)
    assert not torch.allclose(logits(model, x), reference)
    with dt.disabled(model):
        assert torch.equal(logits(model, x), reference)
    model.delete_adapter("default")
    assert torch.equal(logits(model, x), reference)


def test_each_adapter_gives_its_own_output_on_a_shared_model():
    adapters = {"full": (method(), 4), "decoder_only": (method(encoder_prefix=False, cross_prefix=False), 12)}
    x = ids()
    alone = {}
    for name, (config, seed) in adapters.items():
        single = dt.wrap(tiny_bart(), config, name)
        shrink(single, seed=seed)
        alone[name] = logits(single, x)
    shared = tiny_bart()
    for name, (config, seed) in adapters.items():
        shared = dt.wrap(shared, config, name)  # the new adapter becomes the active one
        shrink(shared, seed=seed)
    for name in adapters:
        shared.set_adapter(name)
        assert torch.allclose(logits(shared, x), alone[name], atol=1e-6), name


def test_t5_prefix_keys_get_zero_relative_position_bias():
    model = dt.wrap(tiny_t5(), method())
    shrink(model)
    x = ids(length=7)
    attention = model.base_model.encoder.block[0].layer[0].SelfAttention
    seen = []
    handle = attention.register_forward_hook(lambda m, a, out: seen.append(out[1]))
    logits(model, x)
    handle.remove()
    bias = seen[0]  # [1, heads, L, P + L]
    assert bias.shape == (1, 4, 7, 3 + 7)
    assert torch.equal(bias[..., :3], torch.zeros(1, 4, 7, 3))
    assert torch.equal(bias[..., 3:], attention.compute_bias(7, 7))


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("arch", sorted(SEQ2SEQ))
def test_generation_with_and_without_cache_agree(arch, beams):
    model = dt.wrap(SEQ2SEQ[arch](), method())
    shrink(model)
    x = ids()
    assert torch.equal(greedy(model, x, num_beams=beams), greedy(model, x, num_beams=beams, use_cache=False))


def test_decoder_only_beam_search_with_and_without_cache_agree():
    # without a cache, generate() hands the read-only prefix cache back each step and beam search reorders it
    from conftest import tiny_llama

    model = dt.wrap(tiny_llama(), dt.PrefixTuning(num_virtual_tokens=4, projection_hidden_size=16))
    shrink(model)
    x = ids()
    assert torch.equal(greedy(model, x, num_beams=2, pad_token_id=0),
                       greedy(model, x, num_beams=2, pad_token_id=0, use_cache=False))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_padded_batch_equals_each_example_alone(arch):
    model = dt.wrap(MODELS[arch](), method())
    shrink(model)
    pad = model.config.pad_token_id or 0
    long, short = ids(1, 7, seed=1), ids(1, 4, seed=2)
    batch = torch.cat([long, torch.cat([short, torch.full((1, 3), pad)], dim=1)])  # encoders: right padding
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    together = logits(model, batch, mask)  # padding changes the shapes summed over: equal up to rounding
    assert torch.allclose(together[0], logits(model, long)[0], atol=1e-5)
    assert torch.allclose(together[1], logits(model, short)[0], atol=1e-5)
    if arch in SEQ2SEQ:
        generated = greedy(model, batch, mask)
        assert torch.equal(generated[0], greedy(model, long)[0])
        assert torch.equal(generated[1], greedy(model, short)[0])


# --- training ----------------------------------------------------------------------------------
def toy_classification_losses(train_prefix: bool, steps: int = 20) -> list[float]:
    """A tiny BERT learns whether the third token is 5 or 6; the head starts at zero (loss ln 2)."""
    torch.manual_seed(0)
    # initializer_range 0.5 (not 0.02) so the third token reaches [CLS], as in a pretrained BERT
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.5)
    base = BertForSequenceClassification(config)
    torch.nn.init.zeros_(base.classifier.weight)
    model = dt.wrap(base, dt.PTuningV2(num_virtual_tokens=8))
    prefix_module(model).tables["encoder"].embeddings["default"].requires_grad_(train_prefix)
    labels = torch.arange(32) % 2
    x = torch.randint(10, 128, (32, 8), generator=torch.Generator().manual_seed(1))
    x[:, 0] = 1  # [CLS]
    x[:, 2] = torch.where(labels == 1, 5, 6)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(steps):
        step = model(input_ids=x, labels=labels).loss
        step.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step.item())
    return losses


def test_bert_p_tuning_v2_learns_a_toy_two_class_task():
    deep_prompts, head_only = toy_classification_losses(True), toy_classification_losses(False)
    assert abs(deep_prompts[0] - math.log(2)) < 1e-6  # a zero head guesses
    # measured: 0.07 with the prefix trained, 0.39 with the head alone
    assert deep_prompts[-1] < 0.5 * head_only[-1], (deep_prompts, head_only)


def test_llama_sequence_classifier_takes_a_prefix_and_trains_its_score_head():
    x = ids()
    reference = logits(tiny_llama_classifier(), x)
    model = dt.wrap(tiny_llama_classifier(), dt.PrefixTuning(num_virtual_tokens=4, projection_hidden_size=16))
    assert set(model.adapter_parameters("default")) >= {"score.weight"}
    shrink(model)
    adapted = logits(model, x)
    assert adapted.shape == reference.shape == (2, 3) and not torch.allclose(adapted, reference)
    with dt.disabled(model):
        assert torch.equal(logits(model, x), reference)
    long, short = ids(1, 7, seed=1), ids(1, 4, seed=2)
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], dim=1)])  # right padding
    together = logits(model, batch, torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]]))
    assert torch.allclose(together, torch.cat([logits(model, long), logits(model, short)]), atol=1e-5)


def test_modules_to_save_defaults_to_a_classifier_head_and_can_be_named():
    assert dt.PTuningV2().trained_modules(tiny_bert()) == ("classifier",)
    assert dt.PTuningV2().trained_modules(tiny_llama_classifier()) == ("score",)
    assert dt.PTuningV2().trained_modules(tiny_bart()) == ()
    named = dt.wrap(tiny_bert(), dt.PTuningV2(num_virtual_tokens=2, modules_to_save=("pooler",)))
    trained = {p.rsplit(".", 2)[0] for p in named.adapter_parameters("default")}
    assert trained == {"deltatune_prefix.tables.encoder", "bert.pooler"}


def test_an_encoder_only_model_needs_its_encoder_prefix():
    with pytest.raises(dt.DeltatuneError, match="encoder_prefix=True"):
        dt.wrap(tiny_bert(), dt.PTuningV2(encoder_prefix=False))


def test_peft_layer_order_on_hand_written_layouts():
    natural = AttentionLayout(layers=3, kv_heads=1, head_dim=1, hidden=1)
    assert natural.blocks() == [0, 1, 2]
    assert AttentionLayout(layers=3, kv_heads=1, head_dim=1, hidden=1, peft_layer_order=True).blocks() == [0, 2, 1]
    assert AttentionLayout(layers=4, kv_heads=1, head_dim=1, hidden=1, peft_layer_order=True).blocks() == [0, 2, 0, 2]


# --- saving ------------------------------------------------------------------------------------
EXPECTED_FILES = {
    "bart": ({"prompt_embeddings", "encoder_prompt_embeddings", "cross_prompt_embeddings"},
             {"deltatune_encoder_prefix": True, "deltatune_cross_prefix": True, "num_transformer_submodules": 2,
              "deltatune_peft_incompatible": "peft applies only the decoder self-attention prefix "
                                             "(prompt_embeddings) and silently ignores encoder_prompt_embeddings "
                                             "and cross_prompt_embeddings"}),
    "t5": ({"prompt_embeddings", "encoder_prompt_embeddings", "cross_prompt_embeddings"},
           {"deltatune_encoder_prefix": True, "deltatune_cross_prefix": True, "num_transformer_submodules": 2}),
    "bert": ({"encoder_prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"},
             {"deltatune_encoder_prefix": True, "num_transformer_submodules": 1, "modules_to_save": ["classifier"],
              "deltatune_peft_incompatible": "its prefix is an encoder-only model's encoder prefix "
                                             "(encoder_prompt_embeddings), which peft does not read"}),
}


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_save_load_round_trip(arch, projection, tmp_path):
    model = dt.wrap(MODELS[arch](), dt.PrefixTuning(num_virtual_tokens=3, projection=projection,
                                                     projection_hidden_size=16))
    shrink(model)
    x = ids()
    expected = logits(model, x)
    dt.save_adapter(model, tmp_path)
    names, keys = EXPECTED_FILES[arch]
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == names
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config.get(k) for k in keys} == keys
    assert torch.allclose(logits(dt.load_adapter(MODELS[arch](), tmp_path), x), expected, atol=1e-6)
    resumed = dt.load_adapter(MODELS[arch](), tmp_path, trainable=True)  # the MLP comes back for training
    for key, param in model.adapter_parameters("default").items():
        assert torch.equal(resumed.adapter_parameters("default")[key], param), key


# --- peft interop ------------------------------------------------------------------------------
peft = pytest.importorskip("peft", reason="peft is a test extra: pip install -e '.[test]'")


@pytest.mark.parametrize("arch", sorted(SEQ2SEQ))
def test_our_decoder_side_adapter_loads_in_peft_with_equal_logits(arch, tmp_path):
    model = dt.wrap(SEQ2SEQ[arch](), method(encoder_prefix=False, cross_prefix=False))
    shrink(model)
    x = ids()
    expected = logits(model, x)
    dt.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not any(key.startswith("deltatune_") and key != "deltatune_method" for key in config)
    theirs = peft.PeftModel.from_pretrained(SEQ2SEQ[arch](), str(tmp_path)).eval()
    assert torch.allclose(logits(theirs, x), expected, atol=1e-5)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
@pytest.mark.parametrize("arch", sorted(SEQ2SEQ))
def test_peft_made_seq2seq_prefix_loads_here_with_equal_logits(arch, projection, tmp_path):
    torch.manual_seed(3)
    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, prefix_projection=projection,
                                     encoder_hidden_size=16)
    theirs = peft.get_peft_model(SEQ2SEQ[arch](), config).eval()
    with torch.no_grad():  # peft's init is N(0, 1); keep it moderate as shrink() does
        for param in theirs.prompt_encoder.parameters():
            param.mul_(0.3)
    x = ids()
    expected = logits(theirs, x)
    theirs.save_pretrained(str(tmp_path))
    ours = dt.load_adapter(SEQ2SEQ[arch](), tmp_path)
    assert torch.allclose(logits(ours, x), expected, atol=1e-5)


def test_peft_made_encoder_only_prefix_is_refused_with_a_reason(tmp_path):
    # peft 0.21.2 cannot run it here (it looks for a `past_key_values` argument, which BertModel now calls
    # `cache`), and handing BertModel a cache shifts BERT's positions by P, which deltatune's encoder prefix does not
    theirs = peft.get_peft_model(tiny_bert(), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    theirs.save_pretrained(str(tmp_path))
    with pytest.raises(dt.DeltatuneError, match="peft made for encoder-only models"):
        dt.load_adapter(tiny_bert(), tmp_path)
