"""Training data: read records, turn them into token ids and labels, batch them.

A record is one of:

- a prompt with a completion (the loss sees only the completion);
- plain text (the loss sees every token);
- an Alpaca instruction (rendered with the Alpaca template into a prompt; the output is the completion);
- an AdvertiseGen pair (content is the prompt, summary the completion — the ChatGLM P-Tuning v2 demo task);
- a chat, ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the tokenizer's chat
  template; the loss sees the assistant turns only;
- an E2E line ``MR||text`` (the meaning representation is the prompt, the text the completion).

Files are JSONL (one record a line), one JSON array of records, or E2E lines; the format is read
from the content, not the name. JSONL and E2E files are read line by line, so reading never
holds more than one line of the file; a JSON array is parsed whole (use JSONL for large data).

Token ids are cut to ``max_length`` by a truncation policy (``right``: drop the end; ``left``: drop
the start, keeping BOS; ``skip``: drop the example), and short examples may be packed into full
rows (``pack_examples``) whose attention stays inside each example (``packed_attention`` gives
the model the block-diagonal causal mask).

Batches come from an endless stream of example indices: epoch ``e`` is the permutation
drawn from ``torch.Generator().manual_seed(seed + e)``, and batch ``k`` is the ``k``-th
run of ``batch_size`` indices in that stream. So any batch, and every batch after it,
can be rebuilt from its number alone, which is what exact resume needs.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from deltatune.errors import DeltatuneError

IGNORE_INDEX = -100  # label value the loss skips (Hugging Face and PyTorch convention)
TRUNCATE_POLICIES = ("right", "left", "skip")

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
                 "or 'content' and 'summary' (AdvertiseGen), or 'messages' (a chat)")
E2E_SEPARATOR = "||"


@dataclass(frozen=True)
class Example:
    """One example; the loss is taken on ``completion`` only.

    A chat keeps its turns in ``messages`` as ``(role, content)`` pairs: its token ids come from
    the tokenizer's chat template and the loss sees every assistant turn. Its ``completion`` is the
    last assistant turn (the reference an evaluation compares a generation with) and ``prompt``
    is empty: the prompt is the template's rendering of the turns before it (``prompt_ids``).
    """

    prompt: str
    completion: str
    messages: tuple[tuple[str, str], ...] | None = None


# --- reading -----------------------------------------------------------------------------------


def load_examples(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """Read a JSONL file, a JSON array of records or E2E ``MR||text`` lines into examples.

    ``limit`` keeps the first ``limit`` examples (the rest of the file is not read).
    """
    require_limit(limit)
    examples = list(itertools.islice(iter_examples(path), limit))
    if not examples:
        raise DeltatuneError(f"data file {path} holds no examples: add at least one record")
    return examples


def require_limit(limit: int | None) -> None:
    """``limit`` (keep the first ``limit`` records) is None or a whole number of at least 1."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DeltatuneError(f"limit must be a whole number of at least 1, got {limit!r}: pass e.g. --limit 100")


def iter_examples(path: str | os.PathLike) -> Iterator[Example]:
    """The examples of a data file, one at a time: memory does not grow with the file's size
    (JSONL and E2E lines are read one line at a time)."""
    for where, record in iter_records(path):
        yield _example_from_record(where, record)


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a data file; ``where`` names the file and line (or record)."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise DeltatuneError(f"data file {path} is a folder: give the file inside it")
        raise DeltatuneError(f"data file {path} does not exist: check the path")
    with path.open("rb") as lines:  # bytes, decoded line by line: an encoding error names its line
        found = _first_text(path, lines)
        if found is None:
            return
        number, first, read = found
        if first.lstrip().startswith("["):
            text = read + "".join(_decoded(path, lines, number))
            for index, record in enumerate(_parse_array(path, text), 1):
                yield f"{path} record {index}", record
        elif first.lstrip().startswith("{") or E2E_SEPARATOR not in first:
            yield from _parse_lines(path, _numbered(path, lines, number, first))
        else:
            yield from _parse_e2e_lines(path, _numbered(path, lines, number, first))


def _first_text(path: Path, lines: Iterator[bytes]) -> tuple[int, str, str] | None:
    """(its line number, the first line with text, everything read so far); None for a blank file."""
    read = ""
    for number, line in enumerate(_decoded(path, lines, 0), 1):
        read += line
        if line.strip():
            return number, line, read
    return None


def _decoded(path: Path, lines: Iterator[bytes], before: int) -> Iterator[str]:
    """The lines after line ``before`` as text (a UTF-8 byte-order mark at the start is dropped)."""
    for number, raw in enumerate(lines, before + 1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DeltatuneError(f"data file {path} is not UTF-8 text (near line {number}): "
                                 f"re-save it as UTF-8") from None


def _parse_array(path: Path, text: str) -> list[Any]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DeltatuneError(f"{path} line {error.lineno} is not valid JSON ({error.msg}): fix that line") from None
    except RecursionError:
        raise DeltatuneError(f"{path} nests its JSON deeper than it can be read: flatten its records") from None


def _numbered(path: Path, lines: Iterator[bytes], number: int, first: str) -> Iterator[tuple[int, str]]:
    """(line number, line) from the first text line, numbered ``number``, to the end of the file."""
    yield number, first
    yield from enumerate(_decoded(path, lines, number), number + 1)


def _parse_lines(path: Path, numbered: Iterator[tuple[int, str]]) -> Iterator[tuple[str, Any]]:
    for number, line in numbered:
        if not line.strip():
            continue
        try:
            yield f"{path} line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise DeltatuneError(
                f"{path} line {number} is not valid JSON ({error.msg}): fix or remove that line"
            ) from None
        except RecursionError:
            raise DeltatuneError(f"{path} line {number} nests its JSON deeper than it can be read: flatten that "
                                 "record") from None


def _parse_e2e_lines(path: Path, numbered: Iterator[tuple[int, str]]) -> Iterator[tuple[str, Any]]:
    """E2E lines ``MR||text`` as prompt/completion records: the MR (plus a newline) prompts the text."""
    for number, line in numbered:
        if not line.strip():
            continue
        meaning, separator, text = line.rstrip("\r\n").partition(E2E_SEPARATOR)
        if not separator or not meaning.strip() or not text.strip():
            raise DeltatuneError(f"{path} line {number} is not an E2E line 'meaning representation||text' with text "
                                 f"on both sides: fix or remove that line")
        yield f"{path} line {number}", {"prompt": meaning.strip() + "\n", "completion": text.strip()}


def _example_from_record(where: str, record: Any) -> Example:
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise DeltatuneError(f"{where} is a {kind}, not an object: make it an object with {EXPECTED_KEYS}")
    if "messages" in record:
        return _chat_example(where, record["messages"])
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


# What each prompt layout's answer is called: a record to predict may leave it out.
ANSWER_OF = {"prompt": "completion", "content": "summary", "instruction": "output"}


def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[tuple[Example, str | None]]:
    """(example, its answer or None) for each record of a file to generate from (``deltatune predict``).

    The records are the training layouts with the answer optional: ``{"prompt": ...}``, an Alpaca
    record without ``output``, AdvertiseGen's ``content`` alone, a chat that ends on a user turn (the
    model writes the assistant's), E2E ``MR||text`` lines; ``{"text": ...}`` is continued as it
    stands. The example lays the prompt out as training did (``prompt_ids``); the answer, where the
    record has one, is the reference a generation is read against.
    """
    require_limit(limit)
    prompts = [_prompt_from_record(where, record) for where, record in itertools.islice(iter_records(path), limit)]
    if not prompts:
        raise DeltatuneError(f"data file {path} holds no records: add at least one")
    return prompts


def _prompt_from_record(where: str, record: Any) -> tuple[Example, str | None]:
    if isinstance(record, dict) and "messages" in record:
        turns = record["messages"]
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") != "assistant":
            return _chat_example(where, [*turns, {"role": "assistant", "content": ""}]), None
    elif isinstance(record, dict):
        question = next((key for key in ANSWER_OF if key in record), None)
        if question is not None and ANSWER_OF[question] not in record:
            return _example_from_record(where, {**record, ANSWER_OF[question]: ""}), None
        if question is None and "text" in record:
            _require_strings(where, {"text": record["text"]})
            return Example(prompt=record["text"], completion=""), None
    example = _example_from_record(where, record)
    return example, example.completion


def shown_prompt(example: Example) -> dict[str, Any]:
    """The prompt of ``example`` as a record shows it: ``{"prompt": text}``, or for a chat ``{"messages":
    [...]}`` with the turns before the last assistant turn."""
    if example.messages is None:
        return {"prompt": example.prompt}
    last = max(i for i, (role, _) in enumerate(example.messages) if role == "assistant")
    return {"messages": [{"role": role, "content": content} for role, content in example.messages[:last]]}


def _chat_example(where: str, messages: Any) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DeltatuneError(f"{where} has 'messages' that is not a non-empty list: make it a list of "
                             f"{{\"role\": ..., \"content\": ...}} objects")
    turns = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DeltatuneError(f"{where} has {field} = {json.dumps(message)[:60]} but a turn needs 'role' and "
                                 f"'content': fix that turn")
        _require_strings(where, {f"{field}.role": message["role"], f"{field}.content": message["content"]})
        turns.append((message["role"], message["content"]))
    answers = [content for role, content in turns if role == "assistant"]
    if not answers:
        raise DeltatuneError(f"{where} has no turn with role 'assistant', so there is nothing to learn: "
                             f"add the assistant's answer")
    return Example(prompt="", completion=answers[-1], messages=tuple(turns))


def _require_strings(where: str, fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if not isinstance(value, str):
            kind = type(value).__name__
            raise DeltatuneError(f"{where} has a {kind} where text is expected ({key!r}): make it a string")
        require_unicode(where, key, value)


def require_unicode(where: str, key: str, text: str) -> str:
    """``text``, refused when it holds a lone surrogate (a JSON escape like \\ud800 alone), which no
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DeltatuneError(f"{where} has an unpaired surrogate {text[error.start]!a} in {key!r}, which is not "
                             "text: fix that escape (a character outside the BMP is a pair, like \\ud83d\\ude00)"
                             ) from None
    return text


# --- tokenizing --------------------------------------------------------------------------------


def bos_ids(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer has one (stories260K's does not add it itself), else []."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """[BOS] + prompt tokens: how a prompt is laid out for training and generation alike."""
    return bos_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def prompt_ids(example: Example, tokenizer: Any, encode: Callable[[str], list[int]] | None = None) -> list[int]:
    """The ids a model continues to produce ``example.completion``: [BOS] + prompt, or for a chat the
    template's rendering of the turns before the last assistant turn, with the generation prompt."""
    if example.messages is not None:
        last = max(i for i, (role, _) in enumerate(example.messages) if role == "assistant")
        text = _render_chat(tokenizer, example.messages[:last], add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode(example.prompt) if encode is not None else encode_prompt(tokenizer, example.prompt)


def full_ids(example: Example, tokenizer: Any,
             encode: Callable[[str], list[int]] | None = None) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a whole example, before any truncation.

    Layout: [BOS] prompt completion EOS; labels are the ids on completion tokens and EOS,
    ``IGNORE_INDEX`` on BOS and the prompt. A chat is the template's text, labelled on the
    assistant turns (with whatever the template closes a turn with).
    """
    if example.messages is not None:
        return _chat_ids(example.messages, tokenizer)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompt = prompt_ids(example, tokenizer, encode)
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + eos
    return prompt + completion_ids, [IGNORE_INDEX] * len(prompt) + completion_ids


def _render_chat(tokenizer: Any, turns: Sequence[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DeltatuneError(f"the tokenizer ({type(tokenizer).__name__}, {tokenizer.name_or_path or 'unnamed'}) "
                             f"has no chat template, so 'messages' records cannot be rendered: use a model whose "
                             f"tokenizer_config.json has a chat_template, or write the data as prompt/completion")
    if not turns:
        return ""
    return tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in turns],
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_ids(turns: Sequence[tuple[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of a rendered chat, labelled on the text each assistant turn adds to the rendering.

    The whole rendering is tokenized at once (as a prompt is at inference); a token is labelled
    when it starts inside an assistant turn's text. Tokenizers without character offsets
    (slow ones) tokenize the turns piece by piece instead.
    """
    full = _render_chat(tokenizer, turns)
    spans: list[tuple[int, int]] = []  # character ranges of ``full`` that assistant turns add
    for index, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _render_chat(tokenizer, turns[:index], add_generation_prompt=True)
        through = _render_chat(tokenizer, turns[: index + 1])
        if not (full.startswith(through) and through.startswith(before) and len(before) >= (spans or [(0, 0)])[-1][1]):
            raise DeltatuneError(f"the chat template of {tokenizer.name_or_path or 'this tokenizer'} does not render "
                                 f"a conversation as the rendering of its first turns plus the next turn, so the "
                                 f"assistant turns cannot be found: use a template that only appends, or write the "
                                 f"data as prompt/completion")
        spans.append((len(before), len(through)))
    try:
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow tokenizer: no character offsets
        return _chat_ids_by_piece(full, spans, tokenizer)
    input_ids = encoded["input_ids"]
    learned = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
    return input_ids, [i if keep else IGNORE_INDEX for i, keep in zip(input_ids, learned)]


def _chat_ids_by_piece(full: str, spans: Sequence[tuple[int, int]], tokenizer: Any) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    edges = [0] + [edge for span in spans for edge in span] + [len(full)]
    for k, (a, b) in enumerate(zip(edges, edges[1:])):
        ids = tokenizer(full[a:b], add_special_tokens=False)["input_ids"] if b > a else []
        input_ids += ids
        labels += ids if k % 2 else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def truncate_ids(input_ids: list[int], labels: list[int], max_length: int, policy: str,
                 bos_token_id: int | None) -> tuple[list[int], list[int]] | None:
    """Cut a sequence to ``max_length`` by ``policy``; None when ``skip`` drops it.

    ``right`` keeps the first ``max_length`` tokens; ``left`` keeps the last ones, after the
    leading BOS when there is one; ``skip`` keeps a sequence that fits and drops one that does not.
    """
    if len(input_ids) <= max_length:
        return input_ids, labels
    if policy == "skip":
        return None
    if policy == "right":
        return input_ids[:max_length], labels[:max_length]
    keep = 1 if input_ids and bos_token_id is not None and input_ids[0] == bos_token_id and max_length > 1 else 0
    tail = max_length - keep
    return input_ids[:keep] + input_ids[len(input_ids) - tail:], labels[:keep] + labels[len(labels) - tail:]


def tokenize_example(example: Example, tokenizer: Any, max_length: int,
                     encode: Callable[[str], list[int]] | None = None,
                     truncate: str = "right") -> dict[str, list[int]] | None:
    """Token ids and labels for one example (see ``full_ids``), cut to ``max_length`` by the
    ``truncate`` policy (see ``truncate_ids``); None when the policy skips it or no completion
    token is left to learn."""
    _require_policy(truncate)
    return _cut(full_ids(example, tokenizer, encode), max_length, truncate, tokenizer.bos_token_id)


def _cut(whole: tuple[list[int], list[int]], max_length: int, truncate: str,
         bos_token_id: int | None) -> dict[str, list[int]] | None:
    cut = truncate_ids(*whole, max_length, truncate, bos_token_id)
    if cut is None:
        return None
    input_ids, labels = cut
    # The first label is never predicted (nothing comes before it), so it teaches nothing.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": input_ids, "labels": labels}


def tokenize_examples(examples: Iterable[Example], tokenizer: Any, max_length: int,
                      encode: Callable[[str], list[int]] | None = None,
                      truncate: str = "right") -> list[dict[str, list[int]]]:
    """Tokenize every example by the ``truncate`` policy; one warning says how many were cut and
    one how many were dropped (skipped, or with no completion token left)."""
    return [item for item in iter_tokenized(examples, tokenizer, max_length, encode, truncate) if item is not None]


def iter_tokenized(examples: Iterable[Example], tokenizer: Any, max_length: int,
                   encode: Callable[[str], list[int]] | None = None,
                   truncate: str = "right") -> Iterator[dict[str, list[int]] | None]:
    """``tokenize_example`` of each example as it is read (None for one that is dropped); once the
    examples are exhausted, the warnings of ``tokenize_examples``."""
    _require_policy(truncate)
    total, truncated, skipped = 0, 0, 0
    for example in examples:
        total += 1
        whole = full_ids(example, tokenizer, encode)
        item = _cut(whole, max_length, truncate, tokenizer.bos_token_id)
        if item is None:
            skipped += 1
        else:
            truncated += len(whole[0]) > max_length
        yield item
    if truncated:
        side = "end" if truncate == "right" else "start"
        warnings.warn(f"truncated {truncated} of {total} examples to max_length={max_length} (cut at the {side}, "
                      f"truncate={truncate}); raise max_length to keep them whole", stacklevel=2)
    if skipped:
        reason = "longer than" if truncate == "skip" else "whose completion does not fit in"
        warnings.warn(f"skipped {skipped} of {total} examples {reason} max_length={max_length}; "
                      f"raise max_length to keep them", stacklevel=2)


def _require_policy(truncate: str) -> None:
    if truncate not in TRUNCATE_POLICIES:
        raise DeltatuneError(f"truncate must be one of {', '.join(TRUNCATE_POLICIES)}, got {truncate!r}: "
                             f"pick one (right cuts the end, left the start, skip drops the example)")


# --- packing -----------------------------------------------------------------------------------


def pack_examples(items: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack tokenized examples into rows of at most ``max_length`` tokens (best fit, longest first).

    Each row holds ``input_ids``, ``labels`` and ``position_ids`` that restart at 0 for every
    example; ``collate`` turns the restarts into a block-diagonal causal mask, so no token
    attends outside its own example and each example's loss is what it would be alone.
    The packing is a pure function of ``items``, so resumed runs see the same rows.
    """
    return list(iter_packed_rows(items, max_length))


def iter_packed_rows(items: Sequence[dict[str, list[int]]], max_length: int,
                     lengths: Sequence[int] | None = None) -> Iterator[dict[str, list[int]]]:
    """The rows of ``pack_examples``, one at a time (``lengths``: the items' token counts, if known)."""
    lengths = [len(item["input_ids"]) for item in items] if lengths is None else lengths
    order = sorted(range(len(items)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (space left, row number), sorted
    for index in order:
        length = int(lengths[index])
        if length > max_length:
            raise DeltatuneError(f"an example of {length} tokens is longer than max_length={max_length}, so it "
                                 f"cannot be packed: tokenize with the same max_length before packing")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, row = free.pop(slot)
            rows[row].append(index)
        else:
            space, row = max_length, len(rows)
            rows.append([index])
        bisect.insort(free, (space - length, row))
    for members in rows:
        members.sort()
        pieces = [items[i] for i in members]
        yield {
            "input_ids": [t for piece in pieces for t in piece["input_ids"]],
            "labels": [IGNORE_INDEX if p == 0 else t for piece in pieces for p, t in enumerate(piece["labels"])],
            "position_ids": [p for piece in pieces for p in range(len(piece["input_ids"]))],
        }


def packed_attention_mask(position_ids: torch.Tensor, lengths: Sequence[int],
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive 4D mask (batch, 1, L, L) for packed rows: 0 where a token may attend (an earlier or
    the same token of its own example), the dtype's minimum elsewhere and on padding."""
    batch, width = position_ids.shape
    device = position_ids.device
    example = (position_ids == 0).long().cumsum(-1)  # which example of the row each token is in
    real = torch.arange(width, device=device)[None, :] < torch.tensor(list(lengths), device=device)[:, None]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = causal[None] & (example[:, :, None] == example[:, None, :]) & real[:, :, None] & real[:, None, :]
    mask = torch.zeros(batch, 1, width, width, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


@contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """While open, a call of ``model`` with ``position_ids`` and a 2D ``attention_mask`` (a packed
    batch from ``collate``) gets the block-diagonal causal 4D mask of ``packed_attention_mask``
    in place of the 2D one, so no token attends outside its example. Calls without
    ``position_ids`` (unpacked batches) pass unchanged; generation is never run inside it."""
    def use_packed_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if positions is None or mask is None or mask.ndim != 2:
            return None
        kwargs["attention_mask"] = packed_attention_mask(positions, mask.sum(-1).tolist())
        return args, kwargs

    handle = model.register_forward_pre_hook(use_packed_mask, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def unpack_row(row: dict[str, list[int]]) -> list[dict[str, list[int]]]:
    """The examples of a packed row, each as ``tokenize_example`` gave it (first label ignored)."""
    starts = [k for k, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [{"input_ids": row["input_ids"][a:b], "labels": [IGNORE_INDEX] + row["labels"][a + 1:b]}
            for a, b in zip(starts, starts[1:])]


@torch.no_grad()
def check_packing(model: torch.nn.Module, rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> None:
    """Refuse packing for a model whose packed rows do not score each example as it scores alone.

    Runs the row holding the most examples (inside ``packed_attention``), then each of
    its examples alone, and compares every example's summed token loss (the model must take a
    4D attention mask and ``position_ids``; a method that widens the attention mask itself does not).
    """
    if not rows:
        return
    row = max(rows[:1000], key=lambda row: row["position_ids"].count(0))  # the most examples in one row
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with packed_attention(model):
            packed = _token_losses(model, collate([row], pad_token_id), device)[0]
        starts = [k for k, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        together = torch.stack([packed[a:b - 1].sum() for a, b in zip(starts, starts[1:])])
        alone = torch.stack([_token_losses(model, collate([piece], pad_token_id), device)[0].sum()
                             for piece in unpack_row(row)])
    except Exception as error:  # noqa: BLE001 - any failure means this model cannot take packed rows
        raise DeltatuneError(f"packing needs a model that takes a 4D attention mask and position_ids, and this one "
                             f"failed on a packed row ({type(error).__name__}: {str(error)[:80]}): set packing=false"
                             ) from None
    finally:
        model.train(was_training)
    if not torch.allclose(together, alone, rtol=1e-3, atol=1e-3):  # fp32 sums over different shapes
        raise DeltatuneError(f"this model scores packed examples differently from the same examples alone "
                             f"(summed losses {together.tolist()} vs {alone.tolist()}), so it ignores the packed "
                             f"attention mask: set packing=false")


def _token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Cross-entropy of each predicted token, (batch, length - 1); 0 where the label is ignored."""
    logits = model(**{key: value.to(device) for key, value in batch.items() if key != "labels"}).logits
    targets = batch["labels"][:, 1:].to(device)
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                               ignore_index=IGNORE_INDEX, reduction="none")
    return losses


# --- splitting, collating, batching ------------------------------------------------------------

Item = TypeVar("Item")


def split_examples(examples: Sequence[Item], eval_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Shuffle with ``seed`` and hold out ``eval_fraction`` (at least one, never all) for eval."""
    shuffled = list(examples)
    eval_count = held_out_count(len(shuffled), eval_fraction)
    random.Random(seed).shuffle(shuffled)
    return shuffled[eval_count:], shuffled[:eval_count]


def held_out_count(count: int, eval_fraction: float) -> int:
    """How many of ``count`` examples ``split_examples`` holds out: at least one, never all."""
    if not 0 <= eval_fraction < 1:
        raise DeltatuneError(f"eval_fraction must be at least 0 and below 1, got {eval_fraction}: pick e.g. 0.05")
    eval_count = max(1, round(count * eval_fraction)) if eval_fraction > 0 else 0
    return max(0, min(eval_count, count - 1))


def collate(batch: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label ``IGNORE_INDEX``.

    Packed rows (items with ``position_ids``, from ``pack_examples``) also get their
    ``position_ids``; run the model inside ``packed_attention`` so that they also get the
    block-diagonal mask (the 2D mask stays here, so a batch's token count is its sum).
    """
    length = max(len(item["input_ids"]) for item in batch)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (length - len(values))

    tensors = {
        "input_ids": torch.tensor([padded(item["input_ids"], pad_token_id) for item in batch]),
        "attention_mask": torch.tensor([padded([1] * len(item["input_ids"]), 0) for item in batch]),
        "labels": torch.tensor([padded(item["labels"], IGNORE_INDEX) for item in batch]),
    }
    if all("position_ids" in item for item in batch):
        # padding continues the last example's positions, so it never looks like a new example
        positions = torch.tensor([item["position_ids"] + list(range(item["position_ids"][-1] + 1,
                                                                     item["position_ids"][-1] + 1 + length
                                                                     - len(item["position_ids"])))
                                  for item in batch])
        tensors["position_ids"] = positions
    return tensors


def epoch_order(num_examples: int, seed: int, epoch: int, lengths: Sequence[int] | None = None,
                batch_size: int = 1) -> list[int]:
    """The order of examples in ``epoch``: a permutation fixed by ``seed + epoch``.

    With ``lengths`` the order is length-grouped: the permutation is cut into chunks of
    ``50 * batch_size`` examples, each chunk sorted longest first and cut into batches, and the
    batches shuffled (by the same generator), so a batch holds examples of similar length and
    pads little while every example is still seen once per epoch.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    if lengths is None:
        return order
    chunk = 50 * batch_size
    grouped = [sorted(order[start:start + chunk], key=lambda i: -lengths[i]) for start in range(0, len(order), chunk)]
    flat = [i for part in grouped for i in part]
    batches = [flat[start:start + batch_size] for start in range(0, len(flat), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]]


def batch_indices(num_examples: int, batch_size: int, seed: int, start_batch: int = 0,
                  lengths: Sequence[int] | None = None) -> Iterator[list[int]]:
    """Endless batches of example indices, starting at batch number ``start_batch``.

    Batches are cut from the concatenated epoch orders, so every batch is full and may
    straddle two epochs; ``batch_indices(..., start_batch=k)`` yields exactly the batches
    ``k, k+1, ...`` of ``batch_indices(...)``. ``lengths`` (token counts per example) makes
    the epochs length-grouped (see ``epoch_order``).
    """
    if num_examples < 1:
        raise DeltatuneError("there are no examples to batch: add training data")
    epoch, offset = divmod(start_batch * batch_size, num_examples)
    stream = _index_stream(num_examples, seed, epoch, offset, lengths, batch_size)
    while True:
        yield [next(stream) for _ in range(batch_size)]


def _index_stream(num_examples: int, seed: int, epoch: int, offset: int, lengths: Sequence[int] | None,
                  batch_size: int) -> Iterator[int]:
    while True:
        yield from epoch_order(num_examples, seed, epoch, lengths, batch_size)[offset:]
        epoch, offset = epoch + 1, 0
