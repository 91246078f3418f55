"""Full fine-tuning: every weight of the model trains.

    W ← W − η·AdamW(∇W L)   for every parameter W of the model

The reference point for every other method: the most memory (weights, gradients and two AdamW
moments for every parameter) and usually the best quality per step. It shares the loop with
the delta methods — only ``requires_grad`` differs — and writes a whole model folder. Its
learning rate is an order of magnitude below LoRA's (``training_defaults``): every weight moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from deltatune.methods.base_training import WeightTrainingMethod


@dataclass(frozen=True)
class FullFineTuning(WeightTrainingMethod):
    """Every parameter of the model trains; nothing is added."""

    peft_type: ClassVar[str] = "FULL"  # deltatune's own: peft has no such adapter type
    cli_name: ClassVar[str] = "full"
    training_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 2e-5, "weight_decay": 0.0}

    def trained_paths(self, model: nn.Module) -> list[str]:
        return [path for path, _ in model.named_parameters()]
