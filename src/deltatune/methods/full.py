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

from deltatune.errors import DeltatuneError
from deltatune.methods.base_training import TrainedWeights
from deltatune.methods.protocol import Capabilities, Method


@dataclass(frozen=True)
class FullFineTuning(Method):
    """Every parameter of the model trains; nothing is added."""

    peft_type: ClassVar[str] = "FULL"  # deltatune's own: peft has no such adapter type
    cli_name: ClassVar[str] = "full"
    artifact: ClassVar[str] = "model"
    training_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 2e-5, "weight_decay": 0.0}

    def capabilities(self) -> Capabilities:
        return Capabilities(reversible=False, mergeable=True)

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        paths = [path for path, _ in model.named_parameters()]
        TrainedWeights.attached_to(model).add_adapter(adapter_name, paths)
        return [TrainedWeights.attribute]

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "deltatune_peft_incompatible": "peft has no format for a whole fine-tuned "
                "model; load the folder with from_pretrained"}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "FullFineTuning":
        raise DeltatuneError("A full fine-tuning run writes a model folder; load it with from_pretrained, "
                             "not as an adapter.")
