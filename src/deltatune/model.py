"""The wrapped model: a base model plus named adapters, speaking only the method protocol.

``DeltaModel`` keeps the base model's call signature and outputs; it adds adapter
management (add, switch, delete, per-example choice), merging and disabling. All of it works
on whatever ``DeltaModule``s the methods put into the model — it never asks which method.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods import DeltaModule, Method


class DeltaModel(nn.Module):
    """A base model with one or more adapters. Attribute access falls through to the base.

    Every base weight starts frozen; what trains is what the active adapter's modules name in
    ``adapter_parameters`` — new tensors (LoRA, prompts) or base weights themselves (full and
    freeze tuning).
    """

    # How save_pretrained writes: set by the package root to deltatune.save (the method's
    # artifact: a peft adapter folder or a model folder), so this module knows no file format.
    writer: ClassVar[Callable[..., Path] | None] = None

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = model
        self.methods: dict[str, Method] = {}
        self.active_adapter: str | None = None
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
        if not isinstance(method, Method):
            raise DeltatuneError(f"add_adapter needs a method such as deltatune.LoRA(rank=8), got {type(method).__name__}.")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == "__base__":
            raise DeltatuneError(f"Adapter name {name!r} is not usable; pick a name of letters, digits, '_' and "
                                 "'-', like 'default' or 'summarise-v2'.")
        if name in self.methods:
            raise DeltatuneError(f"An adapter named {name!r} exists already; pick another name or delete it first.")
        if any(m.merged_adapters for _, m in self.delta_modules()):
            raise DeltatuneError("Cannot add an adapter while others are merged; call unmerge_adapter() first.")
        method.inject(self.base_model, name)
        self.train(self.base_model.training)  # new modules follow the model's mode: no dropout in an eval model
        self.methods[name] = method
        self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter: the one that runs and, alone, trains."""
        self.require_adapter(name)
        self.active_adapter = name
        for _, module in self.delta_modules():
            module.set_active([name])
            for adapter in module.adapter_names():
                for param in module.adapter_parameters(adapter).values():
                    param.requires_grad_(False)
        for param in self.adapter_parameters(name).values():
            param.requires_grad_(True)

    def delete_adapter(self, name: str) -> None:
        self.require_adapter(name)
        for _, module in self.delta_modules():
            if name in module.adapter_names():
                module.delete_adapter(name)
        del self.methods[name]
        for path, module in list(self.delta_modules()):
            if not module.adapter_names():
                put_back(self.base_model, path, module.unload())
        if self.active_adapter == name:
            self.active_adapter = None
            if self.methods:
                self.set_adapter(next(iter(self.methods)))

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The parameters of one adapter, keyed ``<module path>.<local name>``."""
        params = {}
        for path, module in self.delta_modules():
            if name in module.adapter_names():
                for local, param in module.adapter_parameters(name).items():
                    params[f"{path}.{local}"] = param
        return params

    def require_adapter(self, name: str) -> None:
        if name not in self.methods:
            raise DeltatuneError(f"There is no adapter named {name!r}; this model has: {', '.join(self.methods) or 'none'}.")

    # --- merge ---------------------------------------------------------------------------
    def merge_adapter(self, names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active one) into the base weights, keeping them unmergeable."""
        names = list(names) if names is not None else [self.active_adapter]
        for name in names:
            self.require_adapter(name)
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
        modules = [m for _, m in self.delta_modules()]
        for module in modules:
            module.batch_adapter_names = list(adapter_names)
        try:
            yield
        finally:
            for module in modules:
                module.batch_adapter_names = None

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._per_example(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._per_example(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def save_pretrained(self, directory: str, adapter_name: str | None = None) -> Path:
        """peft's spelling of :func:`deltatune.save`: the adapter (or, for full and freeze tuning, the model)."""
        return type(self).writer(self, directory, adapter_name)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"]:  # reentrant checkpoints need an input that requires grad
            self.base_model.enable_input_require_grads()


def put_back(model: nn.Module, path: str, module: nn.Module | None) -> None:
    """Replace the module at ``path`` by what ``unload()`` gave; ``None`` removes it."""
    if module is not None:
        model.set_submodule(path, module)
        return
    parent, _, name = path.rpartition(".")
    delattr(model.get_submodule(parent) if parent else model, name)


def wrap(model: nn.Module, method: Method, adapter_name: str = "default") -> DeltaModel:
    """Add ``method`` as adapter ``adapter_name``; the base model's weights are frozen."""
    wrapped = model if isinstance(model, DeltaModel) else DeltaModel(model)
    wrapped.add_adapter(adapter_name, method)
    return wrapped


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
    """
    model = _require_wrapped(model)
    names = list(adapter_names) if adapter_names is not None else [model.active_adapter]
    for name in names:
        model.require_adapter(name)
        if not model.methods[name].capabilities().mergeable:
            raise DeltatuneError(f"Adapter {name!r} ({model.methods[name].cli_name}) cannot be merged into the base "
                                 "weights; keep it loaded for inference instead.")
    base = model.base_model
    for path, module in list(model.delta_modules()):  # one layer at a time: one extra weight at most
        module.merge(names)
        put_back(base, path, module.unload())
    _untie_if_split(base)
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
