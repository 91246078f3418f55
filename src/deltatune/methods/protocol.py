"""The protocol every tuning method speaks, and nothing more.

A *method* is a flat, frozen dataclass (its hyper-parameters) deriving from :class:`Method`.
It can put itself into any ``torch.nn.Module``; everything it puts there is a
:class:`DeltaModule`: a module that owns its parameters structurally (they live on it, or it
names the base parameters it trains, keyed by adapter name), can hand them out in the peft
on-disk layout, and can be switched off. The wrapper, the trainer, saving and the CLI speak
only this protocol; none of them ever asks which method it is talking to.

    Method.inject(model, adapter_name)         put the delta into the model
    Method.peft_config(model) / from_peft_config(config)   adapter_config.json both ways
    Method.capabilities()                      which invariants it honours (see Capabilities)
    Method.artifact                            what training writes: "adapter" or "model"
    Method.peft_module_root                    where module tensors sit in peft's file
    Method.training_defaults                   training settings the method ships (below the user's)
    Method.encode_prompt(tokenizer, text)      how a prompt becomes ids (templates place slots)
    Method.peft_incompatibility(model)         why peft cannot load the adapter, or None
    Method.prepare_base(model)                 the base as the method runs it (QLoRA: NF4 weights)
    Method.reference_method()                  the same adapter on the base as loaded (QLoRA → LoRA)
    Method.describe()                          the settings, as plain data

    DeltaModule.adapter_parameters(name)       the parameters that belong to one adapter
    DeltaModule.peft_state(name, tensors)      those tensors (live or gathered) in peft's layout
    DeltaModule.adapter_state(name)            peft_state of the live parameters
    DeltaModule.load_adapter_state(name, sd)   the inverse, with shape checks
    DeltaModule.set_active(names)              () disables; several names stack
    DeltaModule.composition_conflict(names)    why these adapters cannot run here at once, or None
    DeltaModule.merge(names) / unmerge()       fold into the base weight, where possible
    DeltaModule.unload()                       the plain module to put back in its place
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import nn

from deltatune.data import encode_prompt
from deltatune.errors import DeltatuneError
from deltatune.plain_data import plain_data

ARTIFACTS = ("adapter", "model")  # a peft adapter folder, or a whole transformers model folder


@dataclass(frozen=True)
class Capabilities:
    """What a method promises; the contract suite checks each promise, or the refusal instead.

    equals_base_at_init   the wrapped model's outputs equal the base model's before training
    reversible            ``disabled()`` gives the base model exactly; when False it refuses
                          with one sentence instead (the base weights were changed in place)
    mergeable             folds into the base weights: merged = unmerged = unloaded outputs
    per_example_adapters  ``adapter_names=[...]`` picks an adapter per example of one batch
    exact_reload          a saved folder loads back to bit-identical outputs (PiSSA's is rewritten
                          as a plain LoRA on the original weight: equal up to fp32 rounding)
    rewrites_call         it changes the model's call itself (virtual tokens before the input, a
                          key/value prefix through the cache), so it expects the call as the user
                          made it: at most one such adapter can be active at a time

    Composition (several adapters active at once, ``DeltaModel.set_adapter([a, b])``) follows from
    these: an adapter that is not ``reversible`` changed the base weights the others are relative
    to, so it runs alone; at most one active adapter ``rewrites_call``; and each DeltaModule says
    whether it can run the chosen adapters together (``DeltaModule.composition_conflict``).
    """

    equals_base_at_init: bool = True
    reversible: bool = True
    mergeable: bool = False
    per_example_adapters: bool = False
    exact_reload: bool = True
    rewrites_call: bool = False


class Method:
    """Base of every method's config dataclass: the protocol, with defaults that fit most."""

    peft_type: ClassVar[str]
    cli_name: ClassVar[str]
    artifact: ClassVar[str] = "adapter"
    peft_module_root: ClassVar[str] = "base_model.model."  # the peft key of the model's root module
    training_defaults: ClassVar[Mapping[str, Any]] = {}  # train settings this method needs (full FT: a lower lr)

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        """Add adapter ``adapter_name`` to ``model`` in place; return the module paths touched."""
        raise NotImplementedError

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        """The adapter_config.json written beside the adapter's tensors."""
        raise NotImplementedError

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "Method":
        """Rebuild the method from an adapter_config.json (unknown keys: warn and ignore)."""
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def encode_prompt(self, tokenizer: Any, text: str) -> list[int]:
        """[BOS] + the prompt's tokens; methods that place virtual tokens in the text override it."""
        return encode_prompt(tokenizer, text)

    def peft_incompatibility(self, model: nn.Module) -> str | None:
        """Why peft cannot load what this method saves for ``model``; None when it can."""
        return self.peft_config(model).get("deltatune_peft_incompatible")

    def prepare_base(self, model: nn.Module) -> nn.Module:
        """Change how the base model is stored, in place, and return it: the model as it is for
        most methods; QLoRA quantises its target layers to NF4. ``inject`` calls it first, and
        the promises about "the base" (equal at init, ``disabled()``) are about this prepared base.
        Idempotent: a second adapter with the same settings finds the base prepared."""
        return model

    def reference_method(self) -> "Method":
        """The method that runs the same saved adapter on the base exactly as loaded: itself,
        unless ``prepare_base`` changes the base (QLoRA: the same LoRA on the full-precision
        weights). A merge report compares against it too, to show what the preparation costs."""
        return self

    def describe(self) -> dict[str, Any]:
        """Every setting as plain data (JSON/YAML ready); ``type(self)(**describe())`` rebuilds it."""
        return plain_data({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


class DeltaModule(nn.Module):
    """Base class of every module a method adds to a model.

    Subclasses keep each adapter's parameters in containers keyed by adapter name, so
    ``adapter_parameters(name)`` is a lookup, never a search by substring.
    """

    peft_key_prefix: ClassVar[str | None] = None  # None: tensors sit under the module's path; "": at the root

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: tuple[str, ...] = ()
        # Set by the wrapper for one forward call: the adapter of each example in the batch.
        self.batch_adapter_names: Sequence[str] | None = None

    # --- what every method must provide -------------------------------------------------
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def peft_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's tensors for adapter ``name`` computed from ``tensors``, which holds a value for
        every key of ``adapter_parameters(name)``: the live parameters, or a gathered copy of them
        (sharded training saves from a state dict, not from the module)."""
        raise NotImplementedError

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def unload(self) -> nn.Module | None:
        raise NotImplementedError

    # --- defaults that fit most methods -------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """peft's tensors for adapter ``name`` from the live parameters."""
        with torch.no_grad():
            return self.peft_state(name, {k: p.detach() for k, p in self.adapter_parameters(name).items()})

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = tuple(n for n in names if n in self.adapter_names())

    def composition_conflict(self, names: Sequence[str]) -> str | None:
        """Why these adapters cannot all run here at once (a clause naming the reason and the fix),
        or None. The default: a module that runs one adapter at a time (the last active one) can
        hold at most one of them. Modules that sum or stack adapters (LoRA, bottlenecks) return None."""
        mine = [n for n in names if n in self.adapter_names()]
        if len(mine) > 1:
            return (f"{type(self).__name__} runs one adapter at a time, and {', '.join(map(repr, mine))} each "
                    "have their own here (a trained copy of a module, such as a classifier's head, or a trained "
                    "bias); give only one of them this module")
        return None

    def merge(self, names: Iterable[str]) -> None:
        raise DeltatuneError(
            f"{type(self).__name__} cannot be merged into the base weights; "
            "keep the adapter loaded for inference instead."
        )

    def unmerge(self) -> None:
        pass

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        return ()

    def rows_per_adapter(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """For a per-example call: each adapter named in ``batch_adapter_names`` → its rows of the batch."""
        names = list(self.batch_adapter_names)
        if self.merged_adapters:
            raise DeltatuneError("Per-example adapters need unmerged weights; call unmerge_adapter() first.")
        if len(names) != batch:
            raise DeltatuneError(f"adapter_names has {len(names)} entries but the batch has {batch} examples.")
        return {name: torch.tensor([i for i, n in enumerate(names) if n == name], device=device, dtype=torch.long)
                for name in dict.fromkeys(names)}


def check_shapes(where: str, expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> None:
    """Raise one clear sentence if ``state`` lacks a tensor or holds one of the wrong shape."""
    for key, shape in expected.items():
        if key not in state:
            raise DeltatuneError(f"The adapter has no tensor '{where}.{key}'; the file is incomplete or was made for another method.")
        if tuple(state[key].shape) != tuple(shape):
            raise DeltatuneError(
                f"Adapter tensor '{where}.{key}' has shape {tuple(state[key].shape)} but the base model needs "
                f"{tuple(shape)}; the adapter was made for another model — load it on the base model it was trained on."
            )


def shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied embeddings and output heads)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}
