"""Training data: read records, turn them into token ids and labels, batch them.

A record is either a prompt with a completion (the loss sees only the completion), plain
text (the loss sees every token), an Alpaca instruction (rendered with the Alpaca
template into a prompt; the output is the completion) or an AdvertiseGen pair (content is
the prompt, summary the completion — the ChatGLM P-Tuning v2 demo task). Files are JSONL, one record a
line, or one JSON array of records; the format is read from the content, not the name.

Batches come from an endless stream of example indices: epoch ``e`` is the permutation
drawn from ``torch.Generator().manual_seed(seed + e)``, and batch ``k`` is the ``k``-th
run of ``batch_size`` indices in that stream. So any batch, and every batch after it,
can be rebuilt from its number alone, which is what exact resume needs.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from deltatune.errors import DeltatuneError

IGNORE_INDEX = -100  # label value the loss skips (Hugging Face and PyTorch convention)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

EXPECTED_KEYS = ("'prompt' and 'completion', or 'text', or 'instruction' and 'output' (optional 'input'), "
                 "or 'content' and 'summary' (AdvertiseGen)")


@dataclass(frozen=True)
class Example:
    """One training example; the loss is taken on ``completion`` only."""

    prompt: str
    completion: str


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Read a JSONL file or a JSON array of records into examples."""
    path = Path(path)
    if not path.is_file():
        raise DeltatuneError(f"data file {path} does not exist: check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DeltatuneError(f"data file {path} is not UTF-8 text: re-save it as UTF-8") from None

    if text.lstrip().startswith("["):
        records = [(f"{path} record {number}", record) for number, record in enumerate(_parse_array(path, text), 1)]
    else:
        records = list(_parse_lines(path, text))
    examples = [_example_from_record(where, record) for where, record in records]
    if not examples:
        raise DeltatuneError(f"data file {path} holds no examples: add at least one record")
    return examples


def _parse_array(path: Path, text: str) -> list[Any]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DeltatuneError(f"{path} line {error.lineno} is not valid JSON ({error.msg}): fix that line") from None


def _parse_lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path} line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise DeltatuneError(
                f"{path} line {number} is not valid JSON ({error.msg}): fix or remove that line"
            ) from None


def _example_from_record(where: str, record: Any) -> Example:
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise DeltatuneError(f"{where} is a {kind}, not an object: make it an object with {EXPECTED_KEYS}")
    if "prompt" in record and "completion" in record:
        fields = {"prompt": record["prompt"], "completion": record["completion"]}
    elif "text" in record:
        fields = {"prompt": "", "completion": record["text"]}
    elif "content" in record and "summary" in record:  # AdvertiseGen / ChatGLM P-Tuning v2 demo layout
        fields = {"prompt": record["content"], "completion": record["summary"]}
    elif "instruction" in record and "output" in record:
        instruction, context = record["instruction"], record.get("input") or ""
        template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_INPUT
        _require_strings(where, {"instruction": instruction, "input": context})
        fields = {"prompt": template.format(instruction=instruction, input=context), "completion": record["output"]}
    else:
        raise DeltatuneError(f"{where} has keys {sorted(record)} but needs {EXPECTED_KEYS}: rename its keys")
    _require_strings(where, fields)
    return Example(**fields)


def _require_strings(where: str, fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if not isinstance(value, str):
            kind = type(value).__name__
            raise DeltatuneError(f"{where} has a {kind} where text is expected ({key!r}): make it a string")


def bos_ids(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer has one (stories260K's does not add it itself), else []."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """[BOS] + prompt tokens: how a prompt is laid out for training and generation alike."""
    return bos_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def tokenize_example(example: Example, tokenizer: Any, max_length: int,
                     encode: Callable[[str], list[int]] | None = None) -> dict[str, list[int]] | None:
    """Token ids and labels for one example, or None when no completion token fits.

    Layout: [BOS] prompt completion EOS, cut to ``max_length`` from the right. Labels are
    the ids on completion tokens and EOS, ``IGNORE_INDEX`` on BOS and the prompt.
    """
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if encode is not None:  # the method's own layout (a P-tuning template places virtual tokens)
        prompt_ids = encode(example.prompt)
    else:
        prompt_ids = encode_prompt(tokenizer, example.prompt)
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + eos
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    # The first label is never predicted (nothing comes before it), so it teaches nothing.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": input_ids, "labels": labels}


def tokenize_examples(examples: Sequence[Example], tokenizer: Any, max_length: int,
                      encode: Callable[[str], list[int]] | None = None) -> list[dict[str, list[int]]]:
    """Tokenize every example, dropping (with one warning) those cut away by ``max_length``."""
    tokenized = [tokenize_example(example, tokenizer, max_length, encode) for example in examples]
    kept = [item for item in tokenized if item is not None]
    if len(kept) < len(tokenized):
        warnings.warn(
            f"skipped {len(tokenized) - len(kept)} of {len(tokenized)} examples whose completion "
            f"does not fit in max_length={max_length}; raise max_length to keep them",
            stacklevel=2,
        )
    return kept


Item = TypeVar("Item")


def split_examples(examples: Sequence[Item], eval_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Shuffle with ``seed`` and hold out ``eval_fraction`` (at least one, never all) for eval."""
    if not 0 <= eval_fraction < 1:
        raise DeltatuneError(f"eval_fraction must be at least 0 and below 1, got {eval_fraction}: pick e.g. 0.05")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    eval_count = max(1, round(len(shuffled) * eval_fraction)) if eval_fraction > 0 else 0
    eval_count = max(0, min(eval_count, len(shuffled) - 1))
    return shuffled[eval_count:], shuffled[:eval_count]


def collate(batch: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label ``IGNORE_INDEX``."""
    length = max(len(item["input_ids"]) for item in batch)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (length - len(values))

    return {
        "input_ids": torch.tensor([padded(item["input_ids"], pad_token_id) for item in batch]),
        "attention_mask": torch.tensor([padded([1] * len(item["input_ids"]), 0) for item in batch]),
        "labels": torch.tensor([padded(item["labels"], IGNORE_INDEX) for item in batch]),
    }


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order of examples in ``epoch``: a permutation fixed by ``seed + epoch``."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def batch_indices(num_examples: int, batch_size: int, seed: int, start_batch: int = 0) -> Iterator[list[int]]:
    """Endless batches of example indices, starting at batch number ``start_batch``.

    Batches are cut from the concatenated epoch orders, so every batch is full and may
    straddle two epochs; ``batch_indices(..., start_batch=k)`` yields exactly the batches
    ``k, k+1, ...`` of ``batch_indices(...)``.
    """
    if num_examples < 1:
        raise DeltatuneError("there are no examples to batch: add training data")
    epoch, offset = divmod(start_batch * batch_size, num_examples)
    stream = _index_stream(num_examples, seed, epoch, offset)
    while True:
        yield [next(stream) for _ in range(batch_size)]


def _index_stream(num_examples: int, seed: int, epoch: int, offset: int) -> Iterator[int]:
    while True:
        yield from epoch_order(num_examples, seed, epoch)[offset:]
        epoch, offset = epoch + 1, 0
