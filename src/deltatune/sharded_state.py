"""Trainer state written by every process at once: PyTorch's ``torch.distributed.checkpoint``.

Under FSDP2 each process holds 1/W of every trained weight and of AdamW's two moments. A
checkpoint that gathered them to one process first would need the whole model and optimizer
(for full fine-tuning of a 7B model in fp32: 28 GB of weights, 56 GB of moments) in that
process's memory, and one writer. Here every process writes its own shards, in parallel, as
safetensors files in ``checkpoint-N/shards/``:

    shard-00001-model-00001-of-00001.safetensors     process 0's pieces
    shard-00002-model-00001-of-00001.safetensors     process 1's pieces ...

with each piece's offset in the file's header. The keys are ``weights.<parameter>`` and
``optimizer.<parameter>.<moment>`` (``step``, ``exp_avg``, ``exp_avg_sq``). Reading goes
through the same library, which cuts the pieces to whatever layout the reading processes
have: a checkpoint written by 8 processes continues on 2, on 16, or on one process without a
process group. The storage is PyTorch's safetensors reader and writer: nothing in a
checkpoint is unpickled, unlike the library's default format (whose ``.metadata`` is a pickle).
The library is imported when first used: it adds a second to every start otherwise.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

SHARDS = "shards"  # the folder of a checkpoint that holds them
WEIGHTS, OPTIMIZER = "weights.", "optimizer."


def has_shards(checkpoint: Path) -> bool:
    return (checkpoint / SHARDS).is_dir()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def flat_state(trainable: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The trained weights and their optimizer moments under one flat namespace, as this process
    holds them (DTensor shards under FSDP2, whole tensors otherwise)."""
    state = {f"{WEIGHTS}{name}": param.detach() for name, param in trainable.items()}
    for name, param in trainable.items():
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                state[f"{OPTIMIZER}{name}.{key}"] = value
    return state


def save_shards(folder: Path, trainable: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its pieces of the weights and moments into ``folder/shards`` (a collective:
    every process calls it, with the same folder)."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=_distributed())
    dcp.save(flat_state(trainable, optimizer), storage_writer=writer, no_dist=not _distributed())


def load_shards(folder: Path, trainable: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The weights and AdamW moments saved in ``folder/shards``, laid out as this process holds the
    parameters (its shard of each under FSDP2, whole otherwise): (weights, moments by parameter).
    Nothing is copied into the model or the optimizer. A collective under a process group."""
    saved = set(_saved(folder))
    weights = {name: torch.empty_like(param.detach()) for name, param in trainable.items()}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in trainable.items():
        prefix = f"{OPTIMIZER}{name}."
        for key in (key.removeprefix(prefix) for key in saved if key.startswith(prefix)):
            if "." not in key:  # not a longer parameter name that starts with this one
                template = torch.zeros((), dtype=torch.float32) if key == "step" else torch.zeros_like(param.detach())
                moments.setdefault(name, {})[key] = template
    state = {f"{WEIGHTS}{name}": value for name, value in weights.items()}
    state |= {f"{OPTIMIZER}{name}.{key}": value for name, inner in moments.items() for key, value in inner.items()}
    _load(state, folder, alone=not _distributed())
    return weights, moments


class DamagedShards(ValueError):
    """A file of ``shards/`` that is missing, cut short or not what a process wrote."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} {problem}")
        self.path, self.problem = path, problem


def shard_files(folder: Path) -> list[str]:
    """The files of ``folder/shards`` (what the checkpoint records, to notice one gone missing)."""
    return sorted(path.name for path in (folder / SHARDS).iterdir() if path.name.endswith(".safetensors"))


def saved_shapes(folder: Path, files: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    """The whole shape of each trained weight saved in ``folder/shards``, read from the files' headers,
    once every file in ``files`` (the ones the checkpoint recorded) is there and the pieces of every
    tensor cover it; otherwise ``DamagedShards`` names the file."""
    for name in files or []:
        if not (folder / SHARDS / name).is_file():
            raise DamagedShards(folder / SHARDS / name, "is missing")
    return {key.removeprefix(WEIGHTS): shape for key, shape in _saved(folder).items() if key.startswith(WEIGHTS)}


def _saved(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    for name in shard_files(folder):  # each header and data length read, so a file cut short is named
        path = folder / SHARDS / name
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except Exception:
            raise DamagedShards(path, "is truncated or damaged") from None
    metadata = HuggingFaceStorageReader(str(folder / SHARDS)).read_metadata()
    if not metadata.state_dict_metadata:
        raise DamagedShards(folder / SHARDS, "holds no safetensors files")
    for key, meta in metadata.state_dict_metadata.items():
        covered = sum(math.prod(chunk.sizes) for chunk in meta.chunks)
        if covered != math.prod(meta.size):
            raise DamagedShards(folder / SHARDS, f"holds only part of {key}: a process's file is missing")
    return {key: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()}


def read_whole(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor saved in ``folder/shards``, whole, on the CPU of a process on its own: to look
    into a checkpoint, or to turn it into one file."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.HuggingFaceStorageReader(str(folder / SHARDS)).read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()}
    _load(state, folder, alone=True)
    return state


def _load(state: dict[str, torch.Tensor], folder: Path, alone: bool) -> None:
    """Fill ``state`` in place from ``folder/shards``: in this process ``alone``, else with every process."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process on its own is what it should assume
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder / SHARDS)), no_dist=alone)

