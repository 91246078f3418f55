"""Tokenized examples kept on disk, so a training run's memory does not grow with its data file.

A run reads its data file one record at a time (``data.iter_examples``), tokenizes each record
and appends its token lists to a ``TokenStore``: one anonymous temporary file per field (the
system's temporary folder, or ``TMPDIR``), int32, removed by the operating system when the
store is closed or the process ends, even by SIGKILL. The store is then a read-only sequence
of the same ``{"input_ids": [...], "labels": [...]}`` dicts that ``data.tokenize_examples``
(or a task's tokenizer in ``task_data``) returns in memory, read through a memory map: the tokens stay in the page cache, which the
kernel reclaims under pressure, not in the process's own memory.

What does stay in memory grows with the number of examples, not their size: 8 bytes of offset
per example and list field (16 for the record number and a classifier's label), plus 8 bytes
per example for each view (a train/held-out split).

A store remembers which record each example came from (``source``): a record that the
truncation policy skipped has no example, so a split by record number (``split_by_record``)
holds out exactly the records that ``data.split_examples`` would have held out of the records
themselves, in the same order.
"""

from __future__ import annotations

import random
import tempfile
from array import array
from typing import IO, Any, Iterable, Iterator, Sequence, overload

import numpy as np

TOKEN_DTYPE = np.int32
FLUSH_TOKENS = 1 << 16  # tokens buffered per field before a write (a few MiB as Python ints)


class TokenStore(Sequence[dict[str, Any]]):
    """A read-only sequence of tokenized examples whose token lists live in temporary files.

    Every example has the same fields. A list field (``input_ids``, ``labels``, a seq2seq
    target...) may have its own length per example; a whole-number field (a classifier's
    ``labels``) is kept in memory, 8 bytes per example.
    """

    def __init__(self, lists: dict[str, tuple[np.ndarray, np.ndarray]], numbers: dict[str, np.ndarray],
                 source: np.ndarray, records: int, order: np.ndarray | None = None,
                 files: list[IO[bytes]] | None = None) -> None:
        self._lists = lists  # name -> (every example's values concatenated (a memory map), offsets)
        self._numbers = numbers  # name -> one whole number per example
        self._source = source  # example k came from record source[k] of the data file
        self.records = records  # records read, including those that gave no example
        self._order = order  # this view's examples, as positions in the whole store (None: all, in order)
        self._files = files or []  # kept open: closing one deletes its anonymous file

    @classmethod
    def from_items(cls, items: Iterable[dict[str, Any] | None]) -> "TokenStore":
        """Append ``items`` in order; a None item is a record that gave no example (it is counted)."""
        names: list[str] | None = None
        files: dict[str, IO[bytes]] = {}
        buffers: dict[str, list[int]] = {}
        offsets: dict[str, array] = {}  # 8 bytes per example, not a Python int's 36
        numbers: dict[str, array] = {}
        source, records, buffered = array("q"), 0, 0
        for item in items:
            records += 1
            if item is None:
                continue
            if names is None:
                names = list(item)
                listed = [name for name in names if not isinstance(item[name], int)]
                files = {name: tempfile.TemporaryFile(prefix="deltatune-tokens-") for name in listed}
                buffers, offsets = {name: [] for name in listed}, {name: array("q", [0]) for name in listed}
                numbers = {name: array("q") for name in names if name not in files}
            if list(item) != names:
                raise ValueError(f"every item needs the fields {names}, got {list(item)}")
            for name in files:
                values = item[name]
                buffers[name].extend(values)
                offsets[name].append(offsets[name][-1] + len(values))
                buffered += len(values)
            for name in numbers:
                numbers[name].append(int(item[name]))
            source.append(records - 1)
            if buffered >= FLUSH_TOKENS:
                _flush(files, buffers)
                buffered = 0
        _flush(files, buffers)
        lists = {name: (_mapped(handle, offsets[name][-1]), np.frombuffer(offsets[name], dtype=np.int64))
                 for name, handle in files.items()}
        return cls(lists, {name: np.frombuffer(values, dtype=np.int64) for name, values in numbers.items()},
                   np.frombuffer(source, dtype=np.int64), records, files=list(files.values()))

    # --- the sequence ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._source) if self._order is None else len(self._order)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        position = self._position(index % len(self))
        item: dict[str, Any] = {}
        for name, (values, offsets) in self._lists.items():
            item[name] = values[offsets[position]:offsets[position + 1]].tolist()
        for name, numbers in self._numbers.items():
            item[name] = int(numbers[position])
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[k] for k in range(len(self)))

    def _position(self, index: int) -> int:
        return index if self._order is None else int(self._order[index])

    # --- what a run needs besides the examples --------------------------------------------------

    def lengths(self, field: str = "input_ids") -> np.ndarray:
        """Length of ``field`` in each example of this view, in its order."""
        widths = np.diff(self._lists[field][1]) if field in self._lists else np.zeros(len(self._source), np.int64)
        return widths if self._order is None else widths[self._order]

    def sources(self) -> np.ndarray:
        """The record number each example of this view came from."""
        return self._source if self._order is None else self._source[self._order]

    def view(self, positions: Sequence[int] | np.ndarray) -> "TokenStore":
        """The examples at ``positions`` of this view, in that order (no tokens are copied)."""
        whole = np.asarray(positions, dtype=np.int64)
        if self._order is not None:
            whole = self._order[whole]
        return TokenStore(self._lists, self._numbers, self._source, self.records, whole, self._files)

    def split_by_record(self, eval_fraction: float, seed: int) -> tuple["TokenStore", "TokenStore"]:
        """(train, held-out): the examples of the records that ``data.split_examples(records,
        eval_fraction, seed)`` puts on each side, in the order it puts them there."""
        from deltatune.data import held_out_count

        eval_count = held_out_count(self.records, eval_fraction)
        order = array("q", range(self.records))  # 8 bytes a record; the same permutation as shuffling a list
        random.Random(seed).shuffle(order)
        shuffled = np.frombuffer(order, dtype=np.int64)
        position_of = np.full(self.records, -1, dtype=np.int64)
        position_of[self.sources()] = np.arange(len(self))

        def kept(records: np.ndarray) -> np.ndarray:
            positions = position_of[records]
            return positions[positions >= 0]
        return self.view(kept(shuffled[eval_count:])), self.view(kept(shuffled[:eval_count]))

    def close(self) -> None:
        """Delete the temporary files now (otherwise when the process ends)."""
        self._lists = {}
        for handle in self._files:
            handle.close()


def _flush(files: dict[str, IO[bytes]], buffers: dict[str, list[int]]) -> None:
    for name, values in buffers.items():
        if values:
            files[name].write(np.asarray(values, dtype=TOKEN_DTYPE).tobytes())
            values.clear()


def _mapped(handle: IO[bytes], tokens: int) -> np.ndarray:
    handle.flush()
    if tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(handle, dtype=TOKEN_DTYPE, mode="r", shape=(tokens,))

