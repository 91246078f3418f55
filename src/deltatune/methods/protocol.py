"""The protocol every tuning method speaks, and nothing more.

A *method* is a flat, frozen dataclass (its hyper-parameters) that can put itself into any
``torch.nn.Module``. Everything it puts there is a :class:`DeltaModule`: a module that owns
its parameters structurally (they live on it, keyed by adapter name), can hand them out in
the peft on-disk layout, and can be switched off. The wrapper, the trainer, saving and the
CLI speak only this protocol; none of them ever asks which method it is talking to.

    Method.inject(model, adapter_name)        put the delta into the model
    Method.peft_config(model) / from_peft_config(config)   adapter_config.json both ways
    DeltaModule.adapter_parameters(name)      the parameters that belong to one adapter
    DeltaModule.adapter_state(name)           tensors in peft's key layout (local part)
    DeltaModule.load_adapter_state(name, sd)  the inverse, with shape checks
    DeltaModule.set_active(names)             () disables; several names stack
    DeltaModule.merge(names) / unmerge()      fold into the base weight, where possible
    DeltaModule.unload()                      the plain module to put back in its place
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from deltatune.errors import DeltatuneError


@runtime_checkable
class Method(Protocol):
    """A tuning method's configuration; see the module docstring."""

    peft_type: ClassVar[str]

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        """Add adapter ``adapter_name`` to ``model`` in place; return the module paths touched."""

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        """The adapter_config.json written beside the adapter's tensors."""

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "Method":
        """Rebuild the method from an adapter_config.json (unknown keys: warn and ignore)."""


class DeltaModule(nn.Module):
    """Base class of every module a method adds to a model.

    Subclasses keep each adapter's parameters in containers keyed by adapter name, so
    ``adapter_parameters(name)`` is a lookup, never a search by substring.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: tuple[str, ...] = ()
        # Set by the wrapper for one forward call: the adapter of each example in the batch.
        self.batch_adapter_names: Sequence[str] | None = None

    # --- what every method must provide -------------------------------------------------
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def unload(self) -> nn.Module:
        raise NotImplementedError

    # --- defaults that fit most methods -------------------------------------------------
    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = tuple(n for n in names if n in self.adapter_names())

    def merge(self, names: Iterable[str]) -> None:
        raise DeltatuneError(
            f"{type(self).__name__} cannot be merged into the base weights; "
            "keep the adapter loaded for inference instead."
        )

    def unmerge(self) -> None:
        pass

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        return ()


def check_shapes(where: str, expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> None:
    """Raise one clear sentence if ``state`` lacks a tensor or holds one of the wrong shape."""
    for key, shape in expected.items():
        if key not in state:
            raise DeltatuneError(f"The adapter has no tensor '{where}.{key}'; the file is incomplete or was made for another method.")
        if tuple(state[key].shape) != tuple(shape):
            raise DeltatuneError(
                f"Adapter tensor '{where}.{key}' has shape {tuple(state[key].shape)} but the base model needs "
                f"{tuple(shape)}; the adapter was made for another model — load it on the base model it was trained on."
            )
