"""P-Tuning v1's invariants in closed form, on tiny Llama and BERT models with fixed seeds."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import deltatune as dt
from deltatune.methods import METHODS
from deltatune.methods.p_tuning import PromptEncoderDelta, PTuning, label_loss, label_scores, template_parts

from conftest import logits_of, tiny_llama

PREFIX = "{prompt:4} {text}"
MIDDLE = "{prompt:2} {text} {prompt:3} it was"
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


class WordTokenizer:
    """Test-only stand-in for a Hugging Face tokenizer: one id per lower-case word, 128 ids at most."""

    def __init__(self, masked_lm: bool = False) -> None:
        words = "[pad] [cls] [sep] [mask] <s> . it was the a film movie plot good bad great awful fine dull".split()
        self.vocab = {word: i for i, word in enumerate(words)}
        self.mask_token_id = self.vocab["[mask]"] if masked_lm else None
        self.before, self.after = ([1], [2]) if masked_lm else ([4], [])

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [self.vocab.setdefault(word, len(self.vocab)) for word in text.lower().split()]
        assert len(self.vocab) <= 128
        return {"input_ids": self.before + ids + self.after if add_special_tokens else ids}


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """Loading reads the registry; harmless once methods/__init__.py lists P-tuning itself."""
    monkeypatch.setitem(METHODS, PTuning.cli_name, PTuning)


def tiny_bert_mlm(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    # initializer_range 0.5, not BERT's 0.02: at 0.02 a random 2-layer BERT passes almost nothing from
    # other positions to the mask (scores stay at ln 2); 0.5 stands in for a pretrained model's signal
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.5)
    return BertForMaskedLM(config).eval()


def randomize(model: dt.DeltaModel, seed: int = 3) -> None:
    """Give every encoder weight a fresh value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters("default").values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def rendered(method: PTuning, *texts: str) -> torch.Tensor:
    return torch.tensor([method.render(WordTokenizer(), text=text) for text in texts])


# --- the template -------------------------------------------------------------------------
def test_render_puts_negative_ids_at_the_slots():
    llama, bert = WordTokenizer(), WordTokenizer(masked_lm=True)
    v = llama.vocab
    method = PTuning(template=MIDDLE)
    assert method.num_virtual_tokens == 5 and method.placement == "in_template"
    assert method.render(llama, text="the film") == [4, -1, -2, v["the"], v["film"], -3, -4, -5, v["it"], v["was"]]
    cloze = PTuning(template="{text} {prompt:2} it was {mask} .", verbalizer={"neg": "bad", "pos": "good"})
    ids = cloze.render(bert, text="a dull plot")
    assert ids == [1, v["a"], v["dull"], v["plot"], -1, -2, v["it"], v["was"], 3, v["."], 2]
    assert cloze.label_token_ids(bert) == [v["bad"], v["good"]]
    for prefix in (PTuning(template=PREFIX), PTuning(num_virtual_tokens=4)):  # the hook prepends them
        assert prefix.placement == "prefix" and prefix.num_virtual_tokens == 4
        assert prefix.render(llama, text="the film") == llama("the film")["input_ids"]
    assert template_parts("{{x}} {prompt:2}{mask}") == [("text", "{x} "), ("prompt", 2), ("mask", None)]


@pytest.mark.parametrize("kwargs, words", [
    (dict(template="{text} it was"), "no {prompt:N} slot"),
    (dict(template="{prompt} {text}"), "positive count"),
    (dict(template="{prompt:2} {text} {mask} {mask}"), "more than one {mask}"),
    (dict(template="{prompt:2} {text:x}"), "not understood"),
    (dict(template="{prompt:2} {text", num_virtual_tokens=2), "malformed"),
    (dict(template="{prompt:2} {text}", num_virtual_tokens=3), "leave num_virtual_tokens unset"),
    (dict(encoder="gru"), "mlp, lstm"),
    (dict(verbalizer={"only": "good"}), "at least two labels"),
    (dict(encoder_hidden_size=0), "encoder_hidden_size must be a whole number of at least 1"),
])
def test_bad_configs_are_one_sentence_errors(kwargs, words):
    with pytest.raises(dt.DeltatuneError, match=words.replace("{", r"\{").replace("}", r"\}")):
        PTuning(**kwargs)


def test_bad_inputs_are_one_sentence_errors():
    with pytest.raises(dt.DeltatuneError, match="do not fit the model's context of 64"):
        dt.wrap(tiny_llama(), PTuning(num_virtual_tokens=64))
    with pytest.raises(dt.DeltatuneError, match="is 2 tokens"):
        PTuning(verbalizer={"neg": "bad", "pos": "fine film"}).label_token_ids(WordTokenizer())
    with pytest.raises(dt.DeltatuneError, match="no mask token"):
        PTuning(template="{prompt:2} {text} {mask}").render(WordTokenizer(), text="a")
    with pytest.raises(dt.DeltatuneError, match="needs a value for {text}"):
        PTuning(template=MIDDLE).render(WordTokenizer(), sentence="a")
    model = dt.wrap(tiny_llama(), PTuning(template="{prompt:2} {text}{prompt:1}"))
    with pytest.raises(dt.DeltatuneError, match="only 3 virtual tokens"):
        model(input_ids=torch.tensor([[5, -4, 6]]))


# --- the wrapped model ---------------------------------------------------------------------
@pytest.mark.parametrize("encoder, template", [("mlp", None), ("lstm", MIDDLE)])
def test_only_the_encoder_changes_after_an_optimizer_step(encoder, template):
    method = PTuning(num_virtual_tokens=None if template else 4, encoder=encoder, encoder_hidden_size=16,
                     template=template)
    model = dt.wrap(tiny_llama(), method)
    own = {id(p) for p in model.adapter_parameters("default").values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == own  # what the trainer checkpoints
    before = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = rendered(method, "the film was good", "a dull plot .")
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (id(param) in own), name
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_disabled_equals_base_and_outputs_keep_the_base_shape(input_ids):
    reference = logits_of(tiny_llama(), input_ids)
    model = dt.wrap(tiny_llama(), PTuning(num_virtual_tokens=4, encoder_hidden_size=16))
    adapted = logits_of(model, input_ids)
    assert adapted.shape == reference.shape and not torch.allclose(adapted, reference)
    with dt.disabled(model):
        assert torch.equal(logits_of(model, input_ids), reference)


def test_virtual_embeddings_sit_exactly_at_the_rendered_positions():
    method = PTuning(template=MIDDLE, encoder_hidden_size=16)
    model = dt.wrap(tiny_llama(), method)
    ids = rendered(method, "the film was good", "a dull plot .")
    seen = {}
    model.base_model.model.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    out = model(input_ids=ids, labels=ids)
    virtual = model.base_model.deltatune_p_tuning.encoders["default"]().detach()  # [5, 32]
    table = model.get_input_embeddings().weight
    expected = torch.stack([torch.stack([virtual[-i - 1] if i < 0 else table[i] for i in row]) for row in ids.tolist()])
    assert torch.equal(seen["inputs_embeds"], expected)
    assert out.logits.shape[:2] == ids.shape
    # the loss sees only real tokens: the virtual positions' labels became -100
    masked = ids.masked_fill(ids < 0, -100)
    assert torch.equal(out.loss, model(input_ids=ids, labels=masked).loss)


@pytest.mark.parametrize("template", [None, MIDDLE])
def test_save_load_round_trip_gives_equal_logits(template, tmp_path):
    method = PTuning(num_virtual_tokens=None if template else 4, template=template, encoder="lstm", encoder_hidden_size=8)
    model = dt.wrap(tiny_llama(), method)
    randomize(model)
    ids = rendered(method, "the film was good", "a dull plot .")
    expected = logits_of(model, ids)
    dt.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["encoder_reparameterization_type"] == "LSTM"
    assert config.get("deltatune_placement") == ("in_template" if template else None)
    loaded = dt.load_adapter(tiny_llama(), tmp_path)
    assert loaded.methods["default"] == method
    assert [p.shape for p in loaded.adapter_parameters("default").values()] == [(method.num_virtual_tokens, 32)]
    assert torch.equal(logits_of(loaded, ids), expected)


def test_a_trainable_load_brings_the_encoder_back(tmp_path, input_ids):
    method = PTuning(template=MIDDLE, encoder="lstm", encoder_hidden_size=8, verbalizer={"neg": "bad", "pos": "good"})
    model = dt.wrap(tiny_llama(), method)
    randomize(model)
    dt.save_adapter(model, tmp_path)
    resumed = dt.load_adapter(tiny_llama(), tmp_path, trainable=True)
    assert resumed.methods["default"] == method
    theirs, ours = model.adapter_parameters("default"), resumed.adapter_parameters("default")
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) and ours[k].requires_grad for k in ours)


def test_copying_the_trainable_parameters_resumes_exactly(input_ids):
    method = PTuning(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8)
    trained = dt.wrap(tiny_llama(), method)
    randomize(trained)
    fresh = dt.wrap(tiny_llama(), method)
    with torch.no_grad():
        for name, param in fresh.adapter_parameters("default").items():
            param.copy_(trained.adapter_parameters("default")[name])
    assert torch.equal(logits_of(fresh, input_ids), logits_of(trained, input_ids))


# --- generation -------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [PREFIX, MIDDLE])
def test_generate_with_cache_equals_without(template):
    method = PTuning(template=template, encoder_hidden_size=16)
    model = dt.wrap(tiny_llama(), method)
    randomize(model)
    ids = rendered(method, "the film was good", "a dull plot .")
    mask = torch.ones_like(ids)
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **GREEDY)
    assert torch.equal(cached, model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **GREEDY))


@pytest.mark.parametrize("template", [PREFIX, MIDDLE])
def test_left_padded_batch_generates_what_each_example_does_alone(template):
    method = PTuning(template=template, encoder_hidden_size=16)
    model = dt.wrap(tiny_llama(), method)
    randomize(model)
    examples = [method.render(WordTokenizer(), text=t) for t in ("a film", "the dull plot was bad .")]
    width = max(map(len, examples))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in examples])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in examples])
    batch = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)[:, width:]
    for row, example in enumerate(examples):
        alone = model.generate(input_ids=torch.tensor([example]), attention_mask=torch.ones(1, len(example),
                               dtype=torch.long), **GREEDY)[:, len(example):]
        assert torch.equal(batch[row:row + 1], alone)


# --- classification as cloze -----------------------------------------------------------------------
def test_label_scores_read_the_answer_position_in_closed_form():
    logits = torch.arange(2 * 4 * 6, dtype=torch.float).view(2, 4, 6)  # [batch, length, vocab]
    ids = torch.tensor([[1, 3, 5, 2], [1, 5, 3, 2]])
    assert torch.equal(label_scores(logits, ids, [4, 0], mask_token_id=3), logits[[0, 1], [1, 2]][:, [4, 0]])
    right_padded = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(label_scores(logits, ids, [2], attention_mask=right_padded), logits[[0, 1], [1, 3]][:, [2]])
    assert torch.equal(label_scores(logits, ids, [2]), logits[:, -1, [2]])
    assert torch.equal(label_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([1])), torch.log(torch.tensor(2.0)))
    with pytest.raises(dt.DeltatuneError, match="exactly one mask token"):
        label_scores(logits, ids, [0], mask_token_id=5 + 1)


@pytest.mark.parametrize("template", ["{prompt:4} {text} it was {mask} .", "{text} {prompt:2} it was {mask} ."])
def test_masked_lm_cloze_classifier_trains(template):
    tokenizer = WordTokenizer(masked_lm=True)
    method = PTuning(template=template, encoder_hidden_size=16, verbalizer={"negative": "bad", "positive": "great"})
    model = dt.wrap(tiny_bert_mlm(), method)
    texts = ["a good film", "a fine movie", "a great plot", "an awful film", "a dull movie", "a bad plot"]
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    ids = torch.tensor([method.render(tokenizer, text=t) for t in texts])
    words = method.label_token_ids(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(6):
        logits = model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
        loss = label_loss(label_scores(logits, ids, words, tokenizer.mask_token_id), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.6  # below ln 2: the classes are told apart


# --- peft interoperability -------------------------------------------------------------------------
peft = pytest.importorskip("peft", reason="peft is a test extra: pip install -e '.[test]'")


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_our_adapter_loads_in_peft(encoder, tmp_path, input_ids):
    model = dt.wrap(tiny_llama(), PTuning(num_virtual_tokens=4, encoder=encoder, encoder_hidden_size=16))
    randomize(model)
    expected = logits_of(model, input_ids)
    dt.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    # peft's logits include the 4 virtual positions; ours keep the base model's shape
    assert torch.allclose(logits_of(theirs, input_ids)[:, 4:], expected, atol=1e-5)


def test_peft_adapter_loads_here(tmp_path, input_ids):
    torch.manual_seed(5)
    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)
    theirs = peft.get_peft_model(tiny_llama(), config).eval()
    expected = logits_of(theirs, input_ids)[:, 4:]
    theirs.save_pretrained(str(tmp_path))
    ours = dt.load_adapter(tiny_llama(), tmp_path)
    assert isinstance(ours.base_model.deltatune_p_tuning, PromptEncoderDelta)
    assert torch.allclose(logits_of(ours, input_ids), expected, atol=1e-5)


def test_training_data_and_generation_render_the_template(tmp_path):
    """The data pipeline and generate_text place the virtual tokens where the template says."""
    from deltatune.data import Example, tokenize_example
    from deltatune.generation import generate_text
    from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(bundled("stories260K"))
    method = PTuning(template="{prompt:2} {text} {prompt:1} Answer:", encoder_hidden_size=8)
    item = tokenize_example(Example("a cat", " yes"), tokenizer, 64, partial(method.encode_prompt, tokenizer))
    assert item["input_ids"][0] == tokenizer.bos_token_id and item["input_ids"][1:3] == [-1, -2]
    assert -3 in item["input_ids"] and all(label == -100 for label in item["labels"][:item["input_ids"].index(-3) + 1])
    model = dt.wrap(load_causal_lm(bundled("stories260K")), method)
    [text] = generate_text(model, tokenizer, ["a cat"], max_new_tokens=3)
    assert isinstance(text, str)


def test_disabled_model_refuses_template_slots_with_a_clear_error():
    model = dt.wrap(tiny_llama(), PTuning(template="{text} {prompt:2} ok", encoder_hidden_size=8))
    slotted = torch.tensor([[5, 6, -1, -2, 7]])
    with dt.disabled(model), pytest.raises(dt.DeltatuneError, match="template slots"):
        model(input_ids=slotted)
