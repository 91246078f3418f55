"""Records for the two tasks beyond causal LM: classification and sequence-to-sequence.

A **classification** record is a text (or a text pair) and a label. Files are TSV, CSV (a
header row names the columns, or ``columns=text,label`` names them for a table without one,
like ChnSentiCorp's) or JSONL / a JSON array of objects; the format follows the file's ending
(``.tsv``, ``.csv``, anything else is JSON). The text column defaults to
``text`` or ``sentence``, the optional second text to ``text_pair`` or ``sentence2`` (with
``sentence1`` as the first), the label to ``label``; every one can be named instead.
Labels are text or whole numbers (a TSV/CSV cell that reads as a whole number counts as
one). The label list — sorted unless given — fixes the ids: label ``labels[i]`` is class ``i``.

A **seq2seq** record is a ``source`` and a ``target`` (``prompt``/``completion`` also work);
the encoder reads the source, the labels are the target's token ids, and the model builds
its decoder inputs from them.

Each task tokenizes to dicts of token lists, and brings its own ``collate`` for the one
training loop (``deltatune.train``): a classification batch has labels of shape [batch],
a seq2seq batch has source and target padded to their own lengths.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from deltatune.data import IGNORE_INDEX, require_unicode
from deltatune.errors import DeltatuneError
from deltatune.token_store import TokenStore

TEXT_COLUMNS = ("text", "sentence", "sentence1")
PAIR_COLUMNS = ("text_pair", "sentence2")
SOURCE_TARGET_COLUMNS = (("source", "target"), ("prompt", "completion"))
Label = str | int


@dataclass(frozen=True)
class ClassificationRecord:
    text: str
    label: Label | None  # None: unlabelled (data to predict)
    text_pair: str | None = None
    where: str = ""  # "file line n", for errors about this record


@dataclass(frozen=True)
class Seq2SeqRecord:
    source: str
    target: str | None  # None: no target (data to predict)


# --- reading rows ----------------------------------------------------------------------------
def read_rows(path: str | os.PathLike, columns: Sequence[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of a TSV, CSV, JSONL or JSON-array file; ``where`` names file and line.

    ``columns`` names the columns of a table that has no header row (its first row is data)."""
    return list(iter_rows(path, columns))


def iter_rows(path: str | os.PathLike, columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of ``read_rows``, one at a time: a table or JSONL file is read a line at a time, so
    memory does not grow with the file's size (a JSON array is parsed whole)."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise DeltatuneError(f"data file {path} is a folder: give the file inside it")
        raise DeltatuneError(f"data file {path} does not exist: check the path")
    suffix = path.suffix.lower()
    if columns is not None and suffix not in (".tsv", ".csv"):
        raise DeltatuneError(f"columns names the columns of a TSV or CSV table without a header, and {path} is "
                             "JSON, whose records name their own fields: leave columns out")
    count = 0
    with path.open("rb") as file:
        lines = _text_lines(path, file)
        rows = (_table_rows(path, lines, "\t" if suffix == ".tsv" else ",", columns) if suffix in (".tsv", ".csv")
                else _json_rows(path, lines))
        for count, row in enumerate(rows, 1):
            yield row
    if not count:
        raise DeltatuneError(f"data file {path} holds no records: add at least one")


def _text_lines(path: Path, file: Iterable[bytes]) -> Iterator[str]:
    """Each line of ``file`` decoded (a leading byte-order mark dropped); a line that is not UTF-8
    is one sentence naming it."""
    for number, line in enumerate(file, 1):
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DeltatuneError(f"data file {path} is not UTF-8 text (line {number}): re-save it as UTF-8") from None


def _table_rows(path: Path, file: Iterable[str], delimiter: str,
                columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    # TSV cells are taken literally (SST-2 sentences hold bare quotes); CSV follows the usual quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(file, delimiter=delimiter, quoting=quoting)
    header = list(columns) if columns is not None else next(reader, None)
    if not header:
        return
    header = [name.strip() for name in header]
    named_by = "columns setting" if columns is not None else "header"
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            raise DeltatuneError(f"{path} line {reader.line_num} has {len(cells)} cells but the {named_by} names "
                                 f"{len(header)} columns ({', '.join(header)}): fix that line")
        yield f"{path} line {reader.line_num}", dict(zip(header, cells))


def _json_rows(path: Path, file: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    first = next((number, line) for number, line in enumerate(itertools.chain(file, [""]), 1)
                 if line.strip() or not line)
    if first[1].lstrip().startswith("["):
        try:
            records = json.loads(first[1] + "".join(file))
        except json.JSONDecodeError as error:
            line = error.lineno + first[0] - 1
            raise DeltatuneError(f"{path} line {line} is not valid JSON ({error.msg}): fix that line") from None
        except RecursionError:
            raise DeltatuneError(f"{path} nests its JSON deeper than it can be read: flatten its records") from None
        numbered = ((f"{path} record {number}", record) for number, record in enumerate(records, 1))
    else:
        lines = itertools.chain([first], enumerate(file, first[0] + 1))
        numbered = (_json_line(path, number, line) for number, line in lines if line.strip())
    for where, record in numbered:
        if not isinstance(record, dict):
            raise DeltatuneError(f"{where} is a {type(record).__name__}, not an object: make it an object of "
                                 "named fields")
        yield where, record


def _json_line(path: Path, number: int, line: str) -> tuple[str, Any]:
    try:
        return f"{path} line {number}", json.loads(line)
    except json.JSONDecodeError as error:
        raise DeltatuneError(f"{path} line {number} is not valid JSON ({error.msg}): fix or remove that line") from None
    except RecursionError:
        raise DeltatuneError(f"{path} line {number} nests its JSON deeper than it can be read: flatten that record"
                             ) from None


def _column(path: str | os.PathLike, columns: Sequence[str], given: str | None, candidates: Sequence[str],
            setting: str, what: str) -> str | None:
    """The column to read: ``given`` (which must exist) or the first candidate present."""
    if given is not None:
        if given not in columns:
            raise DeltatuneError(f"{path} has no {what} column {given!r} (its columns: {', '.join(columns)}); "
                                 f"set {setting} to one of them.")
        return given
    return next((name for name in candidates if name in columns), None)


# --- classification --------------------------------------------------------------------------
def load_classification_records(path: str | os.PathLike, text_column: str | None = None,
                                text_pair_column: str | None = None,
                                label_column: str | None = None,
                                require_labels: bool = True,
                                columns: Sequence[str] | None = None) -> list[ClassificationRecord]:
    """Text (and optional second text) and label of every row; columns found by name (see the module doc).

    With ``require_labels=False`` (data to predict) a file without the label column gives records
    whose label is None. ``columns`` names the columns of a table without a header row.
    """
    return list(iter_classification_records(path, text_column, text_pair_column, label_column, require_labels,
                                            columns))


def iter_classification_records(path: str | os.PathLike, text_column: str | None = None,
                                text_pair_column: str | None = None, label_column: str | None = None,
                                require_labels: bool = True,
                                columns: Sequence[str] | None = None) -> Iterator[ClassificationRecord]:
    """The records of ``load_classification_records``, read one row at a time."""
    rows = iter_rows(path, columns)
    first = next(rows)
    names = list(first[1])
    text_key = _column(path, names, text_column, TEXT_COLUMNS, "text_column", "text")
    if text_key is None:
        headerless = columns is None and Path(path).suffix.lower() in (".tsv", ".csv")
        raise DeltatuneError(f"{path} has no text column (its columns: {', '.join(names)}); name one with "
                             "text_column=NAME or call it text or sentence"
                             + (", or, if its first row is data, not a header, name its columns with "
                                "columns=text,label" if headerless else "") + ".")
    pair_key = _column(path, names, text_pair_column, PAIR_COLUMNS, "text_pair_column", "second-text")
    if require_labels:
        label_key = _column(path, names, label_column or "label", (), "label_column", "label")
    else:
        label_key = label_column or "label" if (label_column or "label") in names else None
    for where, row in itertools.chain([first], rows):
        for key in (text_key, label_key, pair_key):
            if key is None:
                continue
            if key not in row or row[key] is None:
                raise DeltatuneError(f"{where} has no {key!r} field: add it, or drop that record.")
        text, pair = row[text_key], row[pair_key] if pair_key else None
        for key, value in ((text_key, text), (pair_key, pair)):
            if key and not isinstance(value, str):
                raise DeltatuneError(f"{where} has a {type(value).__name__} in {key!r} where text is expected: "
                                     "make it a string")
            if key:
                require_unicode(where, key, value)
        label = None if label_key is None else _label(where, label_key, row[label_key])
        yield ClassificationRecord(text=text, text_pair=pair, label=label, where=where)


def _label(where: str, key: str, value: Any) -> Label:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DeltatuneError(f"{where} has {value!r} in {key!r}, but a label is text or a whole number: fix it.")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DeltatuneError(f"{where} has an empty {key!r}: give every record a label, or drop that record.")
        if value.lstrip("-").isdigit():
            return int(value)
    return value


def label_names(records: Iterable[ClassificationRecord], given: Sequence[Label] | None = None) -> list[Label]:
    """The label list (``labels[i]`` is class ``i``): ``given``, or the data's labels sorted.

    With ``given``, a record whose label is not listed is an error naming it. Sorting puts whole
    numbers in numeric order, so labels 0..k-1 keep their own numbers as ids.
    """
    if given is not None:
        given = [_label("the labels setting", "labels", label) for label in given]
        if len(set(map(str, given))) != len(given):
            raise DeltatuneError(f"labels {list(given)!r} lists a label twice; list each label once.")
        known = set(given)
        for record in records:
            if record.label not in known:
                raise DeltatuneError(f"{record.where} has label {record.label!r}, which the labels setting "
                                     f"({', '.join(map(str, given))}) does not list: add it there.")
        return list(given)
    found = {record.label for record in records}
    if not found:
        raise DeltatuneError("the data has no labelled records; a classifier needs at least two labels.")
    if all(isinstance(label, int) for label in found):
        names: list[Label] = sorted(found)
    else:
        names = sorted({str(label) for label in found})
    if len(names) < 2:
        raise DeltatuneError(f"the data has only one label ({names[0]!r}); a classifier needs at least two.")
    return names


def label_ids(records: Sequence[ClassificationRecord], labels: Sequence[Label]) -> list[int]:
    index = {str(label): number for number, label in enumerate(labels)}
    ids = []
    for record in records:
        if str(record.label) not in index:
            raise DeltatuneError(f"{record.where} has label {record.label!r}, which the model does not know "
                                 f"(its labels: {', '.join(map(str, labels))}): use one of them.")
        ids.append(index[str(record.label)])
    return ids


def encode_classification(records: Sequence[ClassificationRecord], tokenizer: Any,
                          max_length: int) -> list[dict[str, list[int]]]:
    """Token ids (special tokens included: [CLS] ... [SEP], or BOS ...), cut to ``max_length``."""
    encoded = []
    for record in records:
        tokens = tokenizer(record.text, record.text_pair, truncation=True, max_length=max_length)
        item = {"input_ids": list(tokens["input_ids"])}
        if record.text_pair is not None and "token_type_ids" in tokens:  # BERT tells the two texts apart
            item["token_type_ids"] = list(tokens["token_type_ids"])
        encoded.append(item)
    return encoded


def tokenize_classification(records: Sequence[ClassificationRecord], tokenizer: Any, max_length: int,
                            labels: Sequence[Label]) -> list[dict[str, Any]]:
    """Encoded records, each with its class id under ``labels`` (an int)."""
    return list(iter_tokenized_classification(records, tokenizer, max_length, labels))


def iter_tokenized_classification(records: Iterable[ClassificationRecord], tokenizer: Any, max_length: int,
                                  labels: Sequence[Label]) -> Iterator[dict[str, Any]]:
    """``tokenize_classification``, one record at a time."""
    for record in records:
        [item], [label] = encode_classification([record], tokenizer, max_length), label_ids([record], labels)
        yield {**item, "labels": label}


def collate_classification(batch: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and attention mask [batch, length]; labels (when the items have them) [batch]."""
    length = max(len(item["input_ids"]) for item in batch)
    out = {
        "input_ids": torch.tensor([item["input_ids"] + [pad_token_id] * (length - len(item["input_ids"]))
                                   for item in batch]),
        "attention_mask": torch.tensor([[1] * len(item["input_ids"]) + [0] * (length - len(item["input_ids"]))
                                        for item in batch]),
    }
    if "token_type_ids" in batch[0]:
        out["token_type_ids"] = torch.tensor([item["token_type_ids"] + [0] * (length - len(item["token_type_ids"]))
                                              for item in batch])
    if "labels" in batch[0]:
        out["labels"] = torch.tensor([item["labels"] for item in batch])
    return out


# --- seq2seq --------------------------------------------------------------------------------
def load_seq2seq_records(path: str | os.PathLike, columns: Sequence[str] | None = None,
                         require_targets: bool = True) -> list[Seq2SeqRecord]:
    """``source``/``target`` (or ``prompt``/``completion``) of every row of a JSONL, JSON, TSV or CSV file
    (``columns``: the column names of a table without a header row; ``require_targets``: see
    ``iter_seq2seq_records``)."""
    return list(iter_seq2seq_records(path, columns, require_targets))


def iter_seq2seq_records(path: str | os.PathLike, columns: Sequence[str] | None = None,
                         require_targets: bool = True) -> Iterator[Seq2SeqRecord]:
    """The records of ``load_seq2seq_records``, read one row at a time; without ``require_targets``
    a row may have its source alone (data to predict), and its ``target`` is None."""
    for where, row in iter_rows(path, columns):
        pair = next(((s, t) for s, t in SOURCE_TARGET_COLUMNS if s in row and t in row), None)
        if pair is None and not require_targets:
            pair = next(((s, None) for s, _ in SOURCE_TARGET_COLUMNS if s in row), None)
        if pair is None:
            needs = "'source' and 'target' (or 'prompt' and 'completion')" if require_targets else "'source' (or 'prompt')"
            raise DeltatuneError(f"{where} has fields {sorted(row)} but a seq2seq record needs {needs}: rename them.")
        for key in (key for key in pair if key is not None):
            if not isinstance(row[key], str):
                raise DeltatuneError(f"{where} has a {type(row[key]).__name__} in {key!r} where text is expected: "
                                     "make it a string")
            require_unicode(where, key, row[key])
        yield Seq2SeqRecord(source=row[pair[0]], target=None if pair[1] is None else row[pair[1]])


def tokenize_seq2seq(records: Iterable[Seq2SeqRecord], tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """Source ids for the encoder and target ids as labels (each with the tokenizer's special
    tokens, e.g. T5's closing </s>), each cut to ``max_length``."""
    return list(iter_tokenized_seq2seq(records, tokenizer, max_length))


def iter_tokenized_seq2seq(records: Iterable[Seq2SeqRecord], tokenizer: Any,
                           max_length: int) -> Iterator[dict[str, list[int]]]:
    """``tokenize_seq2seq``, one record at a time."""
    for record in records:
        yield {"input_ids": list(tokenizer(record.source, truncation=True, max_length=max_length)["input_ids"]),
               "labels": list(tokenizer(text_target=record.target, truncation=True, max_length=max_length)["input_ids"])}


def collate_seq2seq(batch: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Sources right-padded with attention 0; targets right-padded with ``IGNORE_INDEX`` to their own length."""
    out = collate_classification([{"input_ids": item["input_ids"]} for item in batch], pad_token_id)
    width = max(len(item["labels"]) for item in batch)
    out["labels"] = torch.tensor([item["labels"] + [IGNORE_INDEX] * (width - len(item["labels"])) for item in batch])
    return out


# --- a run's data for its task ---------------------------------------------------------------
@dataclass
class TaskData:
    """What the training loop needs from a task: tokenized examples, how to batch them, and
    (classification) the label list that fixes the class ids."""

    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]]
    collate: Callable[[Sequence[dict[str, Any]], int], dict[str, torch.Tensor]]
    labels: list[Label] | None = None


def prepare_task_data(task: str, run: Any, tokenizer: Any) -> TaskData:
    """Training and held-out examples of a classification or seq2seq ``run`` (a RunConfig).

    Without ``eval_data`` the held-out share is a seeded split of ``data`` (``eval_fraction``).
    The files are read one row at a time into ``TokenStore``s, so memory does not grow with
    their size; a classifier's label list takes one more pass over ``data`` first.
    """
    max_length = run.train.max_length
    if task == "classification":
        read = partial(iter_classification_records, text_column=run.text_column,
                       text_pair_column=run.text_pair_column, label_column=run.label_column, columns=run.columns)
        labels = label_names(read(run.data), run.labels)
        tokenized = lambda path: iter_tokenized_classification(read(path), tokenizer, max_length, labels)  # noqa: E731
        collate_fn: Callable[..., dict[str, torch.Tensor]] = collate_classification
    elif task == "seq2seq":
        tokenized = lambda path: iter_tokenized_seq2seq(iter_seq2seq_records(path, run.columns), tokenizer,  # noqa: E731
                                                        max_length)
        collate_fn, labels = collate_seq2seq, None
    else:
        raise DeltatuneError(f"task {task!r} has no record format here; use classification or seq2seq.")
    data = TokenStore.from_items(tokenized(run.data))
    if run.eval_data:
        return TaskData(data, TokenStore.from_items(tokenized(run.eval_data)), collate_fn, labels)
    return TaskData(*data.split_by_record(run.eval_fraction, run.train.seed), collate_fn, labels)
