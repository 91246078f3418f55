"""A run's tokenized data lives in temporary files: the same examples as in memory, memory flat in the file's size."""

import json
import subprocess
import sys
import textwrap

import pytest

from deltatune.config import build_run
from deltatune.data import (Example, iter_examples, iter_tokenized, load_examples, pack_examples, split_examples,
                            tokenize_examples)
from deltatune.pretrained import bundled, load_tokenizer
from deltatune.runner import tokenized_data
from deltatune.token_store import TokenStore

MODEL = str(bundled("stories260K"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL, False)


def _examples(count: int) -> list[Example]:
    return load_examples(bundled("e2e/train.jsonl"), count)


def test_store_holds_what_tokenize_examples_returns(tokenizer):
    examples = _examples(40)
    in_memory = tokenize_examples(examples, tokenizer, 160)
    store = TokenStore.from_items(iter_tokenized(examples, tokenizer, 160))
    assert len(store) == len(in_memory) and list(store) == in_memory
    assert store[-1] == in_memory[-1] and store[3:6] == in_memory[3:6]
    assert store.lengths().tolist() == [len(item["input_ids"]) for item in in_memory]
    with pytest.raises(IndexError):
        store[len(store)]


def test_split_by_record_matches_split_examples_with_skipped_records(tokenizer):
    examples = _examples(60)
    # skip drops every record longer than 170 tokens, so records and examples differ in number
    whole = [tokenize_examples([example], tokenizer, 170, truncate="skip") for example in examples]
    assert sum(not kept for kept in whole) > 5, "the case needs skipped records"
    store = TokenStore.from_items(iter_tokenized(examples, tokenizer, 170, truncate="skip"))
    assert store.records == len(examples) and len(store) == sum(bool(kept) for kept in whole)
    train_examples, eval_examples = split_examples(examples, 0.2, seed=7)
    train, held_out = store.split_by_record(0.2, seed=7)
    assert list(train) == tokenize_examples(train_examples, tokenizer, 170, truncate="skip")
    assert list(held_out) == tokenize_examples(eval_examples, tokenizer, 170, truncate="skip")
    # a view of a view picks from its own order
    assert train.view([2, 0])[1] == train[0] and train.view([2, 0]).lengths().tolist() == [
        len(train[2]["input_ids"]), len(train[0]["input_ids"])]


def test_run_data_streams_into_stores_and_packs_like_pack_examples(tmp_path, tokenizer):
    data = bundled("e2e/train.jsonl")
    run = build_run({"model": MODEL, "data": str(data), "output": str(tmp_path / "out"), "method": "lora",
                     "eval_fraction": 0.1, "packing": True, "train": {"max_length": 128, "seed": 3}})
    train, held_out = tokenized_data(run, tokenizer)
    examples = load_examples(data)
    train_examples, eval_examples = split_examples(examples, 0.1, seed=3)
    assert isinstance(train, TokenStore) and isinstance(held_out, TokenStore)
    assert list(held_out) == tokenize_examples(eval_examples, tokenizer, 128)
    assert list(train) == pack_examples(tokenize_examples(train_examples, tokenizer, 128), 128)


def test_empty_data_file_is_refused_by_name(tmp_path, tokenizer):
    from deltatune.errors import DeltatuneError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    run = build_run({"model": MODEL, "data": str(empty), "output": str(tmp_path / "out"), "method": "lora"})
    with pytest.raises(DeltatuneError, match="empty.jsonl holds no examples"):
        tokenized_data(run, tokenizer)


MEASURE = textwrap.dedent("""
    import json, resource, sys
    from deltatune.config import build_run
    from deltatune.pretrained import load_tokenizer
    from deltatune.runner import tokenized_data
    model, data, output = sys.argv[1:4]
    run = build_run({"model": model, "data": data, "output": output, "method": "lora", "eval_fraction": 0.01})
    tokenizer = load_tokenizer(model, False)
    tokenizer("warm up the tokenizer's own buffers")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train, held_out = tokenized_data(run, tokenizer)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    tokens = int(train.lengths().sum() + held_out.lengths().sum())
    print(json.dumps({"kib": grown, "tokens": tokens}))
""")


def _grown(tmp_path, megabytes: float) -> dict:
    lines = [line for line in bundled("e2e/train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    path, size = tmp_path / f"data-{megabytes}.jsonl", 0
    with path.open("w", encoding="utf-8") as file:
        while size < megabytes * 1e6:
            for line in lines:
                file.write(line + "\n")
                size += len(line) + 1
    done = subprocess.run([sys.executable, "-c", MEASURE, MODEL, str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_training_data_memory_does_not_grow_with_the_file(tmp_path):
    small, large = _grown(tmp_path, 0.5), _grown(tmp_path, 3)
    added_tokens = large["tokens"] - small["tokens"]
    assert added_tokens > 1_000_000
    # in-memory token lists would hold at least an 8-byte pointer per token for ids and for labels
    list_pointers_kib = added_tokens * 2 * 8 / 1024
    assert large["kib"] - small["kib"] < list_pointers_kib / 4, (small, large, list_pointers_kib)


def test_iter_examples_reads_lazily(tmp_path):
    path = tmp_path / "broken-late.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n", encoding="utf-8")
    records = iter_examples(path)
    assert next(records) == Example("a", "b")  # the bad line is not read yet


def test_classification_and_seq2seq_runs_stream_into_stores(tmp_path, tokenizer):
    from deltatune.task_data import (iter_rows, label_names, load_classification_records, load_seq2seq_records,
                                     prepare_task_data, tokenize_classification, tokenize_seq2seq)

    table = tmp_path / "train.tsv"
    table.write_text("sentence\tlabel\n" + "".join(f"review number {k} {'good' * (k % 3)}\t{k % 2}\n"
                                                  for k in range(30)), encoding="utf-8")
    run = build_run({"model": MODEL, "data": str(table), "output": str(tmp_path / "o"), "task": "classification",
                     "eval_fraction": 0.2, "train": {"max_length": 16, "seed": 5}})
    data = prepare_task_data("classification", run, tokenizer)
    records = load_classification_records(table)
    train_records, eval_records = split_examples(records, 0.2, seed=5)
    assert data.labels == label_names(records) == [0, 1]
    assert list(data.train) == tokenize_classification(train_records, tokenizer, 16, [0, 1])
    assert list(data.eval) == tokenize_classification(eval_records, tokenizer, 16, [0, 1])
    assert isinstance(data.train[0]["labels"], int)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": f"say {k} " * (k % 4 + 1), "target": f"said {k}"}) + "\n"
                             for k in range(12)), encoding="utf-8")
    run = build_run({"model": MODEL, "data": str(pairs), "output": str(tmp_path / "p"), "task": "seq2seq",
                     "eval_data": str(pairs), "train": {"max_length": 32}})
    data = prepare_task_data("seq2seq", run, tokenizer)
    assert list(data.train) == list(data.eval) == tokenize_seq2seq(load_seq2seq_records(pairs), tokenizer, 32)
    assert len({len(item["input_ids"]) for item in data.train}) > 1  # the fields have lengths of their own

    quoted = tmp_path / "quoted.csv"
    quoted.write_text('text,label\n"two\nlines",a\nbad,row,here\n', encoding="utf-8")
    rows = iter_rows(quoted)
    assert next(rows)[1] == {"text": "two\nlines", "label": "a"}
    with pytest.raises(Exception, match="quoted.csv line 4 has 3 cells"):  # the quoted newline counts as a line
        next(rows)
    array = tmp_path / "array.json"
    array.write_text('\n\n[{"text": "a", "label": "x"},\n {"text": "b", "label": "y"}]\n', encoding="utf-8")
    assert [row for _, row in iter_rows(array)][1] == {"text": "b", "label": "y"}
    broken = tmp_path / "late.jsonl"
    broken.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "\xff", "label": "y"}\n')
    with pytest.raises(Exception, match=r"late.jsonl is not UTF-8 text \(line 2\)"):
        list(iter_rows(broken))
