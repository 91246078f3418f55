"""P-Tuning v2 (Liu et al., 2022, arXiv 2110.07602): deep prompts at every layer.

The same mechanism as prefix tuning — trainable keys and values for ``num_virtual_tokens``
positions at every layer — with the paper's choices: no reparameterisation by default (the
table itself trains) and long prompts (64–128 for hard tasks). peft stores it as
PREFIX_TUNING with ``prefix_projection: false``; decoder-only adapters (and encoder–decoder ones
with only the decoder-side prefix) load there unchanged. On encoders (BERT/RoBERTa
classification, the paper's main setup) the task head trains too; see prefix_tuning.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from deltatune.methods.prefix_tuning import PrefixTuning


@dataclass(frozen=True)
class PTuningV2(PrefixTuning):
    """Deep prompts: ``num_virtual_tokens`` keys and values per layer, trained directly."""

    num_virtual_tokens: int = 64
    projection: bool = False

    cli_name: ClassVar[str] = "ptuning-v2"
    training_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 2e-2}  # ChatGLM's P-Tuning v2 recipe
