"""What full and freeze tuning share: the delta is the base model's own weights.

Nothing is added to the forward pass. A :class:`TrainedWeights` module, attached to the model
beside its layers, *names* the base parameters an adapter trains, so the wrapper, the training
loop and saving treat these methods like any other: ``adapter_parameters`` is where the trainer
looks, whether the tensors are new (LoRA) or the model's own (here).

The change is in place: there is no base model left to switch back to, so these methods
declare ``reversible=False`` and ``disabled()`` refuses with one sentence. What training writes
is the method's ``artifact``: a whole model folder (``"model"``, loadable by ``from_pretrained``)
for full fine-tuning; freeze tuning overrides it with ``"adapter"`` — only the trained tensors,
under their own state-dict keys, which ``load_adapter`` copies onto a fresh base (the module's
``peft_key_prefix`` is the root and ``peft_state`` is the identity).
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.protocol import Capabilities, DeltaModule, Method, check_shapes


class WeightTrainingMethod(Method):
    """What full and freeze tuning declare alike: a model folder, changed in place."""

    artifact: ClassVar[str] = "model"

    def capabilities(self) -> Capabilities:
        return Capabilities(reversible=False, mergeable=True)  # merged from the start: nothing to fold

    def trained_paths(self, model: nn.Module) -> list[str]:
        """The paths (``model.named_parameters()`` keys) of the weights that train."""
        raise NotImplementedError

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        TrainedWeights.attached_to(model).add_adapter(adapter_name, self.trained_paths(model))
        return [TrainedWeights.attribute]

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "deltatune_peft_incompatible": "peft has no format for a whole "
                "fine-tuned model; load the folder with from_pretrained"}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> Method:
        raise DeltatuneError(f"A {cls.cli_name} run writes a model folder; load it with from_pretrained, "
                             "not as an adapter.")


class TrainedWeights(DeltaModule):
    """Names, per adapter, the base model parameters that train (by their path in the model)."""

    attribute = "deltatune_trained_weights"
    peft_key_prefix = ""  # the model's own state-dict keys, at the root

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "host", host)  # not a submodule: the host holds us, not the reverse
        self.paths: dict[str, list[str]] = {}

    @classmethod
    def attached_to(cls, model: nn.Module) -> "TrainedWeights":
        existing = getattr(model, cls.attribute, None)
        if existing is not None:
            raise DeltatuneError("This model already trains its own weights for another adapter; full and freeze "
                                 "tuning take one adapter per model.")
        module = cls(model)
        model.add_module(cls.attribute, module)
        return module

    def add_adapter(self, name: str, paths: Iterable[str]) -> None:
        self.paths[name] = list(paths)
        self.active_adapters = self.active_adapters or (name,)

    def adapter_names(self) -> list[str]:
        return list(self.paths)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        own = dict(self.host.named_parameters(remove_duplicate=False))  # a tied head is found by its own path too
        return {path: own[path] for path in self.paths[name]}

    def peft_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tensors)

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        params = self.adapter_parameters(name)
        check_shapes(where, {k: p.shape for k, p in params.items()}, state)
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(state[key])

    def delete_adapter(self, name: str) -> None:
        del self.paths[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def merge(self, names: Iterable[str]) -> None:
        pass  # trained in place: always merged

    def unload(self) -> None:
        return None  # nothing to put back; the module leaves the model

    def forward(self, *args, **kwargs):  # pragma: no cover - never called: it only names parameters
        raise DeltatuneError("TrainedWeights is not a layer; call the model instead.")


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(path, stack) of the model's transformer layer stacks: ModuleLists of at least two blocks
    of one class (Llama's ``model.layers``, GPT-2's ``transformer.h``, BART's encoder and decoder)."""
    stacks = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            if not any(path.startswith(outer + ".") for outer, _ in stacks):
                stacks.append((path, module))
    return stacks
