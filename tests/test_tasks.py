"""Tasks through the CLI (classification, seq2seq) and models users bring (a .gguf file).

Tiny models are saved to tmp folders with the bundled stories260K tokenizer (vocabulary 512);
the GGUF file is written here, from stories260K, with the gguf package's own writer.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BartConfig, BartForConditionalGeneration,
                          BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          T5Config, T5ForConditionalGeneration)

import deltatune as dt
from deltatune.cli import main
from deltatune.config import build_run, merge_settings, read_yaml
from deltatune.data import IGNORE_INDEX
from deltatune.errors import DeltatuneError
from deltatune.predict import generate_seq2seq, predict_labels
from deltatune.pretrained import bundled, infer_task, load_causal_lm, load_model, load_trained, read_labels
from deltatune.runner import run_training
from deltatune.task_data import (collate_classification, collate_seq2seq, label_names, load_classification_records,
                                 load_seq2seq_records, tokenize_classification, tokenize_seq2seq)
from deltatune.train import _accumulate_gradients
from deltatune.runtime import Runtime

STORIES = bundled("stories260K")
VOCAB = 512
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=VOCAB, max_position_embeddings=128)
SENTENCES = [("a happy good day", "pos"), ("a sad bad day", "neg"), ("good and happy", "pos"),
             ("bad and sad", "neg"), ("what a lovely film", "pos"), ("a dull grey mess", "neg")]


def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES)


def save_with_tokenizer(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny model folders, each with a tokenizer: an encoder without a head, a decoder LM,
    a decoder classifier, BART and T5."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    seq2seq = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    return {
        "bert": save_with_tokenizer(BertModel(BertConfig(**SMALL, hidden_dropout_prob=0.0,
                                                         attention_probs_dropout_prob=0.0)), root / "bert"),
        "llama": save_with_tokenizer(LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2)), root / "llama"),
        "llama_cls": save_with_tokenizer(LlamaForSequenceClassification(
            LlamaConfig(**SMALL, num_key_value_heads=2, num_labels=3, pad_token_id=0)), root / "llama_cls"),
        "bart": save_with_tokenizer(BartForConditionalGeneration(BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
            forced_eos_token_id=None, **seq2seq)), root / "bart"),
        "t5": save_with_tokenizer(T5ForConditionalGeneration(T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
            **{**seq2seq, "decoder_start_token_id": 0})), root / "t5"),
    }


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, row)) + "\n" for row in rows),
                    encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def cli_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("deltatune: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# --- records -----------------------------------------------------------------------------------
def test_tsv_csv_and_jsonl_records_with_default_columns(tmp_path):
    tsv = load_classification_records(write_tsv(tmp_path / "a.tsv", [('say "hi" now', 1), ("no", 0)]))
    assert [(r.text, r.label, r.text_pair) for r in tsv] == [('say "hi" now', 1, None), ("no", 0, None)]
    csv_path = tmp_path / "b.csv"
    csv_path.write_text('sentence1,sentence2,label\n"a, b",c,same\nd,e,other\n', encoding="utf-8")
    pairs = load_classification_records(csv_path)
    assert [(r.text, r.text_pair, r.label) for r in pairs] == [("a, b", "c", "same"), ("d", "e", "other")]
    jsonl = load_classification_records(write_jsonl(tmp_path / "c.jsonl", [
        {"text": "x", "text_pair": "y", "label": 2}, {"text": "z", "text_pair": "w", "label": 10}]))
    assert [(r.text, r.text_pair, r.label) for r in jsonl] == [("x", "y", 2), ("z", "w", 10)]
    named = load_classification_records(write_tsv(tmp_path / "d.tsv", [("q", "yes")], header=("review", "stars")),
                                        text_column="review", label_column="stars")
    assert (named[0].text, named[0].label) == ("q", "yes")


def test_label_list_is_sorted_numerically_or_as_given(tmp_path):
    records = load_classification_records(write_jsonl(tmp_path / "n.jsonl", [
        {"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 2}]))
    assert label_names(records) == [2, 10]  # numbers in numeric order, not as text ("10" < "2")
    assert label_names(records, given=[10, 2]) == [10, 2]
    with pytest.raises(DeltatuneError, match=r"line 2 has label 2, which the labels setting \(10, 3\)"):
        label_names(records, given=[10, 3])
    words = load_classification_records(write_tsv(tmp_path / "w.tsv", [("a", "pos"), ("b", "neg")]))
    assert label_names(words) == ["neg", "pos"]


def test_bad_classification_files_name_file_line_and_fix(tmp_path):
    data = write_tsv(tmp_path / "d.tsv", [("good", 1)])
    with pytest.raises(DeltatuneError, match=r"d.tsv has no label column 'target' \(its columns: sentence, label\); "
                                             r"set label_column"):
        load_classification_records(data, label_column="target")
    no_label = write_tsv(tmp_path / "e.tsv", [("good", 1)], header=("sentence", "score"))
    with pytest.raises(DeltatuneError, match=r"e.tsv has no label column 'label'"):
        load_classification_records(no_label)
    assert load_classification_records(no_label, require_labels=False)[0].label is None  # data to predict
    ragged = tmp_path / "f.tsv"
    ragged.write_text("sentence\tlabel\nfine\t1\nbroken\n", encoding="utf-8")
    with pytest.raises(DeltatuneError, match=r"f.tsv line 3 has 1 cells but the header names 2"):
        load_classification_records(ragged)
    no_text = write_jsonl(tmp_path / "g.jsonl", [{"body": "x", "label": 1}])
    with pytest.raises(DeltatuneError, match=r"no text column \(its columns: body, label\); name one with text_column"):
        load_classification_records(no_text)
    empty_label = write_jsonl(tmp_path / "h.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": " "}])
    with pytest.raises(DeltatuneError, match=r"h.jsonl line 2 has an empty 'label'"):
        load_classification_records(empty_label)
    with pytest.raises(DeltatuneError, match=r"i.jsonl line 1 has fields \['input', 'output'\] but a seq2seq record"):
        load_seq2seq_records(write_jsonl(tmp_path / "i.jsonl", [{"input": "a", "output": "b"}]))


def test_seq2seq_records_accept_source_target_and_prompt_completion(tmp_path):
    records = load_seq2seq_records(write_jsonl(tmp_path / "s.jsonl", [
        {"source": "a", "target": "b"}, {"prompt": "c", "completion": "d"}]))
    assert [(r.source, r.target) for r in records] == [("a", "b"), ("c", "d")]


def test_collated_batches_have_per_example_labels_and_separately_padded_targets(tmp_path):
    records = load_classification_records(write_tsv(tmp_path / "a.tsv", SENTENCES[:3]))
    batch = collate_classification(tokenize_classification(records, tokenizer(), 64, ["neg", "pos"]), pad_token_id=0)
    assert batch["labels"].tolist() == [1, 0, 1] and batch["labels"].shape == (3,)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    s2s = load_seq2seq_records(write_jsonl(tmp_path / "s.jsonl", [
        {"source": "hi", "target": "a much longer target sentence than the source"}, {"source": "a b c", "target": "x"}]))
    batch = collate_seq2seq(tokenize_seq2seq(s2s, tokenizer(), 64), pad_token_id=0)
    assert batch["labels"].shape[1] > batch["input_ids"].shape[1]  # targets padded to their own length
    assert (batch["labels"][1] == IGNORE_INDEX).sum() > 0 and (batch["labels"][0] != IGNORE_INDEX).all()


# --- the one training loop: micro-batches weigh by their share of the step's targets -------------
def _gradients(model, micro_batches):
    model.zero_grad(set_to_none=True)
    _accumulate_gradients(model, micro_batches, torch.device("cpu"), False, Runtime())
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["classification", "seq2seq"])
def test_accumulating_two_micro_batches_equals_one_batch(kind, folders, tmp_path):
    """2 x 2 examples give the gradient of one batch of 4: the loss counts one target per
    classified example, and every target token of an encoder-decoder (no causal shift)."""
    if kind == "classification":
        model = load_model(folders["llama"], "classification", labels=["neg", "pos"], pad_token_id=0)
        records = load_classification_records(write_tsv(tmp_path / "a.tsv", SENTENCES[:4]))
        items = tokenize_classification(records, tokenizer(), 64, ["neg", "pos"])
        collate = collate_classification
    else:
        model = load_model(folders["bart"], "seq2seq")
        records = load_seq2seq_records(write_jsonl(tmp_path / "s.jsonl", [
            {"source": "a b", "target": "one"}, {"source": "c", "target": "two words here"},
            {"source": "d e f", "target": "three more words here too"}, {"source": "g", "target": "x"}]))
        items = tokenize_seq2seq(records, tokenizer(), 64)
        collate = collate_seq2seq
    model = dt.wrap(model, dt.LoRA(rank=2, targets="all-linear"))
    for name, param in model.named_parameters():  # B = 0 at init would give A no gradient
        if "lora_B" in name and param.requires_grad:
            torch.nn.init.normal_(param, std=0.1)
    whole = _gradients(model, [collate(items, 0)])
    halves = _gradients(model, [collate(items[:2], 0), collate(items[2:], 0)])
    for name in whole:
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-4, atol=1e-6)  # fp32 summation order only


# --- classification through the CLI ----------------------------------------------------------------
def _cls_data(tmp_path: Path) -> Path:
    return write_tsv(tmp_path / "train.tsv", SENTENCES * 4)


def _train(argv: list[str]) -> None:
    assert main(["train", "--quiet", *argv]) == 0


def test_encoder_classifier_with_lora_restores_its_head_on_a_fresh_base(folders, tmp_path):
    output = tmp_path / "run"
    run = build_run(merge_settings({"model": str(folders["bert"]), "data": str(_cls_data(tmp_path)),
                                    "output": str(output), "task": "classification", "max_steps": 6,
                                    "batch_size": 4, "learning_rate": 1e-2, "rank": 2}))
    trained = run_training(run, progress=False).model.eval()
    assert read_labels(output) == ["neg", "pos"]
    record = build_run(merge_settings(read_yaml(output / "deltatune_run.yaml")))
    assert (record.task, record.labels) == ("classification", ("neg", "pos"))
    assert json.loads((output / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    ids = torch.tensor([[1, 45, 67, 89, 2]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        # a fresh base from transformers alone, head sized by hand: load_adapter brings the trained head
        fresh = AutoModelForSequenceClassification.from_pretrained(folders["bert"], num_labels=2)
        assert not torch.allclose(fresh(input_ids=ids).logits, expected)
        assert torch.equal(dt.load_adapter(fresh, output)(input_ids=ids).logits, expected)
        model, _, task, labels = load_trained(folders["bert"], output)
        assert (task, labels) == ("classification", ["neg", "pos"])
        assert model.config.id2label == {0: "neg", 1: "pos"}
        assert torch.equal(model(input_ids=ids).logits, expected)
    peft = pytest.importorskip("peft", reason="peft is a test extra")
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(folders["bert"], num_labels=2), str(output)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=0)  # fp32 op order only


def test_decoder_classifier_learns_and_predict_writes_probabilities(folders, tmp_path, capsys):
    output = tmp_path / "run"
    _train(["--model", str(folders["llama"]), "--data", str(_cls_data(tmp_path)), "--output", str(output),
            "--max-steps", "30", "task=classification", "batch_size=8", "learning_rate=1e-2", "eval_fraction=0"])
    held_out = write_jsonl(tmp_path / "test.jsonl", [{"text": t, "label": y} for t, y in SENTENCES])
    predictions = tmp_path / "pred.jsonl"
    capsys.readouterr()
    assert main(["predict", "--model", str(folders["llama"]), "--adapter", str(output), "--data", str(held_out),
                 "--output", str(predictions)]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert summary == {"output": str(predictions), "examples": 6, "accuracy": 1.0}
    for row, (text, label) in zip(rows, SENTENCES):
        assert (row["text"], row["true_label"], row["label"]) == (text, label, label)
        assert set(row["probabilities"]) == {"neg", "pos"}
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5


def test_predict_limit_reads_no_further_than_the_records_it_keeps(folders, tmp_path, capsys):
    broken = [{"text": t, "label": y} for t, y in SENTENCES[:2]] + [{"label": "pos"}]  # the third has no text
    data, output = write_jsonl(tmp_path / "d.jsonl", broken), tmp_path / "p.jsonl"
    capsys.readouterr()
    assert main(["predict", "--model", str(folders["llama_cls"]), "--data", str(data), "--output", str(output),
                 "--limit", "2"]) == 0
    assert [json.loads(line)["text"] for line in output.read_text().splitlines()] == [t for t, _ in SENTENCES[:2]]
    assert "has no 'text' field" in cli_error(["predict", "--model", str(folders["llama_cls"]), "--data", str(data),
                                                "--output", str(output)], capsys)


def test_decoder_classifier_reads_the_last_token_whatever_the_padding(folders, tmp_path):
    model, tok, _, labels = load_trained(folders["llama_cls"])
    assert labels == ["LABEL_0", "LABEL_1", "LABEL_2"]  # a classifier folder's own labels
    records = load_classification_records(write_tsv(tmp_path / "a.tsv", SENTENCES), require_labels=False)
    one_by_one = predict_labels(model, tok, records, labels, batch_size=1)
    batched = predict_labels(model, tok, records, labels, batch_size=6)  # right-padded to the longest
    for single, padded in zip(one_by_one, batched):
        for label in labels:
            assert abs(single["probabilities"][label] - padded["probabilities"][label]) < 1e-5


def test_full_fine_tuning_writes_a_classifier_folder_with_its_labels(folders, tmp_path, capsys):
    output = tmp_path / "full"
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": int(y == "pos")} for t, y in SENTENCES * 2])
    _train(["--model", str(folders["bert"]), "--data", str(data), "--output", str(output), "--method", "full",
            "--max-steps", "2", "--task", "classification", "batch_size=4"])
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["id2label"] == {"0": "0", "1": "1"}
    assert read_labels(output) == [0, 1] and infer_task(output) == "classification"
    capsys.readouterr()
    assert main(["predict", "--model", str(output), "--data", str(data), "--output", str(tmp_path / "p.jsonl")]) == 0
    first = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert first["label"] in (0, 1) and set(first["probabilities"]) == {"0", "1"}


def test_classification_errors_are_one_sentence(folders, tmp_path, capsys):
    data = _cls_data(tmp_path)
    err = cli_error(["train", "--model", str(folders["bert"]), "--data", str(data), "--output", str(tmp_path / "o"),
                     "task=classification", "label_column=sentiment"], capsys)
    assert "no label column 'sentiment'" in err and "sentence, label" in err and "train.tsv" in err
    err = cli_error(["train", "--model", str(folders["bert"]), "--data", str(data), "--output", str(tmp_path / "o"),
                     "task=tagging"], capsys)
    assert "task 'tagging' is unknown" in err and "classification" in err
    err = cli_error(["train", "--model", str(folders["bert"]), "--data", str(data), "--output", str(tmp_path / "o")],
                    capsys)
    assert "pass task=classification" in err
    err = cli_error(["predict", "--model", str(folders["llama"]), "--data", str(data),
                     "--output", str(tmp_path / "p.jsonl")], capsys)
    assert "causal-lm model" in err and "is a table" in err and "task=classification" in err
    err = cli_error(["generate", "--model", str(folders["llama_cls"]), "--prompt", "hi"], capsys)
    assert "is a classifier" in err and "deltatune predict" in err


# --- seq2seq through the CLI ---------------------------------------------------------------------
def test_task_is_read_from_the_model_config(folders):
    assert [infer_task(folders[name]) for name in ("bert", "llama", "llama_cls", "bart", "t5")] == [
        "causal-lm", "causal-lm", "classification", "seq2seq", "seq2seq"]


@pytest.mark.parametrize("arch", ["bart", "t5"])
@pytest.mark.parametrize("method,extra", [("lora", ["rank=4"]), ("prefix", ["num_virtual_tokens=4"])])
def test_seq2seq_trains_from_the_cli_and_generates(arch, method, extra, folders, tmp_path, capsys):
    rows = [{"source": f"say {word}", "target": word} for word in ("cat", "dog", "sun", "tree")] * 4
    data = write_jsonl(tmp_path / "s2s.jsonl", rows)
    output = tmp_path / f"{arch}-{method}"
    capsys.readouterr()
    _train(["--model", str(folders[arch]), "--data", str(data), "--output", str(output), "--method", method,
            "--max-steps", "15", "batch_size=8", "learning_rate=3e-2", "eval_fraction=0.25", *extra])
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["eval_loss"] < steps[0]["eval_loss"]  # it learns (closed form: tiny model, fixed seed)
    assert json.loads((output / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    capsys.readouterr()
    assert main(["generate", "--model", str(folders[arch]), "--adapter", str(output), "--prompt", "say cat",
                 "--max-new-tokens", "4"]) == 0
    assert not capsys.readouterr().out.startswith("say cat")  # the decoder's text alone, not the prompt + more
    model, tok, task, _ = load_trained(folders[arch], output)
    assert task == "seq2seq"
    batch = collate_seq2seq(tokenize_seq2seq(load_seq2seq_records(data)[:2], tok, 64), 0)
    again = dt.load_adapter(load_model(folders[arch], "seq2seq"), output)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_predict_writes_each_sources_generation_with_its_target(arch, folders, tmp_path, capsys):
    records = [{"source": "say cat"}, {"source": "say dog", "target": "dog"}, {"source": "say sun"}]
    data, output = write_jsonl(tmp_path / "sources.jsonl", records), tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main(["predict", "--model", str(folders[arch]), "--data", str(data), "--output", str(output),
                 "--max-new-tokens", "5", "--batch-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == {"output": str(output), "examples": 3}
    model, tok, _, _ = load_trained(folders[arch])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    for row, record in zip(rows, records):
        [alone] = generate_seq2seq(model, tok, [record["source"]], max_new_tokens=5)
        assert row == {"source": record["source"], "prediction": alone.strip(),
                       **({"reference": record["target"]} if "target" in record else {})}
    err = cli_error(["predict", "--model", str(folders[arch]), "--data", str(write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "say cat"}])), "--output", str(tmp_path / "bad-out.jsonl")], capsys)
    assert "needs 'source' (or 'prompt')" in err and not (tmp_path / "bad-out.jsonl").exists()


# --- models users bring: a .gguf file ------------------------------------------------------------
def write_llama_gguf(source: Path, path: Path) -> Path:
    """A llama GGUF of the model in ``source`` (F32 tensors, sentencepiece vocabulary), laid out as
    llama.cpp's converter does: its names, Q and K rows permuted for its rotary layout."""
    gguf = pytest.importorskip("gguf")
    import sentencepiece

    model = LlamaForCausalLM.from_pretrained(source)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    kinds = []
    for i in range(pieces.vocab_size()):
        kinds.append(gguf.TokenType.UNKNOWN if pieces.is_unknown(i) else gguf.TokenType.CONTROL if pieces.is_control(i)
                     else gguf.TokenType.BYTE if pieces.is_byte(i) else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([pieces.id_to_piece(i).encode() for i in range(pieces.vocab_size())])
    writer.add_token_scores([pieces.get_score(i) for i in range(pieces.vocab_size())])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def permute(weight, heads):  # llama.cpp's rotary layout (its convert_hf_to_gguf.py)
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if key == "lm_head.weight":  # tied to the embeddings
            continue
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            _, _, layer, *rest = key.split(".")
            part = names[".".join(rest[:-1])]
            name = f"blk.{layer}.{part}.weight"
            if part == "attn_q":
                array = permute(array, config.num_attention_heads)
            elif part == "attn_k":
                array = permute(array, config.num_key_value_heads)
        writer.add_tensor(name, array.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_llama_gguf(STORIES, tmp_path_factory.mktemp("gguf") / "stories260K.F32.gguf")


def test_gguf_file_loads_as_the_model_it_was_written_from(gguf_file):
    ids = torch.tensor([[1, 403, 407, 261, 378, 383]])
    with torch.no_grad():
        assert torch.equal(load_causal_lm(gguf_file)(ids).logits, load_causal_lm(STORIES)(ids).logits)
    from deltatune.pretrained import load_tokenizer

    text = "Once upon a time there was a cat."
    assert load_tokenizer(gguf_file)(text).input_ids[-8:] == load_tokenizer(STORIES)(text).input_ids[-8:]
    assert infer_task(gguf_file) == "causal-lm"


def test_gguf_trains_merges_and_fully_fine_tunes_into_plain_folders(gguf_file, tmp_path, capsys):
    rows = [json.loads(line) for line in bundled("e2e/train.jsonl").read_text().splitlines()[:16]]
    data = write_jsonl(tmp_path / "e2e.jsonl", rows)
    adapter = tmp_path / "lora"
    _train(["--model", str(gguf_file), "--data", str(data), "--output", str(adapter), "--max-steps", "2",
            "batch_size=4", "learning_rate=1e-2"])
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gguf_file)
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(gguf_file), "--adapter", str(adapter), "--output", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    assert (merged / "model.safetensors").is_file() and "quantization_config" not in (merged / "config.json").read_text()
    plain = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([[1, 403, 407, 261]])
    with torch.no_grad():
        adapted = dt.load_adapter(load_causal_lm(gguf_file), adapter)
        torch.testing.assert_close(plain(ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=0)  # merge rounding
    full = tmp_path / "full"
    _train(["--model", str(gguf_file), "--data", str(data), "--output", str(full), "--method", "full",
            "--max-steps", "1", "batch_size=4"])
    AutoModelForCausalLM.from_pretrained(full)
    AutoTokenizer.from_pretrained(full)
    capsys.readouterr()
    assert main(["generate", "--model", str(full), "--prompt", "name : Aromi", "--max-new-tokens", "3"]) == 0


def test_gguf_without_the_gguf_package_says_how_to_install_it(gguf_file, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "gguf" else real(name, *args))
    err = cli_error(["generate", "--model", str(gguf_file), "--prompt", "hi"], capsys)
    assert "needs the gguf package" in err and "pip install deltatune[gguf]" in err


def test_a_file_that_is_not_gguf_is_refused(tmp_path, capsys):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    err = cli_error(["generate", "--model", str(weights), "--prompt", "hi"], capsys)
    assert "not a .gguf one" in err


@pytest.mark.parametrize("method,extra", [("lora", {"rank": 2}), ("prompt", {"num_virtual_tokens": 4}),
                                          ("prefix", {"num_virtual_tokens": 4}), ("ptuning-v2", {"num_virtual_tokens": 4}),
                                          ("freeze", {}), ("full", {})])
def test_every_method_trains_the_head_and_round_trips_a_classifier(method, extra, folders, tmp_path):
    output = tmp_path / method
    run = build_run(merge_settings({"model": str(folders["bert"]), "data": str(_cls_data(tmp_path)),
                                    "output": str(output), "task": "classification", "method": method,
                                    "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, **extra}))
    trained = run_training(run, progress=False).model.eval()
    ids = torch.tensor([[1, 45, 67, 89, 2], [1, 300, 301, 302, 2]])
    as_adapter = (output / "adapter_config.json").is_file()
    model, _, task, labels = load_trained(folders["bert"], output) if as_adapter else load_trained(output)
    fresh = load_model(folders["bert"], "classification", labels=["neg", "pos"])
    assert (task, labels) == ("classification", ["neg", "pos"])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert not torch.equal(fresh(input_ids=ids).logits, expected)
    trained_names = [name for name, p in trained.named_parameters() if p.requires_grad]
    assert any(name.split(".")[-2:] == ["classifier", "weight"] or ".classifier." in name for name in trained_names)


def test_a_classifier_folder_keeps_its_head_only_when_the_label_count_fits(folders):
    own = LlamaForSequenceClassification.from_pretrained(folders["llama_cls"]).score.weight
    resized = load_model(folders["llama_cls"], "classification", labels=["a", "b"])
    assert resized.score.weight.shape == (2, 32) and resized.config.id2label == {0: "a", 1: "b"}
    kept = load_model(folders["llama_cls"], "classification", labels=["x", "y", "z"])
    assert torch.equal(kept.score.weight, own) and kept.config.label2id == {"x": 0, "y": 1, "z": 2}


def test_predict_reads_the_columns_the_run_was_trained_with(folders, tmp_path, capsys):
    data = write_tsv(tmp_path / "reviews.tsv", [(t, y) for t, y in SENTENCES], header=("review", "stars"))
    output = tmp_path / "run"
    _train(["--model", str(folders["bert"]), "--data", str(data), "--output", str(output), "--max-steps", "1",
            "task=classification", "text_column=review", "label_column=stars", "max_length=16"])
    capsys.readouterr()
    assert main(["predict", "--model", str(folders["bert"]), "--adapter", str(output), "--data", str(data),
                 "--output", str(tmp_path / "p.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 6
    assert "true_label" in json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    unlabelled = write_jsonl(tmp_path / "new.jsonl", [{"review": "a good day"}])
    assert main(["predict", "--model", str(folders["bert"]), "--adapter", str(output), "--data", str(unlabelled),
                 "--output", str(tmp_path / "q.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] is None
    err = cli_error(["predict", "--model", str(folders["bert"]), "--adapter", str(output), "--data", str(unlabelled),
                     "--output", str(tmp_path / "r.jsonl"), "--label-column", "stars"], capsys)
    assert "new.jsonl has no label column 'stars'" in err


def _headerless(path: Path, rows) -> Path:
    path.write_text("".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8")
    return path


def test_a_headerless_table_reads_with_columns_and_its_first_row_is_data(tmp_path, capsys):
    # ChnSentiCorp's layout: text<TAB>label, no header row
    rows = [("房间太小。其他的都一般", "negative"), ("服务很好，下次还来", "positive"), ("太吵了", "negative")]
    path = _headerless(tmp_path / "reviews.tsv", rows)
    records = load_classification_records(path, columns=("text", "label"))
    assert [(r.text, r.label) for r in records] == rows
    assert records[0].where == f"{path} line 1"
    with pytest.raises(DeltatuneError, match=r"first row is data.*columns=text,label"):
        load_classification_records(path)
    with pytest.raises(DeltatuneError, match="line 2 has 3 cells but the columns setting names 2"):
        load_classification_records(_headerless(tmp_path / "bad.tsv", [("a", "b"), ("c\td", "e")]),
                                    columns=("text", "label"))
    with pytest.raises(DeltatuneError, match="is JSON, whose records name their own fields"):
        load_classification_records(write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": "b"}]),
                                    columns=("text", "label"))
    seq = tmp_path / "pairs.tsv"
    seq.write_text("hello\tbonjour\n", encoding="utf-8")
    assert load_seq2seq_records(seq, ("source", "target"))[0].target == "bonjour"


@pytest.mark.parametrize("value, expected", [("text,label", ("text", "label")), (["text", "label"], ("text", "label")),
                                             (None, None)])
def test_columns_setting_is_a_list_of_distinct_names(value, expected, tmp_path):
    settings = {"model": "m", "data": "d.tsv", "output": str(tmp_path), "columns": value}
    assert build_run(merge_settings(settings)).columns == expected


@pytest.mark.parametrize("value", ["text,text", [], [1, 2], "text,", 5])
def test_bad_columns_settings_are_one_sentence(value, tmp_path):
    with pytest.raises(DeltatuneError, match="columns"):
        build_run(merge_settings({"model": "m", "data": "d.tsv", "output": str(tmp_path), "columns": value}))


def test_headerless_training_data_trains_and_predict_reuses_its_columns(folders, tmp_path, capsys):
    data = _headerless(tmp_path / "train.tsv", SENTENCES * 2)
    output = tmp_path / "run"
    _train(["--model", str(folders["bert"]), "--data", str(data), "--output", str(output), "--max-steps", "1",
            "task=classification", "columns=text,label", "max_length=16", "eval_fraction=0"])
    assert read_labels(output) == ["neg", "pos"]
    capsys.readouterr()
    assert main(["predict", "--model", str(folders["bert"]), "--adapter", str(output), "--data", str(data),
                 "--output", str(tmp_path / "p.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == len(SENTENCES) * 2
    capsys.readouterr()
    assert main(["eval", "--model", str(folders["bert"]), "--adapter", str(output), "--data", str(data),
                 "--columns", "text,label", "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["examples"] == len(SENTENCES) * 2
