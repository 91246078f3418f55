"""Evaluation: metrics against hand-computed values, batched generation, and `deltatune eval --json` per task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deltatune.cli import main
from deltatune.data import Example, collate, encode_prompt, load_examples, tokenize_examples
from deltatune.errors import DeltatuneError
from deltatune.evaluation import (METRIC_KEYS, classification_metrics, evaluate, generate_for_examples,
                                  generation_metrics, infer_task, is_chinese, label_scores, lm_loss,
                                  predict_label_words)
from deltatune.generation import generate_ids, generate_text
from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer

MODEL = str(bundled("stories260K"))


@pytest.fixture(scope="module")
def stories():
    return load_causal_lm(MODEL), load_tokenizer(MODEL)


# --- metrics on plain lists, by hand ---------------------------------------------------------


def test_accuracy_and_macro_f1_by_hand():
    gold = ["a", "a", "b", "b", "c"]
    predicted = ["a", "b", "b", "b", "a"]
    # a: TP 1, FP 1, FN 1 -> F1 1/2; b: TP 2, FP 1, FN 0 -> 4/5; c: TP 0 -> 0.
    metrics = classification_metrics(predicted, gold)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["f1"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    assert classification_metrics([1, 0, 1], [1, 0, 1]) == {"accuracy": 1.0, "f1": 1.0}  # ints (a classifier head)
    # a label only ever predicted counts too (as scikit-learn's macro average)
    assert classification_metrics(["x", "a"], ["a", "a"])["f1"] == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(DeltatuneError, match="as many predictions as gold labels"):
        classification_metrics(["a"], ["a", "b"])


def test_bleu_single_multi_and_variable_references_by_hand():
    # one reference: n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths (no brevity penalty)
    single = generation_metrics(["a b c d e"], [["a b c d f"]])
    assert single["bleu"] == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # two references: every n-gram is in one of them (clipped by the max count over references)
    assert generation_metrics(["a b c d e"], [["a b c d f", "x b c d e"]])["bleu"] == pytest.approx(100)
    # corpus of an item with one reference and one with two: counts add up over the corpus
    corpus = generation_metrics(["a b c d e", "a b c d e"], [["a b c d f"], ["a b c d f", "x b c d e"]])
    assert corpus["bleu"] == pytest.approx(100 * (9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25)


def test_rouge_l_takes_the_best_reference_and_averages_items():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 words each way: F = 5/6
    metrics = generation_metrics(["the cat sat on the mat"], [["a dog", "the cat is on the mat"]])
    assert metrics["rouge_l"] == pytest.approx(100 * 5 / 6)
    two = generation_metrics(["the cat sat on the mat", "a dog"], [["the cat is on the mat"], ["a cat"]])
    assert two["rouge_l"] == pytest.approx(100 * (5 / 6 + 1 / 2) / 2)  # "a dog" vs "a cat": LCS 1 of 2


def test_chinese_is_scored_by_characters():
    hypothesis, reference = "这件外套很好看", "这件外套好看"
    assert is_chinese([reference]) and not is_chinese(["the cat"]) and not is_chinese([""])
    metrics = generation_metrics([hypothesis], [[reference]])
    # characters: 1-grams 6/7, 2-grams 4/6, 3-grams 2/5, 4-grams 1/4; the hypothesis is longer (no penalty)
    assert metrics["bleu"] == pytest.approx(100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    # LCS 6 characters: precision 6/7, recall 6/6 -> F = 12/13
    assert metrics["rouge_l"] == pytest.approx(100 * 12 / 13)
    # rouge-score's own tokenizer sees no words in Chinese; the word-level setting says so
    assert generation_metrics([hypothesis], [[reference]], chinese=False)["rouge_l"] == 0


def test_infer_task_follows_the_data():
    assert infer_task([Example("p", "c")], ["x", "y"]) == "classification"
    assert infer_task([Example("", "text")]) == "lm"
    assert infer_task([Example("p", "c"), Example("", "t")]) == "generation"
    assert infer_task([Example("", "hi", (("user", "a"), ("assistant", "hi")))]) == "generation"


# --- scoring with a model ----------------------------------------------------------------------


def test_lm_loss_is_token_weighted_over_examples(stories):
    model, tokenizer = stories
    examples = [Example("Once upon a time", " there was a cat."), Example("The dog", " ran.")]
    items = tokenize_examples(examples, tokenizer, 512)
    with torch.no_grad():
        alone = [model(**collate([item], 0)).loss.item() for item in items]  # mean over each one's tokens
    counts = [sum(label != -100 for label in item["labels"][1:]) for item in items]
    expected = (alone[0] * counts[0] + alone[1] * counts[1]) / sum(counts)
    result = lm_loss(model, items, pad_token_id=0, batch_size=2)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_label_scores_are_summed_log_likelihoods(stories):
    model, tokenizer = stories
    prompt, candidate = encode_prompt(tokenizer, "The cat was"), [tokenizer.eos_token_id, 306]
    scores = label_scores(model, [prompt], [candidate, candidate[:1]], pad_token_id=0)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([prompt + candidate])).logits[0].float(), -1)
    n = len(prompt)
    expected = log_probs[n - 1, candidate[0]] + log_probs[n, candidate[1]]
    assert scores.shape == (1, 2)
    assert scores[0, 0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(log_probs[n - 1, candidate[0]].item(), rel=1e-5)


def test_classification_picks_the_most_likely_label_word(stories):
    model, tokenizer = stories
    examples = [Example("The sky was", " blue"), Example("The cat said", " happy"), Example("It was a", " blue")]
    labels = ["blue", "happy"]
    predicted = predict_label_words(model, tokenizer, examples, labels)
    eos = [tokenizer.eos_token_id]
    candidates = [tokenizer(" blue", add_special_tokens=False)["input_ids"] + eos,
                  tokenizer(" happy", add_special_tokens=False)["input_ids"] + eos]
    scores = label_scores(model, [encode_prompt(tokenizer, e.prompt) for e in examples], candidates, pad_token_id=0)
    assert predicted == [labels[i] for i in scores.argmax(-1)]
    metrics = evaluate(model, tokenizer, examples, labels=labels)
    assert set(metrics) == {"accuracy", "f1", "loss", "perplexity", "examples"}
    assert metrics == {**classification_metrics(predicted, ["blue", "happy", "blue"]),
                       **lm_loss(model, tokenize_examples(examples, tokenizer, 1024), pad_token_id=0),
                       "examples": 3}
    with pytest.raises(DeltatuneError, match="example 2 has completion 'happy', which is not one of the labels"):
        evaluate(model, tokenizer, examples, labels=["blue", "green"])


def test_batched_left_padded_generation_equals_one_at_a_time(stories):
    model, tokenizer = stories
    prompts = ["Once upon a time", "The cat", "Lily went to the park and saw a big", "Tom", "One day, a little bird"]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    alone = [generate_ids(model, [p], pad_token_id=0, eos_token_id=2, max_new_tokens=24)[0] for p in ids]
    for batch_size in (2, 5):
        assert generate_ids(model, ids, pad_token_id=0, eos_token_id=2, max_new_tokens=24,
                            batch_size=batch_size) == alone
    assert generate_text(model, tokenizer, prompts, max_new_tokens=24, batch_size=3) == [
        tokenizer.decode(new, skip_special_tokens=True) for new in alone]


def test_batched_generation_with_a_prompt_method_equals_one_at_a_time(stories):
    import deltatune as dt

    base, tokenizer = stories
    torch.manual_seed(0)
    model = dt.wrap(load_causal_lm(MODEL), dt.PromptTuning(num_virtual_tokens=3))
    prompts = ["Once upon a time", "The cat", "Lily went to the park and saw a big"]
    alone = [generate_text(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert generate_text(model, tokenizer, prompts, max_new_tokens=12, batch_size=3) == alone


def test_generation_groups_examples_by_prompt(stories, monkeypatch):
    import deltatune.evaluation as evaluation

    model, tokenizer = stories
    examples = [Example("name : A\n", "A is here ."), Example("name : B\n", "B is there ."),
                Example("name : A\n", "Here is A .")]
    seen = {}

    def fake_metrics(hypotheses, references, chinese=None):
        seen.update(hypotheses=hypotheses, references=references)
        return {"bleu": 1.0, "rouge_l": 2.0}
    monkeypatch.setattr(evaluation, "generation_metrics", fake_metrics)
    metrics = evaluation.evaluate(model, tokenizer, examples, max_new_tokens=4)
    assert seen["references"] == [["A is here .", "Here is A ."], ["B is there ."]]
    assert len(seen["hypotheses"]) == 2 and (metrics["bleu"], metrics["rouge_l"]) == (1.0, 2.0)


# --- the command -------------------------------------------------------------------------------


def run_eval(tmp_path: Path, data: Path, *extra: str) -> dict:
    out = tmp_path / f"{data.stem}-metrics.json"
    assert main(["eval", "--model", MODEL, "--data", str(data), "--json", str(out), "--max-new-tokens", "8",
                 *extra]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_eval_json_for_e2e_lines_scores_each_mr_against_all_its_texts(tmp_path, stories, capsys):
    data = tmp_path / "e2e.txt"
    data.write_text("name : A | food : French||A serves French food .\nname : A | food : French||French food at A .\n"
                    "name : B | area : riverside||B is by the river .\n", encoding="utf-8")
    metrics = run_eval(tmp_path, data)
    assert set(metrics) == {"bleu", "rouge_l", "loss", "perplexity", "examples"}
    printed = capsys.readouterr().out
    assert "2 distinct prompts" in printed and "tokenize=13a" in printed
    model, tokenizer = stories
    assert metrics == pytest.approx(evaluate(model, tokenizer, load_examples(data), max_new_tokens=8))
    assert metrics["examples"] == 3 and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_eval_json_for_advertisegen_says_it_scores_characters(tmp_path, capsys):
    data = tmp_path / "adgen.jsonl"
    rows = [{"content": "类型#上衣*材质#牛仔布", "summary": "这件牛仔外套很好看"}, {"content": "类型#裙", "summary": "裙子很美"}]
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    metrics = run_eval(tmp_path, data)
    assert set(metrics) == {"bleu", "rouge_l", "loss", "perplexity", "examples"} and metrics["examples"] == 2
    printed = capsys.readouterr().out
    assert "tokenize=zh: Chinese, by characters" in printed and "over characters (Chinese)" in printed


def test_eval_json_for_label_words_and_for_plain_text(tmp_path, stories):
    data = tmp_path / "sentiment.jsonl"
    rows = [{"prompt": "I loved it. It was", "completion": " positive"},
            {"prompt": "I hated it. It was", "completion": " negative"},
            {"prompt": "Great fun. It was", "completion": " positive"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    metrics = run_eval(tmp_path, data, "--labels", "positive,negative")
    assert set(metrics) == {"accuracy", "f1", "loss", "perplexity", "examples"}
    model, tokenizer = stories
    predicted = predict_label_words(model, tokenizer, load_examples(data), ["positive", "negative"])
    assert metrics["accuracy"] == pytest.approx(sum(p == g for p, g in zip(
        predicted, ["positive", "negative", "positive"])) / 3)

    text = tmp_path / "stories.jsonl"
    text.write_text('{"text": "Once upon a time there was a cat."}\n{"text": "The dog ran."}\n', encoding="utf-8")
    lm = run_eval(tmp_path, text, "--limit", "1")
    assert set(lm) == {"loss", "perplexity", "examples"} and lm["examples"] == 1
    assert lm["loss"] == pytest.approx(lm_loss(model, tokenize_examples(load_examples(text, 1), tokenizer, 1024),
                                               pad_token_id=0)["loss"])


def test_eval_errors_are_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "It was", "completion": " neutral"}\n', encoding="utf-8")
    assert main(["eval", "--model", MODEL, "--data", str(data), "--labels", "positive,negative"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "example 1 has completion 'neutral'" in error
    assert main(["eval", "--model", MODEL, "--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", MODEL, "--data", str(data), "--labels", "positive"]) == 1
    assert "at least two distinct labels" in capsys.readouterr().err


def test_metric_keys_are_the_documented_ones():
    assert METRIC_KEYS == ("accuracy", "f1", "bleu", "rouge_l", "loss", "perplexity", "examples")


# --- models of the other tasks: a classification head, an encoder-decoder -----------------------


def _save_with_stories_tokenizer(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    load_tokenizer(MODEL).save_pretrained(folder)
    return folder


def test_eval_json_for_a_classifier_head(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from deltatune.evaluation import evaluate_classifier
    from deltatune.predict import predict_labels  # the classification task's own code (another module)
    from deltatune.pretrained import load_trained
    from deltatune.task_data import load_classification_records

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, num_labels=2, pad_token_id=0,
                         id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    folder = _save_with_stories_tokenizer(LlamaForSequenceClassification(config).eval(), tmp_path / "classifier")
    data = tmp_path / "sst.jsonl"
    rows = [{"text": "a great film", "label": "positive"}, {"text": "dull and long", "label": "negative"},
            {"text": "I loved it", "label": "positive"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    metrics = run_eval(tmp_path, data, "--model", str(folder))  # the later --model wins
    assert set(metrics) == {"accuracy", "f1", "examples"} and metrics["examples"] == 3
    model, tokenizer, _, labels = load_trained(str(folder))
    predicted = [row["label"] for row in predict_labels(model, tokenizer, load_classification_records(data), labels)]
    assert metrics == pytest.approx(
        {**classification_metrics(predicted, ["positive", "negative", "positive"]), "examples": 3})
    assert evaluate_classifier(model, tokenizer, load_classification_records(data), labels) == metrics


def test_eval_json_for_an_encoder_decoder(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from deltatune.pretrained import load_trained
    from deltatune.task_data import collate_seq2seq, load_seq2seq_records, tokenize_seq2seq

    torch.manual_seed(0)
    config = T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    folder = _save_with_stories_tokenizer(T5ForConditionalGeneration(config).eval(), tmp_path / "t5")
    data = tmp_path / "pairs.jsonl"
    rows = [{"source": "name : A", "target": "A is here ."}, {"source": "name : A", "target": "Here is A ."},
            {"source": "name : B", "target": "B is there ."}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    metrics = run_eval(tmp_path, data, "--model", str(folder))
    assert set(metrics) == {"bleu", "rouge_l", "loss", "perplexity", "examples"} and metrics["examples"] == 3
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    model, tokenizer, _, _ = load_trained(str(folder))
    batch = collate_seq2seq(tokenize_seq2seq(load_seq2seq_records(data), tokenizer, 1024), 0)
    with torch.no_grad():
        mean = model(**batch).loss.item()  # the model's own mean over every target token of the set
    assert metrics["loss"] == pytest.approx(mean, rel=1e-5)


def test_chat_examples_are_scored_against_their_last_answer(stories):
    import copy

    model, tokenizer = stories
    chatty = copy.deepcopy(tokenizer)
    chatty.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    examples = [Example("", "Hello friend.", (("user", "Hi"), ("assistant", "Hello friend."))),
                Example("", "Goodbye.", (("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"),
                                         ("assistant", "Goodbye.")))]
    metrics = evaluate(model, chatty, examples, max_new_tokens=6)
    assert set(metrics) == {"bleu", "rouge_l", "loss", "perplexity", "examples"}
    hypotheses, references = generate_for_examples(model, chatty, examples, max_new_tokens=6)
    assert references == [["Hello friend."], ["Goodbye."]] and len(hypotheses) == 2
    assert metrics["bleu"] == pytest.approx(generation_metrics(hypotheses, references)["bleu"])
