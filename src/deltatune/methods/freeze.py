"""Freeze tuning: the last few transformer layers train, everything below them stays frozen.

    layers 0 … L−k−1 frozen,   layers L−k … L−1 trained in full   (k = ``trainable_layers``)

The layers nearest the output adapt the most to a new task, so training only them keeps most of
full fine-tuning's quality at a fraction of its gradient and optimizer memory. ``modules`` adds
named modules (``lm_head``, ``norm``, a classifier); ``trainable_layers=-k`` takes the *first* k
layers instead. Every layer stack is counted separately (BART: the last k of the encoder and of
the decoder).

Nothing below the first trained layer needs a gradient: the embeddings are frozen and no input
requires grad, so autograd records no graph there and the backward pass stops at that layer.

What it saves is only what trained (``artifact = "adapter"``, docs/freeze.md): a deltatune
adapter folder whose ``adapter_model.safetensors`` holds the trained tensors under their own
state-dict keys (``model.layers.5.mlp.down_proj.weight``) and whose ``adapter_config.json``
holds the selection (``peft_type: FREEZE``, ``trainable_layers``, ``modules`` and the resolved
``trained_modules``). ``load_adapter(base, folder)`` copies the tensors onto the base;
``deltatune merge`` writes the whole model. peft has no such adapter type.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base_training import WeightTrainingMethod, layer_stacks
from deltatune.methods.trained_copy import trained_modules
from deltatune.targets import is_match
from deltatune.validation import require_names, require_regex

PEFT_INCOMPATIBLE = ("peft has no freeze-tuning adapter type; load the folder with deltatune.load_adapter(base, "
                     "folder), or write a whole model with deltatune merge")
CONFIG_KEYS = ("peft_type", "trainable_layers", "modules", "trained_modules", "task_type", "base_model_name_or_path",
               "inference_mode", "deltatune_peft_incompatible")


@dataclass(frozen=True)
class FreezeTuning(WeightTrainingMethod):
    """The last ``trainable_layers`` layers of each stack train (the first ones when negative), plus ``modules``."""

    trainable_layers: int = 2
    modules: tuple[str, ...] | str = ()  # names (suffix match, as LoRA's targets) or one regex over the whole path

    peft_type: ClassVar[str] = "FREEZE"  # deltatune's own: peft has no such adapter type
    cli_name: ClassVar[str] = "freeze"
    artifact: ClassVar[str] = "adapter"  # only the trained tensors, keyed as in the base model
    training_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 3e-4}  # see README: learning rates

    def __post_init__(self) -> None:
        if isinstance(self.modules, str):  # one regex over the whole path
            require_regex("modules", self.modules)
        else:
            object.__setattr__(self, "modules", require_names("modules", self.modules or ()))
        if isinstance(self.trainable_layers, bool) or not isinstance(self.trainable_layers, int):
            raise DeltatuneError(f"trainable_layers must be a whole number, got {self.trainable_layers!r}: fix the config")
        if self.trainable_layers == 0 and not self.modules:
            raise DeltatuneError("trainable_layers=0 with no modules trains nothing; set trainable_layers to the "
                                 "number of last layers to train, e.g. 2.")

    def trained_module_paths(self, model: nn.Module) -> list[str]:
        """The selection: the chosen layers of every stack, then the named modules (outermost paths)."""
        stacks = layer_stacks(model)
        if self.trainable_layers and not stacks:
            raise DeltatuneError(f"Freeze tuning finds no stack of transformer layers in {type(model).__name__}; "
                                 "name what trains with modules=[...] and trainable_layers=0.")
        count = abs(self.trainable_layers)
        paths = []
        for path, stack in stacks:
            chosen = range(len(stack))[-count:] if self.trainable_layers > 0 else range(len(stack))[:count]
            paths += [f"{path}.{index}" for index in chosen]
        named = self.modules or trained_modules(model, ())  # a classifier's fresh head trains by default
        module_paths = [p for p, _ in model.named_modules() if p and is_match(p, named)] if named else []
        if self.modules and not module_paths:
            raise DeltatuneError(f"modules {self.modules!r} match no module of this model; pass names as a list, e.g. "
                                 "modules=[norm,lm_head], or a regex over the whole module path, e.g. '.*\\.mlp'.")
        paths += module_paths
        return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]

    def trained_paths(self, model: nn.Module) -> list[str]:
        prefixes = [f"{path}." for path in self.trained_module_paths(model)]
        chosen: dict[int, str] = {}  # one path per tensor: a tied head named in modules trains under its own path
        for path, param in model.named_parameters(remove_duplicate=False):
            if any(path.startswith(p) for p in prefixes):
                chosen.setdefault(id(param), path)
        return list(chosen.values())

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        modules = self.modules if isinstance(self.modules, str) else list(self.modules)
        return {"peft_type": self.peft_type, "trainable_layers": self.trainable_layers, "modules": modules,
                "trained_modules": self.trained_module_paths(model), "deltatune_peft_incompatible": PEFT_INCOMPATIBLE}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "FreezeTuning":
        unknown = sorted(k for k in config if k not in CONFIG_KEYS)
        if unknown:
            warnings.warn(f"adapter_config.json keys not used by deltatune were ignored: {', '.join(unknown)}", stacklevel=2)
        if "trainable_layers" not in config:
            raise DeltatuneError("This FREEZE adapter_config.json has no trainable_layers; the folder is incomplete, "
                                 "save it again with deltatune.")
        modules = config.get("modules") or ()
        return cls(trainable_layers=config["trainable_layers"], modules=modules if isinstance(modules, str) else tuple(modules))
