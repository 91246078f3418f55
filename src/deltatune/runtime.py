"""Where one training process runs, and how it talks to the others: the loop's only seam.

The training loop is one loop for every method and every topology. What differs between a
laptop, one GPU and several processes under torchrun is held here, in a small object the loop
asks at a few fixed points:

    device                    where the batches go
    rank, world_size          which process this is, of how many
    is_main                   whether this process writes files, logs and the progress bar
    place(model)              put the model on the device (DDP wraps it, FSDP2 shards it); the device
    replica(model)            the module a training step calls (the model, or PyTorch's DDP wrapper)
    shard(indices)            this process's share of a micro-batch's example indices
    all_sum(value)            a number summed over every process (token counts, losses)
    gradient_divisor          how many replicas a gradient is averaged over (DDP divides by it)
    accumulating(model, last) context for a micro-batch; a replica skips its gradient sync until the last
    release(model)            after forwards without a backward (evaluation): FSDP2 shards the gathered weights again
    gather(parameters)        full tensors of the trainable parameters, for checkpoints and saving
    whole(model)              context in which the model's parameters are whole tensors (for writing it)
    optimizer_state(opt)      the optimizer's state with whole tensors: one file for any world size
    load_optimizer_state      and back, onto this process's layout
    distribute(params, full)  full tensors laid out like ``params`` (a shard each, under FSDP2)
    sharded_checkpoints       whether each process writes its own shards of the trainer's state into a
                              checkpoint (FSDP2; ``deltatune.sharded_state``) instead of whole tensors
    broadcast(value)          the main process's ``value``, on every process
    gather_objects(value)     every process's ``value``, in rank order
    meeting(what)             context that turns a lost partner process into one sentence about ``what``
    barrier()                 wait for every process

``Runtime()`` is the single-process default: it changes nothing. Distributed training
subclasses it (DDP, FSDP2; ``deltatune.distributed``) and the loop stays the same loop. Every
process calls every method in the same order: the collective ones (``all_sum``, ``gather``,
``whole``, ``optimizer_state``, ``broadcast``, ``gather_objects``, ``barrier``) are where the
processes meet.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn


@dataclass
class Runtime:
    """A single process on one device (the default)."""

    device: torch.device | None = None  # None: wherever the model's parameters are
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    sharded_checkpoints = False

    @property
    def gradient_divisor(self) -> int:
        return 1

    def place(self, model: nn.Module) -> torch.device:
        """The device batches go to; a runtime without one takes the model's."""
        if self.device is None:
            self.device = next(model.parameters()).device
        return self.device

    def replica(self, model: nn.Module) -> nn.Module:
        return model

    def shard(self, indices: Sequence[int]) -> Sequence[int]:
        return indices

    def all_sum(self, value: float) -> float:
        return value

    def accumulating(self, model: nn.Module, last: bool) -> AbstractContextManager:
        return nullcontext()

    def release(self, model: nn.Module) -> None:
        pass

    def gather(self, parameters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: p.detach().contiguous().clone() for name, p in parameters.items()}

    def whole(self, model: nn.Module) -> AbstractContextManager:
        return nullcontext()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def distribute(self, parameters: Mapping[str, torch.Tensor],
                   full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(full)

    def broadcast(self, value: Any) -> Any:
        return value

    def gather_objects(self, value: Any) -> list[Any]:
        return [value]

    def meeting(self, what: str) -> AbstractContextManager:
        return nullcontext()

    def barrier(self) -> None:
        pass
