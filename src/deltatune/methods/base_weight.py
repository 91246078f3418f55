"""How a delta reads and writes the frozen layer it adapts: one seam for every storage.

LoRA's merge, unmerge and PiSSA's residual change a base weight. They never touch
``layer.weight`` directly; they go through :func:`read_weight` / :class:`WeightStore`, and the
sizes come from the layer's attributes (:func:`layer_sizes`), never from ``weight.shape`` —
a 4-bit weight is a packed buffer whose shape says nothing about the layer. A new storage
(NF4 for QLoRA) is one more :class:`WeightBackend` in ``BACKENDS``, not a new layer family.

A write replaces the weight by a new parameter when the old one must survive — a weight tied
to another module (embeddings and output head) or a storage that cannot be written in place
(quantised) — and keeps the original, so that undoing every change gives back the very same
tensor: bit-exact, ties kept. A plain untied weight is written in place (no second copy).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.errors import DeltatuneError


def layer_sizes(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer, read from its attributes."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    if isinstance(layer, Conv1D):  # GPT-2: weight is (in × out), y = x W + b
        return layer.nx, layer.nf
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    raise DeltatuneError(f"Cannot read the input and output sizes of {type(layer).__name__}; "
                         "LoRA supports nn.Linear, GPT-2's Conv1D and nn.Embedding.")


def stored_transposed(layer: nn.Module) -> bool:
    """True when the weight is stored (in × out): GPT-2's Conv1D and embedding tables."""
    return isinstance(layer, (Conv1D, nn.Embedding))


class WeightBackend(Protocol):
    """One kind of weight storage: how to see it as a dense tensor and how to store one."""

    writes_in_place: bool

    def handles(self, weight: torch.Tensor) -> bool: ...

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as an ordinary tensor in the layer's own layout (any float dtype)."""

    def stored(self, like: nn.Parameter, dense: torch.Tensor) -> nn.Parameter:
        """A new frozen parameter holding ``dense`` in ``like``'s storage kind and dtype."""


class DenseBackend:
    """Ordinary float weights (fp32, bf16, fp16)."""

    writes_in_place = True

    def handles(self, weight: torch.Tensor) -> bool:
        return type(weight) in (torch.Tensor, nn.Parameter)

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach()

    def stored(self, like: nn.Parameter, dense: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(dense.to(like.dtype), requires_grad=False)


BACKENDS: list[WeightBackend] = [DenseBackend()]


def backend_of(weight: torch.Tensor) -> WeightBackend:
    for backend in reversed(BACKENDS):  # later registrations (quantised storages) are more specific
        if backend.handles(weight):
            return backend
    raise DeltatuneError(f"deltatune cannot read a base weight stored as {type(weight).__name__}; "
                         "load the base model in a float dtype or as NF4.")


def read_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense tensor, in its own layout."""
    return backend_of(layer.weight).dense(layer.weight)


class WeightStore:
    """Writes one layer's weight (and bias) and can put back the originals it replaced."""

    def __init__(self, layer: nn.Module, shared: bool) -> None:
        self.layer = layer
        self.shared = shared  # tied to another module: never written in place
        self.original_weight: nn.Parameter | None = None
        self.original_bias: nn.Parameter | None = None

    def write_weight(self, dense: torch.Tensor) -> None:
        """Set the weight to ``dense`` (own layout, any float dtype); rounds once to the weight's dtype."""
        weight = self.layer.weight
        backend = backend_of(weight)
        if backend.writes_in_place and not self.shared:
            with torch.no_grad():
                weight.copy_(dense)
            return
        if self.original_weight is None:
            self.original_weight = weight
        self.layer.weight = backend.stored(weight, dense)

    def write_bias(self, bias: torch.Tensor) -> None:
        if self.original_bias is None:
            self.original_bias = self.layer.bias
        self.layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def restore_bias(self) -> None:
        if self.original_bias is not None:
            self.layer.bias, self.original_bias = self.original_bias, None

    def restore_weight(self) -> bool:
        """Put the original weight back when one was kept; False when the weight was written in place."""
        if self.original_weight is None:
            return False
        self.layer.weight, self.original_weight = self.original_weight, None
        return True
