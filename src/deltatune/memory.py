"""Training memory: what one step holds, counted, and what the process peaked at, read.

Two questions, two tools:

- ``measure_training_step(model, optimizer, step)`` counts, byte for byte, what one training
  step keeps alive: parameters + gradients + optimizer state + the tensors autograd saves for
  backward (the activations). It adds up tensor storages, so it gives the same figure on every
  device and on every run. Transient buffers that autograd does not keep (a matmul's workspace,
  the gradient of an activation while backward runs) are not in it: it is what a step must hold,
  not the allocator's peak. (A CUDA allocator also rounds each block up, to 512 bytes at least.)
- ``PeakMemory(device)`` reads the running process's peak: on CUDA the caching allocator's
  ``max_memory_allocated``; on CPU the process's peak resident set size (there is no allocator
  counter on CPU). One cheap call, so a training loop can read it at every logged step.

Every storage is counted once (``unique_bytes``): tied weights, views and transposes share one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from deltatune.errors import DeltatuneError

try:
    import resource  # Unix only: getrusage, for the peak resident set size on CPU
except ImportError:
    resource = None

MIB = 2**20
RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # bytes per ru_maxrss unit: macOS bytes, Linux KiB


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one training step holds, by kind; every storage counted once."""

    parameters: int  # every parameter, trainable or frozen
    gradients: int  # the .grad of every parameter that has one
    optimizer_state: int  # every tensor in optimizer.state (AdamW: exp_avg, exp_avg_sq, a 0-d step)
    activations: int  # tensors autograd saved for backward, less those that are parameters

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def to_dict(self) -> dict[str, int]:
        """Bytes by kind, plus ``total``: ready for JSON."""
        return {**asdict(self), "total": self.total}

    def as_mib(self) -> dict[str, float]:
        """Mebibytes (2**20 bytes) by kind, plus ``total``."""
        return {kind: count / MIB for kind, count in self.to_dict().items()}


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once.

    A view, a transpose or a tied weight shares its storage and adds nothing; a view counts its
    whole storage, not only the part it sees. Tensors without a plain storage are skipped.
    """
    sizes = {}
    for tensor in tensors:
        storage = _storage(tensor)
        if storage is not None:
            sizes[_key(storage)] = storage.nbytes()
    return sum(sizes.values())


def measure_training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], object]
) -> MemoryBreakdown:
    """Take one real training step and count the bytes it holds, by kind.

    ``step()`` runs the forward and the backward, e.g. ``lambda: model(**batch).loss.backward()``.
    Before it, this function clears the gradients (``zero_grad(set_to_none=True)``); after it,
    it takes ``optimizer.step()``, so the optimizer's state exists when it is counted (AdamW
    makes it on its first step). The model is trained by that step like by any other.

    Activations are the storages autograd saves for backward while ``step()`` runs, seen
    through ``torch.autograd.graph.saved_tensors_hooks``: all of them are alive together when
    the forward ends. Parameter storages are left out (they are counted under parameters);
    with activation checkpointing, what the checkpoint keeps (its inputs) is what is counted.
    Parameters are those of the model and of the optimizer's groups, each storage once.
    """
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    parameters = list(dict.fromkeys([*model.parameters(), *in_optimizer]))
    parameter_storages = {_key(storage) for storage in map(_storage, parameters) if storage is not None}
    saved: dict[tuple[torch.device, int], int] = {}  # storage -> bytes

    def count_saved(tensor: torch.Tensor) -> torch.Tensor:
        storage = _storage(tensor)
        if storage is not None and _key(storage) not in parameter_storages:
            saved[_key(storage)] = storage.nbytes()
        return tensor

    optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(count_saved, lambda tensor: tensor):
        step()
    optimizer.step()
    state = [value for per_parameter in optimizer.state.values() for value in per_parameter.values()
             if torch.is_tensor(value)]
    return MemoryBreakdown(
        parameters=unique_bytes(parameters),
        gradients=unique_bytes(p.grad for p in parameters if p.grad is not None),
        optimizer_state=unique_bytes(state),
        activations=sum(saved.values()),
    )


class PeakMemory:
    """The running process's peak memory on one device, cheap to read at every logged step.

    - ``cuda``: ``torch.cuda.max_memory_allocated``, the most bytes of tensors the caching
      allocator had handed out since the last ``reset()`` (construction resets). ``label`` is
      ``"cuda_max_allocated"``.
    - ``cpu``: the process's peak resident set size, ``getrusage(RUSAGE_SELF).ru_maxrss``: every
      page the process has touched (Python, libraries, data, tensors) at its highest since the
      process started. It is RSS, not a tensor count, and it cannot be reset: ``reset()`` does
      nothing, so the figure never goes down. ``label`` is ``"cpu_peak_rss"``.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.label = "cuda_max_allocated"
        elif self.device.type == "cpu":
            if resource is None:
                raise DeltatuneError("the peak memory on CPU is read with getrusage, which this platform lacks: "
                                     "leave peak memory out on this machine")
            self.label = "cpu_peak_rss"
        else:
            raise DeltatuneError(f"peak memory can be read on cpu or cuda, not on {self.device.type}: "
                                 "leave peak memory out on this device")
        self.reset()

    def reset(self) -> None:
        """Start a new peak from now (CUDA); the CPU's peak RSS cannot be reset."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        """The peak in bytes: one allocator query on CUDA, one getrusage call on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT

    def as_mib(self) -> dict[str, float]:
        """The peak in mebibytes under a key naming what was read, e.g. ``{"cpu_peak_rss_mib": 412.3}``."""
        return {f"{self.label}_mib": self.peak_bytes() / MIB}


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested and other storage-less tensors
        return None


def _key(storage: torch.UntypedStorage) -> tuple[torch.device, int]:
    return storage.device, storage.data_ptr()
