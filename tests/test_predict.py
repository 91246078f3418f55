"""`deltatune predict` on a decoder: one generation per prompt of a file, in the records' order.

Each record's prompt is laid out as training laid it out, so a row's prediction is what
`generate_text` writes for that prompt alone; a record's own answer comes back as `reference`.
Classifiers (`predict_labels`) and encoder-decoders are tested with their tasks (`test_tasks.py`).
"""

from __future__ import annotations

import copy
import shutil
import json
from pathlib import Path

import pytest
import torch

from deltatune.cli import main
from deltatune.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, load_prompts
from deltatune.generation import generate_text
from deltatune.predict import predict_texts
from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer, load_trained

MODEL = bundled("stories260K")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

RECORDS = [  # (record, the prompt text it stands for, its answer)
    ({"prompt": "name : Aromi | Type : coffee shop\n"}, "name : Aromi | Type : coffee shop\n", None),
    ({"prompt": "name : Zizzi | area : riverside\n", "completion": "Zizzi is by the river."},
     "name : Zizzi | area : riverside\n", "Zizzi is by the river."),
    ({"text": "Once upon a time"}, "Once upon a time", None),
    ({"instruction": "Name a colour."}, ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour."), None),
    ({"instruction": "Add one.", "input": "2", "output": "3"},
     ALPACA_PROMPT.format(instruction="Add one.", input="2"), "3"),
    ({"content": "type#dress*colour#black"}, "type#dress*colour#black", None),
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_each_prompt_gets_the_generation_it_gets_alone_with_its_reference(trained, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [record for record, _, _ in RECORDS])
    output = tmp_path / "predictions.jsonl"
    capsys.readouterr()
    assert main(["predict", "--model", str(MODEL), "--adapter", str(trained), "--data", str(data), "--output",
                 str(output), "--max-new-tokens", "8", "--batch-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == {"output": str(output), "examples": len(RECORDS)}
    model, tokenizer, _, _ = load_trained(MODEL, trained)
    rows = read_jsonl(output)
    assert len(rows) == len(RECORDS)
    for row, (_, prompt, answer) in zip(rows, RECORDS):
        [alone] = generate_text(model, tokenizer, [prompt], max_new_tokens=8, batch_size=1)
        expected = {"prompt": prompt, "prediction": alone.strip(), **({"reference": answer} if answer else {})}
        assert row == expected
    assert any(row["prediction"] for row in rows)  # something was generated


def test_the_adapter_changes_what_is_predicted(trained, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [record for record, _, _ in RECORDS[:2]])
    tuned, base = tmp_path / "tuned.jsonl", tmp_path / "base.jsonl"
    for adapter, output in ((["--adapter", str(trained)], tuned), ([], base)):
        assert main(["predict", "--model", str(MODEL), *adapter, "--data", str(data), "--output", str(output),
                     "--max-new-tokens", "12"]) == 0
    assert [row["prediction"] for row in read_jsonl(tuned)] != [row["prediction"] for row in read_jsonl(base)]


def test_a_chat_is_answered_after_its_last_user_turn(tmp_path):
    model, tokenizer = load_causal_lm(MODEL), copy.deepcopy(load_tokenizer(MODEL))
    tokenizer.chat_template = CHAT_TEMPLATE
    open_chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "Tell me a story."}]
    answered = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello friend."}]
    records = [({"messages": open_chat}, open_chat, None), ({"messages": answered}, answered[:1], "Hello friend.")]
    prompts = load_prompts(write_jsonl(tmp_path / "chats.jsonl", [record for record, _, _ in records]))
    rows = predict_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    for row, (_, shown, answer) in zip(rows, records):
        rendered = tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        new = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)[0, len(ids):]
        assert row["messages"] == shown
        assert row.get("reference") == answer
        assert row["prediction"] == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_limit_and_a_seeded_sample_repeat(tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [record for record, _, _ in RECORDS])
    outputs = [tmp_path / f"sampled{i}.jsonl" for i in range(2)]
    for output in outputs:
        assert main(["predict", "--model", str(MODEL), "--data", str(data), "--output", str(output), "--limit", "3",
                     "--temperature", "1.0", "--seed", "7", "--max-new-tokens", "10"]) == 0
    first, second = (read_jsonl(output) for output in outputs)
    assert len(first) == 3 and first == second


@pytest.mark.parametrize("records,flags,message", [
    ([{"question": "hi"}], [], "has keys ['question'] but needs"),
    ([{"prompt": 3}], [], "where text is expected"),
    ([{"prompt": "a"}], ["--limit", "0"], "--limit must be at least 1"),
    ([{"prompt": "a"}], ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ([{"messages": [{"role": "user", "content": "Hi"}]}], [], "has no chat template"),
])
def test_bad_prompts_are_one_sentence_and_write_nothing(records, flags, message, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", records)
    output = tmp_path / "predictions.jsonl"
    capsys.readouterr()
    assert main(["predict", "--model", str(MODEL), "--data", str(data), "--output", str(output), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not output.exists()


def test_a_table_for_a_decoder_says_what_predict_reads(tmp_path, capsys):
    data = tmp_path / "labels.tsv"
    data.write_text("text\tlabel\ngood\tpos\n", encoding="utf-8")
    assert main(["predict", "--model", str(MODEL), "--data", str(data), "--output", str(tmp_path / "p.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "causal-lm model" in err and "is a table" in err and "task=classification" in err


def test_generate_chat_sends_the_prompt_as_the_users_turn(tmp_path, capsys):
    folder = tmp_path / "chat-model"
    shutil.copytree(MODEL, folder)
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--prompt", "Tell me a story.", "--chat",
                 "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    model, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    new = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert printed == tokenizer.decode(new, skip_special_tokens=True).strip()
    assert main(["generate", "--model", str(MODEL), "--prompt", "Hi", "--chat"]) == 1  # no template: one sentence
    err = capsys.readouterr().err
    assert "has no chat template" in err and len(err.strip().splitlines()) == 1
