"""Which modules of a model a method touches: names, a regex, "all-linear", or the defaults.

Matching follows peft so its adapter_config.json means the same here:
- a list of names matches a module whose path equals a name or ends with ``"." + name``;
- a single string other than ``"all-linear"`` is a regular expression, full-matched on the path;
- ``"all-linear"`` is every linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) except the output head;
- ``None`` takes the per-architecture defaults below (the attention projections, as in the
  LoRA paper).
"""

from __future__ import annotations

import re
from typing import Iterator, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.errors import DeltatuneError
from deltatune.methods.protocol import DeltaModule

Targets = str | Sequence[str] | None

ALL_LINEAR = "all-linear"

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "bloom": ("query_key_value",),
    "falcon": ("query_key_value",),
    "chatglm": ("query_key_value",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "bart": ("q_proj", "v_proj"),
    "mbart": ("q_proj", "v_proj"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
}

LINEAR_TYPES = (nn.Linear, Conv1D)


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def resolve_targets(targets: Targets, model: nn.Module) -> Targets:
    """Replace ``None`` by the model's default targets, or say how to choose some."""
    if targets is not None:
        return targets
    kind = model_type(model)
    if kind in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[kind]
    raise DeltatuneError(
        f"There are no default targets for model type {kind!r}; pass targets='all-linear' "
        "or a list of module names."
    )


def is_match(path: str, targets: Targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == name or path.endswith("." + name) for name in targets or ())


def find_targets(model: nn.Module, targets: Targets, supported: tuple[type, ...]) -> list[str]:
    """Module paths selected by ``targets``; an error that lists the real names if none is."""
    targets = resolve_targets(targets, model)
    modules = dict(plain_modules(model))
    if targets == ALL_LINEAR:
        head = output_head(model)
        found = [p for p, m in modules.items() if isinstance(m, LINEAR_TYPES) and m is not head]
    else:
        found = [p for p in modules if p and is_match(p, targets)]
        unsupported = [p for p in found if not isinstance(modules[p], supported)]
        if unsupported:
            kind = type(modules[unsupported[0]]).__name__
            raise DeltatuneError(
                f"Target '{unsupported[0]}' is a {kind}, which this method cannot wrap; "
                f"choose modules of type {', '.join(t.__name__ for t in supported)}."
            )
    if not found:
        raise DeltatuneError(
            f"Targets {targets!r} match no module of this model; its layer names are: "
            f"{', '.join(leaf_names(model))}."
        )
    return found


def plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) pairs as if no method had wrapped anything: a wrapper stands for its base layer."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, DeltaModule):
            inside.append(path + ".")
            module = getattr(module, "base_layer", module)
        yield path, module


def leaf_names(model: nn.Module) -> list[str]:
    """The distinct last path components of the model's leaf modules, in model order."""
    names: dict[str, None] = {}
    for path, module in model.named_modules():
        if path and next(module.children(), None) is None:
            names.setdefault(path.rsplit(".", 1)[-1], None)
    return list(names)


def target_names_for_config(model: nn.Module, paths: list[str]) -> list[str]:
    """The short names to write as peft's ``target_modules`` (sorted, distinct)."""
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def pattern_value(path: str, patterns: dict[str, float], default: float) -> float:
    """peft's rank_pattern/alpha_pattern lookup: the first key matching the end of the path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", path):
            return value
    return default
