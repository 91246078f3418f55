"""Freeze tuning: the last few transformer layers train, everything below them stays frozen.

    layers 0 … L−k−1 frozen,   layers L−k … L−1 trained in full   (k = ``trainable_layers``)

The layers nearest the output adapt the most to a new task, so training only them keeps most of
full fine-tuning's quality at a fraction of its gradient and optimizer memory. ``modules`` adds
named modules (``lm_head``, ``norm``, a classifier); ``trainable_layers=-k`` takes the *first* k
layers instead. Every layer stack is counted separately (BART: the last k of the encoder and of
the decoder). Like full fine-tuning it writes a whole model folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base_training import WeightTrainingMethod, layer_stacks
from deltatune.methods.trained_copy import trained_modules
from deltatune.targets import is_match


@dataclass(frozen=True)
class FreezeTuning(WeightTrainingMethod):
    """The last ``trainable_layers`` layers of each stack train (the first ones when negative), plus ``modules``."""

    trainable_layers: int = 2
    modules: tuple[str, ...] = ()

    peft_type: ClassVar[str] = "FREEZE"  # deltatune's own: peft has no such adapter type
    cli_name: ClassVar[str] = "freeze"
    training_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 5e-5}

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", tuple(self.modules or ()))
        if isinstance(self.trainable_layers, bool) or not isinstance(self.trainable_layers, int):
            raise DeltatuneError(f"trainable_layers must be a whole number, got {self.trainable_layers!r}: fix the config")
        if self.trainable_layers == 0 and not self.modules:
            raise DeltatuneError("trainable_layers=0 with no modules trains nothing; set trainable_layers to the "
                                 "number of last layers to train, e.g. 2.")

    def trained_paths(self, model: nn.Module) -> list[str]:
        stacks = layer_stacks(model)
        if self.trainable_layers and not stacks:
            raise DeltatuneError(f"Freeze tuning finds no stack of transformer layers in {type(model).__name__}; "
                                 "name what trains with modules=[...] and trainable_layers=0.")
        count = abs(self.trainable_layers)
        prefixes = []
        for path, stack in stacks:
            chosen = range(len(stack))[-count:] if self.trainable_layers > 0 else range(len(stack))[:count]
            prefixes += [f"{path}.{index}." for index in chosen]
        named = self.modules or trained_modules(model, ())  # a classifier's fresh head trains by default
        module_paths = [p for p, _ in model.named_modules() if p and is_match(p, named)] if named else []
        if self.modules and not module_paths:
            raise DeltatuneError(f"modules {list(self.modules)!r} match no module of this model.")
        prefixes += [f"{path}." for path in module_paths]
        return [path for path, _ in model.named_parameters() if any(path.startswith(p) for p in prefixes)]
