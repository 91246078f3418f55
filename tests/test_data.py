import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

from deltatune.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    Example,
    _token_losses,
    batch_indices,
    check_packing,
    collate,
    epoch_order,
    iter_examples,
    load_examples,
    pack_examples,
    packed_attention,
    packed_attention_mask,
    prompt_ids,
    split_examples,
    tokenize_example,
    tokenize_examples,
    truncate_ids,
    unpack_row,
)
from deltatune.errors import DeltatuneError

from conftest import tiny_gpt2, tiny_llama

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


# --- streaming, E2E lines, chats -----------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture()
def chat_tokenizer(tokenizer):
    import copy

    chatty = copy.deepcopy(tokenizer)
    chatty.chat_template = CHAT_TEMPLATE
    return chatty


def test_reading_is_lazy_so_a_limit_never_reads_the_rest(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"text": "a"}\n{"text": "b"}\nnot json at all\n')
    assert load_examples(path, limit=2) == [Example("", "a"), Example("", "b")]
    stream = iter_examples(path)
    assert next(stream) == Example("", "a")  # nothing past line 1 was parsed yet
    with pytest.raises(DeltatuneError, match="line 3 is not valid JSON"):
        list(stream)
    with pytest.raises(DeltatuneError, match="limit must be a whole number"):
        load_examples(path, limit=0)


def test_line_numbers_count_leading_blank_lines_and_bad_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "data.jsonl", '\n\n{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(DeltatuneError, match=r"data\.jsonl line 4 has a int .*'completion'"):
        load_examples(path)
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DeltatuneError, match=r"latin1\.jsonl is not UTF-8 text \(near line 2\)"):
        load_examples(raw)


def test_e2e_lines_are_prompt_completion_pairs(tmp_path):
    text = ("name : Alimentum | area : city centre||There is a place in the city centre . \n\n"
            "name : Alimentum | area : city centre||Alimentum is in the city centre .\n")
    examples = load_examples(write(tmp_path, "valid.txt", text))
    assert examples == [
        Example("name : Alimentum | area : city centre\n", "There is a place in the city centre ."),
        Example("name : Alimentum | area : city centre\n", "Alimentum is in the city centre ."),
    ]


def test_a_malformed_e2e_line_names_file_and_line(tmp_path):
    path = write(tmp_path, "e2e.txt", "name : A||A is here .\nname : B and no separator\n")
    with pytest.raises(DeltatuneError, match=r"e2e\.txt line 2 is not an E2E line 'meaning representation\|\|text'"):
        load_examples(path)
    with pytest.raises(DeltatuneError, match=r"line 1 is not an E2E line"):
        load_examples(write(tmp_path, "empty_text.txt", "name : A||   \n"))


def test_shared_e2e_file_loads():
    path = STORIES.parents[1] / "data" / "e2e" / "valid.txt"
    if not path.is_file():
        pytest.skip(f"{path} is not present: the shared E2E data is needed for this test")
    examples = load_examples(path)
    assert len(examples) > 1000 and all(e.prompt.endswith("\n") and "||" not in e.completion for e in examples)


def test_chat_records_keep_their_turns_and_the_last_answer(tmp_path):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}
    [example] = load_examples(write(tmp_path, "chat.jsonl", json.dumps(record) + "\n"))
    assert example.messages == (("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", "Goodbye."))
    assert (example.prompt, example.completion) == ("", "Goodbye.")


@pytest.mark.parametrize("messages, message", [
    ("hello", r"chat\.jsonl line 1 has 'messages' that is not a non-empty list"),
    ([], r"line 1 has 'messages' that is not a non-empty list"),
    ([{"role": "user"}], r"line 1 has messages\[0\] = .* needs 'role' and 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 7}],
     r"line 1 has a int where text is expected \('messages\[1\]\.content'\)"),
    ([{"role": "user", "content": "a"}], r"line 1 has no turn with role 'assistant'"),
])
def test_malformed_chat_records_name_file_line_and_field(tmp_path, messages, message):
    path = write(tmp_path, "chat.jsonl", json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DeltatuneError, match=message):
        load_examples(path)


def test_chat_is_rendered_by_the_template_and_learned_on_assistant_turns_only(chat_tokenizer):
    turns = (("system", "Be kind."), ("user", "Hi there"), ("assistant", "Hello friend."), ("user", "Bye"),
             ("assistant", "Goodbye."))
    item = tokenize_example(Example("", "Goodbye.", turns), chat_tokenizer, max_length=512)
    rendered = chat_tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
    assert item["input_ids"] == chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    learned = [token for token, label in zip(item["input_ids"], item["labels"]) if label != IGNORE_INDEX]
    assert chat_tokenizer.decode(learned) == "Hello friend.</s>\nGoodbye.</s>\n"
    assert learned.count(chat_tokenizer.eos_token_id) == 2  # each answer learns to end its turn
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(item["input_ids"], item["labels"]))
    # The prompt for generation is everything before the last answer, with the assistant header.
    prompt = chat_tokenizer.decode(prompt_ids(Example("", "Goodbye.", turns), chat_tokenizer))
    assert prompt == rendered[: rendered.rindex("Goodbye.")]


def test_chat_without_a_template_is_one_clear_error(tokenizer):
    example = Example("", "Hello.", (("user", "Hi"), ("assistant", "Hello.")))
    with pytest.raises(DeltatuneError, match="has no chat template, so 'messages' records cannot be rendered"):
        tokenize_example(example, tokenizer, max_length=512)


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    chat_tokenizer.chat_template = "{{ messages | length }}:" + CHAT_TEMPLATE  # the turn count changes the start
    example = Example("", "Hello.", (("user", "Hi"), ("assistant", "Hello.")))
    with pytest.raises(DeltatuneError, match="does not render a conversation as the rendering of its first turns"):
        tokenize_example(example, chat_tokenizer, max_length=512)


# --- truncation policies -------------------------------------------------------------------


def test_truncate_ids_by_policy_keeps_bos_on_the_left():
    ids, labels = [1, 10, 11, 12, 13, 14], [-100, -100, 11, 12, 13, 14]
    assert truncate_ids(ids, labels, 4, "right", 1) == ([1, 10, 11, 12], [-100, -100, 11, 12])
    assert truncate_ids(ids, labels, 4, "left", 1) == ([1, 12, 13, 14], [-100, 12, 13, 14])
    assert truncate_ids(ids[1:], labels[1:], 3, "left", 1) == ([12, 13, 14], [12, 13, 14])  # no BOS to keep
    assert truncate_ids(ids, labels, 4, "skip", 1) is None
    assert truncate_ids(ids, labels, 6, "skip", 1) == (ids, labels)  # fits: every policy keeps it whole


def test_truncation_counts_are_reported_per_policy(tokenizer):
    short, long = Example("Hi", " there."), Example("Once upon a time", " there was a very big cat in a house.")
    limit = len(tokenize_example(short, tokenizer, 512)["input_ids"]) + 2
    with pytest.warns(UserWarning, match=r"truncated 2 of 3 examples to max_length=\d+ \(cut at the start, "
                                         r"truncate=left\)") as record:
        kept = tokenize_examples([long, short, long], tokenizer, limit, truncate="left")
    assert len(record) == 1 and len(kept) == 3
    assert kept[0]["input_ids"][0] == tokenizer.bos_token_id and kept[0]["input_ids"][-1] == tokenizer.eos_token_id
    with pytest.warns(UserWarning, match=r"skipped 2 of 3 examples longer than max_length"):
        assert tokenize_examples([long, short, long], tokenizer, limit, truncate="skip") == [
            tokenize_example(short, tokenizer, limit)]
    with pytest.raises(DeltatuneError, match="truncate must be one of right, left, skip"):
        tokenize_examples([short], tokenizer, limit, truncate="middle")


# --- packing and length-grouped batches ----------------------------------------------------


def test_pack_examples_fills_rows_best_fit_and_keeps_every_example_once():
    items = [{"input_ids": [1] + [7] * (n - 1), "labels": [-100] + [7] * (n - 1)} for n in (5, 3, 6, 2, 4)]
    rows = pack_examples(items, max_length=8)
    assert [len(row["input_ids"]) for row in rows] == [8, 8, 4]  # 6+2, 5+3, 4
    assert sorted(len(piece["input_ids"]) for row in rows for piece in unpack_row(row)) == [2, 3, 4, 5, 6]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]  # within a row, examples keep the data order
    with pytest.raises(DeltatuneError, match="longer than max_length=4"):
        pack_examples(items, max_length=4)


def test_packed_rows_get_position_ids_and_a_block_diagonal_causal_mask():
    rows = [{"input_ids": [1, 5, 1, 6, 7], "labels": [-100, 5, -100, 6, 7], "position_ids": [0, 1, 0, 1, 2]},
            {"input_ids": [1, 8], "labels": [-100, 8], "position_ids": [0, 1]}]
    batch = collate(rows, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]  # padding continues, never restarts
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]  # its sum counts the tokens
    mask = packed_attention_mask(batch["position_ids"], batch["attention_mask"].sum(-1).tolist())
    allowed = mask[:, 0] == 0
    expected_first = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                   [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed[0], expected_first)
    assert torch.equal(allowed[1][:2, :2], torch.tensor([[1, 0], [1, 1]], dtype=torch.bool))
    assert not allowed[1][2:].any() and not allowed[1][:, 2:].any()  # padding attends to nothing
    assert mask.dtype == torch.float32 and mask.min() == torch.finfo(torch.float32).min

    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None):
            seen["mask"] = attention_mask
    probe = Probe()
    with packed_attention(probe):
        probe(**batch)
        assert torch.equal(seen["mask"], mask)
        unpacked = collate([{"input_ids": [1, 5], "labels": [-100, 5]}], 0)
        probe(**unpacked)
        assert torch.equal(seen["mask"], unpacked["attention_mask"])  # no position_ids: unchanged
    probe(**batch)
    assert seen["mask"].ndim == 2  # the hook is gone once the block ends


def _per_example_losses(model, items):
    """Each example's summed token loss, run alone."""
    return torch.stack([_token_losses(model, collate([item], 0), torch.device("cpu"))[0].sum() for item in items])


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_a_packed_row_scores_each_example_as_it_scores_alone(build):
    model = build()
    generator = torch.Generator().manual_seed(0)
    items = []
    for n in (7, 4, 9, 3):
        ids = [1] + torch.randint(3, 128, (n - 1,), generator=generator).tolist()
        items.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    [row] = pack_examples(items, max_length=23)
    with torch.no_grad():
        with packed_attention(model):
            packed = _token_losses(model, collate([row], 0), torch.device("cpu"))[0]
        alone = _per_example_losses(model, unpack_row(row))
    starts = [k for k, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    together = torch.stack([packed[a:b - 1].sum() for a, b in zip(starts, starts[1:])])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)  # fp32 sums over different shapes
    check_packing(model, [row], pad_token_id=0)  # the guard the runner uses agrees


def test_check_packing_refuses_a_model_that_ignores_the_mask():
    from torch import nn

    class NoMask(nn.Module):  # a causal LM that drops attention_mask: packed examples would see each other
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama()

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids=input_ids)

    row = pack_examples([{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]},
                         {"input_ids": [1, 9, 10], "labels": [-100, 9, 10]}], max_length=8)
    with pytest.raises(DeltatuneError, match="scores packed examples differently .*set packing=false"):
        check_packing(NoMask(), row, pad_token_id=0)


def test_length_grouped_batches_are_resumable_epochs_with_little_padding():
    lengths = [int(x) for x in torch.randint(1, 200, (300,), generator=torch.Generator().manual_seed(1))]
    grouped = list(itertools.islice(batch_indices(300, 6, seed=3, lengths=lengths), 120))
    for start in (0, 7, 50, 99):
        assert list(itertools.islice(batch_indices(300, 6, seed=3, start_batch=start, lengths=lengths),
                                     120 - start)) == grouped[start:]
    stream = list(itertools.chain.from_iterable(grouped))
    assert sorted(stream[:300]) == list(range(300)) and sorted(stream[300:600]) == list(range(300))
    plain = list(itertools.islice(batch_indices(300, 6, seed=3), 50))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding(grouped[:50]) < padding(plain) / 5


def test_check_packing_refuses_a_method_that_widens_the_mask_itself():
    import deltatune as dt

    model = dt.wrap(tiny_llama(), dt.PromptTuning(num_virtual_tokens=2))
    row = pack_examples([{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]},
                         {"input_ids": [1, 9, 10], "labels": [-100, 9, 10]}], max_length=8)
    with pytest.raises(DeltatuneError, match="packing needs a model that takes a 4D attention mask"):
        check_packing(model, row, pad_token_id=0)


def test_a_run_truncates_and_packs_as_configured(tmp_path, capsys):
    from deltatune.config import build_run
    from deltatune.pretrained import bundled
    from deltatune.runner import run_training

    settings = {"model": str(bundled("stories260K")), "data": str(bundled("e2e/train.jsonl")),
                "eval_data": str(bundled("e2e/eval.jsonl")), "output": str(tmp_path / "run"), "max_steps": 2,
                "batch_size": 2, "max_length": 200, "eval_every": 0, "packing": True, "truncate": "left"}
    run = build_run(settings)
    assert (run.packing, run.truncate) == (True, "left")
    result = run_training(run, progress=False)
    printed = capsys.readouterr()
    assert re.search(r"packed 1475 training examples into \d+ rows of at most 200 tokens", printed.out)
    assert re.search(r"warning: .*train.jsonl: truncated \d+ of 1475 examples to max_length=200 \(cut at the start, "
                     r"truncate=left\)", printed.err)
    assert "truncate: left" in (tmp_path / "run" / "deltatune_run.yaml").read_text()
    assert result.tokens_per_s > 0 and math.isfinite(result.train_loss)
    with pytest.raises(DeltatuneError, match="truncate 'middle' is unknown: use one of right, left, skip"):
        build_run({**settings, "truncate": "middle"})
    with pytest.raises(DeltatuneError, match="packing must be true or false"):
        build_run({**settings, "packing": "yes"})


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_deeply_nested_json_is_one_sentence(tmp_path, layout):
    nested = "[" * 100_000 + "]" * 100_000
    path = tmp_path / f"deep.{'jsonl' if layout == 'jsonl' else 'json'}"
    record = '{"prompt": "a", "completion": ' + nested + "}"
    path.write_text(record + "\n" if layout == "jsonl" else "[" + record + "]", encoding="utf-8")
    with pytest.raises(DeltatuneError, match="nests its JSON deeper than it can be read"):
        load_examples(path)
    from deltatune.task_data import read_rows

    table = tmp_path / f"deep-rows.{'jsonl' if layout == 'jsonl' else 'json'}"
    table.write_text(path.read_text(encoding="utf-8").replace('"prompt"', '"text"'), encoding="utf-8")
    with pytest.raises(DeltatuneError, match="nests its JSON deeper than it can be read"):
        read_rows(table)


def test_a_lone_surrogate_in_the_data_is_one_sentence(tmp_path):
    from deltatune.task_data import load_classification_records, load_seq2seq_records

    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "completion": "x\\ud800y"}\n', encoding="utf-8")
    with pytest.raises(DeltatuneError, match=r"bad.jsonl line 1 has an unpaired surrogate '\\ud800' in 'completion'"):
        load_examples(path)
    path.write_text('{"text": "x\\udc00", "label": "a"}\n', encoding="utf-8")
    with pytest.raises(DeltatuneError, match="unpaired surrogate"):
        load_classification_records(path)
    path.write_text('{"source": "\\ud800", "target": "b"}\n', encoding="utf-8")
    with pytest.raises(DeltatuneError, match="unpaired surrogate"):
        load_seq2seq_records(path)
    path.write_text('{"prompt": "a pair is fine \\ud83d\\ude00", "completion": "b"}\n', encoding="utf-8")
    assert load_examples(path)[0].prompt.endswith("\U0001F600")


def test_a_folder_given_as_data_is_named_as_such(tmp_path):
    from deltatune.task_data import read_rows

    for read in (load_examples, read_rows):
        with pytest.raises(DeltatuneError, match="is a folder: give the file inside it"):
            read(tmp_path)
