"""The method registry: one dict literal, CLI name → config class."""

from __future__ import annotations

from typing import Any

from deltatune.errors import DeltatuneError
from deltatune.methods.bottleneck import Adapter
from deltatune.methods.freeze import FreezeTuning
from deltatune.methods.full import FullFineTuning
from deltatune.methods.lora import LoRA
from deltatune.methods.p_tuning import PTuning
from deltatune.methods.p_tuning_v2 import PTuningV2
from deltatune.methods.prefix_tuning import PrefixTuning
from deltatune.methods.prompt_tuning import PromptTuning
from deltatune.methods.protocol import DeltaModule, Method
from deltatune.methods.qlora import QLoRA

METHODS: dict[str, type] = {
    "lora": LoRA,
    "qlora": QLoRA,
    "prompt": PromptTuning,
    "ptuning": PTuning,
    "prefix": PrefixTuning,
    "ptuning-v2": PTuningV2,
    "full": FullFineTuning,
    "freeze": FreezeTuning,
    "adapter": Adapter,
}


def method_class(cli_name: str) -> type:
    if cli_name not in METHODS:
        raise DeltatuneError(f"Unknown method {cli_name!r}; choose one of: {', '.join(METHODS)}.")
    return METHODS[cli_name]


def method_from_peft_config(config: dict[str, Any]) -> Method:
    """The method a config describes: the deltatune method it names (``deltatune_method``, for
    methods that share a peft type, as QLoRA shares LoRA's), else the one of its peft type."""
    if config.get("deltatune_method") in METHODS:
        return METHODS[config["deltatune_method"]].from_peft_config(config)
    peft_type = config.get("peft_type")
    for cls in METHODS.values():
        if cls.peft_type == peft_type:
            return cls.from_peft_config(config)
    known = ", ".join(dict.fromkeys(cls.peft_type for cls in METHODS.values()))
    raise DeltatuneError(f"adapter_config.json has peft_type {peft_type!r}, which deltatune cannot load; it reads {known}.")


__all__ = ["METHODS", "Adapter", "DeltaModule", "FreezeTuning", "FullFineTuning", "LoRA", "Method", "PTuning", "PTuningV2", "PrefixTuning", "PromptTuning", "QLoRA", "method_class", "method_from_peft_config"]
