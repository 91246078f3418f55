"""The wrapped model: a base model plus named adapters, speaking only the method protocol.

``DeltaModel`` keeps the base model's call signature and outputs; it adds adapter
management (add, switch, delete, per-example choice), composition (several adapters active at
once), merging and disabling. All of it works on whatever ``DeltaModule``s the methods put into
the model — it never asks which method.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from deltatune.atomic import ADAPTER_NAME
from deltatune.errors import DeltatuneError
from deltatune.methods import DeltaModule, Method
from deltatune.methods.composition import Composition, composition_problem
from deltatune.methods.gated_mlp import fuse_gated_mlps, unfuse_gated_mlps


class DeltaModel(nn.Module):
    """A base model with one or more adapters. Attribute access falls through to the base.

    Every base weight starts frozen; what trains is what the active adapters' modules name in
    ``adapter_parameters`` — new tensors (LoRA, prompts) or base weights themselves (full and
    freeze tuning). Usually one adapter is active; ``set_adapter([a, b])`` runs and trains
    several together (methods/composition.py says which may).
    """

    # How save_pretrained writes: set by the package root to deltatune.save (the method's
    # artifact: a peft adapter folder or a model folder), so this module knows no file format.
    writer: ClassVar[Callable[..., Path] | None] = None

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = model
        self.methods: dict[str, Method] = {}
        self.active_adapters: tuple[str, ...] = ()
        for param in model.parameters():
            param.requires_grad_(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_model"], name)

    # --- adapters ------------------------------------------------------------------------
    def delta_modules(self) -> Iterator[tuple[str, DeltaModule]]:
        """(path in the base model, module) for every module a method added."""
        for path, module in self.base_model.named_modules():
            if isinstance(module, DeltaModule):
                yield path, module

    def add_adapter(self, name: str, method: Method) -> None:
        if isinstance(method, Composition):
            raise DeltatuneError("add_adapter takes one method; pass the Composition to deltatune.wrap, or add each "
                                 "part under its own name and activate them with set_adapter([a, b]).")
        if not isinstance(method, Method):
            raise DeltatuneError(f"add_adapter needs a method such as deltatune.LoRA(rank=8), got {type(method).__name__}.")
        require_adapter_name(name)
        if name in self.methods:
            raise DeltatuneError(f"An adapter named {name!r} exists already; pick another name or delete it first.")
        if any(m.merged_adapters for _, m in self.delta_modules()):
            raise DeltatuneError("Cannot add an adapter while others are merged; call unmerge_adapter() first.")
        self.__dict__.pop("_routed_modules", None)  # the modules change: per-example routing walks them again
        try:
            method.inject(self.base_model, name)
        except Exception as error:  # a refusal half-way (a modules_to_save that matches nothing): undo what it did
            self._remove_from_modules(name)
            if is_out_of_memory(error):
                raise DeltatuneError(f"Adding adapter {name!r} ({method.cli_name}) needs more memory than there is "
                                     f"({str(error).strip().splitlines()[0][:160]}); check its sizes (rank, hidden "
                                     "sizes, virtual tokens, block sizes).") from None
            raise
        self.train(self.base_model.training)  # new modules follow the model's mode: no dropout in an eval model
        fuse_gated_mlps(self.base_model)  # Llama-style MLPs keep 2 of their wide activations for backward, not 3-4
        self.methods[name] = method
        self.set_adapter(name)

    @property
    def active_adapter(self) -> str | None:
        """The active adapter; with several active (a composition), the first of them."""
        return self.active_adapters[0] if self.active_adapters else None

    @property
    def active_method(self) -> Method | Composition | None:
        """The active adapter's method; with several active, their Composition (which lays out
        prompts as the part that places virtual tokens in the text does)."""
        if len(self.active_adapters) > 1:
            return Composition(tuple((name, self.methods[name]) for name in self.active_adapters))
        return self.methods.get(self.active_adapter)

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapters: the ones that run and, alone, train.

        One name switches to that adapter. Several run together, in the order given: their deltas
        add up (LoRAs on one layer are summed, serial bottlenecks stacked); which may run together
        is the protocol's say (``composition_problem``, ``DeltaModule.composition_conflict``).
        """
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise DeltatuneError("set_adapter needs at least one adapter name; for base behaviour use deltatune.disabled(model).")
        for name in names:
            self.require_adapter(name)
        if len(set(names)) != len(names):
            raise DeltatuneError(f"set_adapter names an adapter twice ({names}); name each adapter once.")
        if len(names) > 1:
            self.check_composable(names)
        self.active_adapters = tuple(names)
        for _, module in self.delta_modules():
            module.set_active(names)
            for adapter in module.adapter_names():
                for param in module.adapter_parameters(adapter).values():
                    param.requires_grad_(False)
        for name in names:
            for param in self.adapter_parameters(name).values():
                param.requires_grad_(True)

    def check_composable(self, names: Sequence[str]) -> None:
        """Refuse, with one sentence, adapters that cannot be active together."""
        problem = composition_problem([(name, self.methods[name]) for name in names])
        if problem:
            raise DeltatuneError(problem)
        for path, module in self.delta_modules():
            conflict = module.composition_conflict(names)
            if conflict:
                raise DeltatuneError(f"These adapters cannot be active together: at {path!r} {conflict}.")

    def delete_adapter(self, name: str) -> None:
        self.require_adapter(name)
        self._remove_from_modules(name)
        del self.methods[name]
        if name in self.active_adapters:
            rest = [n for n in self.active_adapters if n != name]
            self.active_adapters = ()
            if rest or self.methods:
                self.set_adapter(rest or next(iter(self.methods)))

    def _remove_from_modules(self, name: str) -> None:
        """Take adapter ``name`` out of every module, and put back each layer left with no adapter."""
        self.__dict__.pop("_routed_modules", None)
        for _, module in list(self.delta_modules()):
            if name in module.adapter_names():
                module.delete_adapter(name)
        for path, module in list(self.delta_modules()):
            if not module.adapter_names():
                put_back(self.base_model, path, module.unload())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The parameters of one adapter, keyed ``<module path>.<local name>``."""
        params = {}
        for path, module in self.delta_modules():
            if name in module.adapter_names():
                for local, param in module.adapter_parameters(name).items():
                    params[f"{path}.{local}"] = param
        return params

    def require_mergeable(self, names: Sequence[str]) -> None:
        """Refuse, before any weight changes, to merge adapters whose method cannot be merged."""
        for name in names:
            self.require_adapter(name)
            method = self.methods[name]
            if not method.capabilities().mergeable:
                part = ", so neither can the composition it is part of" if len(names) > 1 else ""
                raise DeltatuneError(f"Adapter {name!r} ({method.cli_name}) cannot be merged into the base "
                                     f"weights{part}; keep it loaded for inference instead.")

    def require_adapter(self, name: str) -> None:
        if name not in self.methods:
            raise DeltatuneError(f"There is no adapter named {name!r}; this model has: {', '.join(self.methods) or 'none'}.")

    # --- merge ---------------------------------------------------------------------------
    def merge_adapter(self, names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights, keeping them unmergeable."""
        names = list(names) if names is not None else list(self.active_adapters)
        self.require_mergeable(names)
        for _, module in self.delta_modules():
            module.merge(names)

    def unmerge_adapter(self) -> None:
        for _, module in self.delta_modules():
            module.unmerge()

    # --- forward -------------------------------------------------------------------------
    @contextmanager
    def _per_example(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = sorted(set(adapter_names) - set(self.methods) - {"__base__"})
        if unknown:
            raise DeltatuneError(f"adapter_names mentions {unknown}, which this model does not have; it has {list(self.methods)}.")
        for name, method in self.methods.items():
            if not method.capabilities().per_example_adapters:
                raise DeltatuneError(f"Adapter {name!r} ({method.cli_name}) cannot be chosen per example; "
                                     "run one adapter per batch with set_adapter() instead.")
        modules = self.__dict__.get("_routed_modules")
        if modules is None:  # kept: walking the model on every decode step cost 5% of a small model's step
            modules = self.__dict__["_routed_modules"] = [m for _, m in self.delta_modules()]
        names = tuple(adapter_names)
        for module in modules:  # a plain attribute, so past nn.Module's __setattr__ (decoding runs this per token)
            module.__dict__["batch_adapter_names"] = names
        try:
            yield
        finally:
            for module in modules:
                module.__dict__["batch_adapter_names"] = None

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._per_example(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._per_example(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def save_pretrained(self, directory: str, adapter_name: str | None = None) -> Path:
        """peft's spelling of :func:`deltatune.save`: the adapter (or, for full fine-tuning, the model)."""
        return type(self).writer(self, directory, adapter_name)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"]:  # reentrant checkpoints need an input that requires grad
            self.base_model.enable_input_require_grads()
        elif hasattr(self.base_model, "_require_grads_hook"):  # else the backward would run through frozen layers
            self.base_model.disable_input_require_grads()




def require_adapter_name(name: Any) -> str:
    """An adapter name is also a folder name (a composition saves ``<dir>/<name>/``): letters,
    digits, '_' and '-' only, so no name is empty, hidden, a path or an absolute path."""
    if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME, name) or name == "__base__":
        raise DeltatuneError(f"Adapter name {name!r} is not usable; pick a name of letters, digits, '_' and "
                             "'-', like 'default' or 'summarise-v2'.")
    return name


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation the machine (or the GPU) refused: the adapter is too big for it."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def put_back(model: nn.Module, path: str, module: nn.Module | None) -> None:
    """Replace the module at ``path`` by what ``unload()`` gave; ``None`` removes it."""
    if module is not None:
        model.set_submodule(path, module)
        return
    parent, _, name = path.rpartition(".")
    delattr(model.get_submodule(parent) if parent else model, name)


def wrap(model: nn.Module, method: Method | Composition, adapter_name: str = "default") -> DeltaModel:
    """Add ``method`` as adapter ``adapter_name``; the base model's weights are frozen.

    A ``Composition`` adds each of its parts as an adapter named after the part (``adapter_name``
    is not used) and activates them all together.
    """
    trains = {id(p): p.requires_grad for p in model.parameters()}
    wrapped = model if isinstance(model, DeltaModel) else DeltaModel(model)
    try:
        _add(wrapped, method, adapter_name)
    except DeltatuneError:
        if wrapped is not model:  # a plain model comes back as it was given: unwrapped, its parameters as they were
            for param in model.parameters():
                param.requires_grad_(trains.get(id(param), False))
        raise
    return wrapped


def _add(wrapped: DeltaModel, method: Method | Composition, adapter_name: str) -> None:
    if isinstance(method, Composition):
        clash = [name for name in method.names if name in wrapped.methods]
        if clash:
            raise DeltatuneError(f"An adapter named {clash[0]!r} exists already; rename that part of the composition.")
        added = []
        try:
            for name, part in method.parts:
                wrapped.add_adapter(name, part)
                added.append(name)
            wrapped.set_adapter(method.names)
        except DeltatuneError:
            for name in reversed(added):  # the model as it was: a refused composition leaves nothing behind
                wrapped.delete_adapter(name)
            raise
        return
    wrapped.add_adapter(adapter_name, method)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters count once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


def _require_wrapped(model: nn.Module) -> DeltaModel:
    if not isinstance(model, DeltaModel):
        raise DeltatuneError("This model carries no adapter; wrap it with deltatune.wrap(...) or deltatune.load_adapter(...) first.")
    return model


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """The base architecture with the adapters folded in and every wrapper removed.

    The returned module is the base model itself (modified in place); ``model`` is spent.
    Default: the active adapters — all of a composition, which merges only if every part can.
    """
    model = _require_wrapped(model)
    names = list(adapter_names) if adapter_names is not None else list(model.active_adapters)
    model.require_mergeable(names)
    base = model.base_model
    model.__dict__.pop("_routed_modules", None)
    for path, module in list(model.delta_modules()):  # one layer at a time: one extra weight at most
        module.merge(names)
        put_back(base, path, module.unload())
    _untie_if_split(base)
    unfuse_gated_mlps(base)  # the base architecture, its own forwards included
    for param in base.parameters():
        param.requires_grad_(False)
    return base


def _untie_if_split(model: nn.Module) -> None:
    """A merge that changed one side of tied embeddings leaves them untied; say so in the config."""
    config = getattr(model, "config", None)
    inputs = getattr(model, "get_input_embeddings", lambda: None)()
    outputs = getattr(model, "get_output_embeddings", lambda: None)()
    if config is not None and inputs is not None and outputs is not None and getattr(config, "tie_word_embeddings", False):
        if inputs.weight is not outputs.weight:
            config.tie_word_embeddings = False


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model's behaviour: every adapter off (merged ones are unmerged meanwhile)."""
    model = _require_wrapped(model)
    for name, method in model.methods.items():
        if not method.capabilities().reversible:
            raise DeltatuneError(f"Adapter {name!r} ({method.cli_name}) changed the base weights in place, so the "
                                 "base model cannot be restored; load the base model again for base behaviour.")
    merged = {path: m.merged_adapters for path, m in model.delta_modules()}
    modules = [m for _, m in model.delta_modules()]
    active = [m.active_adapters for m in modules]
    model.unmerge_adapter()
    for module in modules:
        module.set_active([])
    try:
        yield model
    finally:
        for module, names in zip(modules, active):
            module.set_active(names)
        for path, module in model.delta_modules():
            if merged.get(path):
                module.merge(merged[path])
