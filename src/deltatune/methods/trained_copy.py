"""modules_to_save: a whole module (say a fresh classification head) trained in full.

Each adapter gets its own copy of the module; the original stays as the base behaviour, so
``disabled()`` and switching adapters work as for any other delta. Saved in peft's layout,
under the module's own path (``base_model.model.score.weight``).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.protocol import DeltaModule, check_shapes
from deltatune.targets import is_match, plain_modules


class TrainedCopy(DeltaModule):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.copies = nn.ModuleDict()
        self._merged: list[str] = []

    def add_adapter(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.base_layer)
        self.active_adapters = self.active_adapters or (name,)

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.copies[name].named_parameters())

    def peft_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {k: v.detach() for k, v in self.copies[name].state_dict().items()}  # buffers too
        state.update(tensors)
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        own = self.copies[name].state_dict()
        check_shapes(where, {k: v.shape for k, v in own.items()}, state)
        self.copies[name].load_state_dict({k: state[k] for k in own})

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def merge(self, names: Iterable[str]) -> None:
        names = [n for n in names if n in self.copies]
        if len(names) > 1:
            raise DeltatuneError("Two adapters each train their own copy of the same module; merge only one of them.")
        self._merged = names

    def unmerge(self) -> None:
        self._merged = []

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        return tuple(self._merged)

    def unload(self) -> nn.Module:
        merged = self.merged_adapters
        return self.copies[merged[0]] if merged else self.base_layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapter_names is not None:
            return self._forward_per_example(*args, **kwargs)
        names = self.merged_adapters or self.active_adapters
        module = self.copies[names[-1]] if names else self.base_layer
        return module(*args, **kwargs)

    def _forward_per_example(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Rows of the batch go through their own adapter's copy (the original for "__base__")."""
        out = None
        for name, rows in self.rows_per_adapter(x.shape[0], x.device).items():
            part = (self.copies[name] if name in self.copies else self.base_layer)(x[rows], *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[rows] = part
        return out


CLASSIFICATION_HEADS = ("classifier", "score", "classification_head")


def trained_modules(model: nn.Module, modules_to_save: Sequence[str]) -> tuple[str, ...]:
    """What trains in full: ``modules_to_save``, or else a classifier's freshly initialised head
    (``classifier``, ``score`` or ``classification_head``), as peft does for SEQ_CLS."""
    if modules_to_save:
        return tuple(modules_to_save)
    if type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return tuple(name for name in CLASSIFICATION_HEADS if isinstance(getattr(model, name, None), nn.Module))
    return ()


def inject_trained_copies(model: nn.Module, names: Sequence[str], adapter_name: str) -> list[str]:
    """Give adapter ``adapter_name`` its own trained copy of each module matched by ``names``."""
    if not names:
        return []
    paths = [p for p, _ in plain_modules(model) if p and is_match(p, names)]
    paths = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]  # outermost match only
    if not paths:
        raise DeltatuneError(f"modules_to_save {list(names)!r} match no module of this model.")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, DeltaModule) and not isinstance(module, TrainedCopy):
            raise DeltatuneError(f"Module '{path}' is both adapted and in modules_to_save; remove it from one of them.")
        if not isinstance(module, TrainedCopy):
            model.set_submodule(path, TrainedCopy(module))
        model.get_submodule(path).add_adapter(adapter_name)
    return paths
