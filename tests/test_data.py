import itertools
import json
from pathlib import Path

import pytest
import torch

from deltatune.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    Example,
    batch_indices,
    collate,
    epoch_order,
    load_examples,
    split_examples,
    tokenize_example,
    tokenize_examples,
)
from deltatune.errors import DeltatuneError

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


@pytest.fixture(scope="module")
def tokenizer():
    if not STORIES.is_dir():
        pytest.skip(f"../shared/models/stories260K not present: {STORIES} is needed for tokenizer tests")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- loading -------------------------------------------------------------------------------


def test_jsonl_prompt_completion_and_text_records_skip_blank_lines(tmp_path):
    text = '{"prompt": "Q: 1+1?", "completion": " 2"}\n\n  \n{"text": "Once upon a time"}\n'
    path = write(tmp_path, "data.jsonl", text)
    assert load_examples(path) == [Example("Q: 1+1?", " 2"), Example("", "Once upon a time")]


def test_alpaca_array_uses_the_alpaca_template_with_and_without_input(tmp_path):
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say bye.", "output": "Bye!"},
    ]
    examples = load_examples(write(tmp_path, "alpaca.json", json.dumps(records, indent=2)))
    assert examples[0] == Example(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n",
        "5",
    )
    assert examples[1] == Example(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n",
        "Hi!",
    )
    assert examples[2] == Example(ALPACA_PROMPT_NO_INPUT.format(instruction="Say bye."), "Bye!")
    assert examples[0].prompt == ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3")


def test_format_is_read_from_content_not_extension(tmp_path):
    jsonl_named_json = write(tmp_path, "data.json", '{"text": "a"}\n{"text": "b"}\n')
    array_named_txt = write(tmp_path, "data.txt", '  [{"prompt": "p", "completion": "c"}]')
    assert load_examples(jsonl_named_json) == [Example("", "a"), Example("", "b")]
    assert load_examples(array_named_txt) == [Example("p", "c")]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c" "d"}\n')
    with pytest.raises(DeltatuneError, match=r"data\.jsonl line 3 is not valid JSON \(Expecting ',' delimiter\)"):
        load_examples(path)


def test_malformed_json_array_names_the_line(tmp_path):
    path = write(tmp_path, "data.json", '[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DeltatuneError, match=r"data\.json line 3 is not valid JSON"):
        load_examples(path)


def test_record_without_needed_keys_names_found_and_expected_keys(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"text": "fine"}\n{"question": "q", "answer": "a"}\n')
    with pytest.raises(DeltatuneError) as error:
        load_examples(path)
    message = str(error.value)
    assert "line 2" in message and "['answer', 'question']" in message
    assert "'prompt' and 'completion'" in message and "'text'" in message and "'instruction' and 'output'" in message


def test_non_string_field_and_non_object_record_are_errors(tmp_path):
    with pytest.raises(DeltatuneError, match="line 1 .*'completion'"):
        load_examples(write(tmp_path, "a.jsonl", '{"prompt": "p", "completion": 3}\n'))
    with pytest.raises(DeltatuneError, match="record 2 is a list"):
        load_examples(write(tmp_path, "b.json", '[{"text": "a"}, ["text"]]'))


def test_missing_file_and_empty_dataset_are_errors(tmp_path):
    with pytest.raises(DeltatuneError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DeltatuneError, match="holds no examples"):
        load_examples(write(tmp_path, "empty.jsonl", "\n\n"))
    with pytest.raises(DeltatuneError, match="holds no examples"):
        load_examples(write(tmp_path, "empty.json", "[]"))


# --- tokenizing ----------------------------------------------------------------------------


def test_labels_mask_bos_and_prompt_and_keep_completion_and_eos(tokenizer):
    example = Example("Once upon a time", " there was a cat.")
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    item = tokenize_example(example, tokenizer, max_length=512)

    assert tokenizer.bos_token_id == 1
    assert item["input_ids"] == [1] + prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert item["labels"] == [IGNORE_INDEX] * (1 + len(prompt_ids)) + completion_ids + [tokenizer.eos_token_id]
    assert item["input_ids"].count(tokenizer.bos_token_id) == 1


def test_plain_text_is_learned_on_every_token_but_bos(tokenizer):
    item = tokenize_example(Example("", "The dog ran."), tokenizer, max_length=512)
    assert item["input_ids"][0] == tokenizer.bos_token_id
    assert item["labels"] == [IGNORE_INDEX] + item["input_ids"][1:]


def test_truncation_cuts_from_the_right(tokenizer):
    example = Example("Once upon a time", " there was a very big cat.")
    full = tokenize_example(example, tokenizer, max_length=512)
    cut = tokenize_example(example, tokenizer, max_length=len(full["input_ids"]) - 3)
    assert cut["input_ids"] == full["input_ids"][:-3]
    assert cut["labels"] == full["labels"][:-3]


def test_examples_whose_completion_is_cut_away_are_skipped_with_one_warning(tokenizer):
    long_prompt = Example("Once upon a time there was a little girl named Lily.", " She liked cats.")
    short = Example("Hi", " there.")
    prompt_length = 1 + len(tokenizer(long_prompt.prompt, add_special_tokens=False)["input_ids"])
    assert tokenize_example(long_prompt, tokenizer, max_length=prompt_length) is None
    with pytest.warns(UserWarning, match="skipped 2 of 3 examples") as record:
        kept = tokenize_examples([long_prompt, short, long_prompt], tokenizer, max_length=prompt_length)
    assert len(record) == 1
    assert kept == [tokenize_example(short, tokenizer, max_length=prompt_length)]


# --- splitting, collating, batching --------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete():
    examples = list(range(100))
    train, held_out = split_examples(examples, 0.1, seed=3)
    assert (train, held_out) == split_examples(examples, 0.1, seed=3)
    assert split_examples(examples, 0.1, seed=4) != (train, held_out)
    assert len(held_out) == 10 and sorted(train + held_out) == examples
    assert split_examples(examples, 0.0, seed=3)[1] == []
    assert len(split_examples([1, 2], 0.01, seed=0)[1]) == 1  # at least one held out
    assert split_examples([1], 0.5, seed=0) == ([1], [])  # never all
    with pytest.raises(DeltatuneError, match="eval_fraction"):
        split_examples(examples, 1.0, seed=0)


def test_collate_right_pads_with_mask_and_ignored_labels():
    batch = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    tensors = collate(batch, pad_token_id=0)
    assert torch.equal(tensors["input_ids"], torch.tensor([[1, 5, 6], [1, 7, 0]]))
    assert torch.equal(tensors["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(tensors["labels"], torch.tensor([[-100, 5, 6], [-100, 7, -100]]))
    assert all(t.dtype == torch.long for t in tensors.values())


def test_epoch_order_is_the_seeded_permutation():
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 + 2)).tolist()
    assert epoch_order(10, seed=7, epoch=2) == expected
    first_epoch = list(itertools.chain.from_iterable(itertools.islice(batch_indices(10, 5, seed=7), 2)))
    assert first_epoch == epoch_order(10, seed=7, epoch=0)


def test_batches_from_any_step_equal_the_uninterrupted_stream():
    # 7 examples in batches of 3: batches straddle epoch boundaries.
    uninterrupted = list(itertools.islice(batch_indices(7, 3, seed=11), 20))
    for start in (0, 1, 2, 5, 13):
        resumed = list(itertools.islice(batch_indices(7, 3, seed=11, start_batch=start), 20 - start))
        assert resumed == uninterrupted[start:]
    stream = list(itertools.chain.from_iterable(uninterrupted))
    for epoch in range(8):
        assert stream[epoch * 7 : epoch * 7 + 7] == epoch_order(7, seed=11, epoch=epoch)


def test_advertisegen_content_summary_records(tmp_path):
    path = tmp_path / "adgen.jsonl"
    path.write_text('{"content": "类型#上衣*材质#牛仔布", "summary": "这件牛仔外套"}\n', encoding="utf-8")
    [example] = load_examples(path)
    assert example == Example(prompt="类型#上衣*材质#牛仔布", completion="这件牛仔外套")


def test_shared_advertisegen_file_loads():
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "advertisegen" / "dev.json"
    if not path.is_file():
        pytest.skip(f"{path} is not present: the shared AdvertiseGen data is needed for this test")
    examples = load_examples(path)
    assert len(examples) == 1070 and all(e.prompt and e.completion for e in examples)
