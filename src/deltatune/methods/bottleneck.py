"""Bottleneck adapters: Houlsby et al. 2019 (arXiv 1902.00751), Pfeiffer et al. 2020 (arXiv
2005.00247) and the parallel adapter of He et al. 2021 (arXiv 2110.04366).

A small bottleneck is put into every transformer layer; only it trains (d: hidden size,
r: bottleneck size, f: the activation, s: the scale):

    bottleneck(x) = s · (W_up f(W_down LN(x) + b_down) + b_up),    W_down: r × d,  W_up: d × r
    serial     h ← h + bottleneck(h)       h: a sublayer's output, before the layer adds its residual
    parallel   h ← h + bottleneck(x)       x: the feed-forward block's input, h: its output

LN is an optional layer norm on the adapter's input. Presets (AdapterHub's, as flags on one layer):

    houlsby    serial after the attention output and after the feed-forward block (swish, d/16)
    pfeiffer   serial after the feed-forward block only (relu, d/16)
    parallel   beside the feed-forward block, s = 4 (relu, d/2; He et al.'s scaled parallel adapter)

W_up and b_up start at zero, so the wrapped model equals the base model at step 0.

The sublayers are found by structure, in any ``nn.ModuleList`` of blocks: the block's first
module whose class is an attention (``LlamaAttention``, ``BertAttention``,
``T5LayerSelfAttention``, ...) ends in its output projection (``o_proj``, ``c_proj``,
``output.dense``, ``out_proj``, ``o``); the linear layers outside every attention module are the
feed-forward block, first (``gate_proj``, ``c_fc``, ``intermediate.dense``, ``fc1``, ``wi``) to
last (``down_proj``, ``c_proj``, ``output.dense``, ``fc2``, ``wo``). Serial adapters wrap an
output projection; a parallel adapter also wraps the first feed-forward projection, which
hands the block's input to it. Nothing here folds into the base weights (f is not linear).
Saved in deltatune's own format (docs/bottleneck.md): peft has no bottleneck adapter.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.errors import DeltatuneError
from deltatune.methods.base_weight import layer_sizes
from deltatune.methods.protocol import Capabilities, DeltaModule, Method, check_shapes
from deltatune.methods.trained_copy import inject_trained_copies, trained_modules
from deltatune.targets import plain_modules
from deltatune.validation import require_bool, require_choice, require_names, require_number, require_size

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}


class Preset(NamedTuple):
    after_attention: bool  # a serial adapter on the attention output (AdapterHub's mh_adapter)
    parallel: bool  # the feed-forward adapter runs beside the block instead of after it (is_parallel)
    activation: str
    reduction_factor: float
    scale: float


PRESETS = {
    "houlsby": Preset(after_attention=True, parallel=False, activation="swish", reduction_factor=16, scale=1.0),
    "pfeiffer": Preset(after_attention=False, parallel=False, activation="relu", reduction_factor=16, scale=1.0),
    "parallel": Preset(after_attention=False, parallel=True, activation="relu", reduction_factor=2, scale=4.0),
}
PEFT_INCOMPATIBLE = ("peft has no bottleneck adapter (its issue 244); load the folder with "
                     "deltatune.load_adapter")
NOT_MATH = ("peft_type", "task_type", "base_model_name_or_path", "inference_mode", "deltatune_peft_incompatible")


# --- the config ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Adapter(Method):
    """Bottleneck adapters; ``None`` settings take the preset's value (see the module docstring).

    ``bottleneck_size`` r, or ``reduction_factor`` (r = hidden // factor), not both; ``layers``:
    indices into each layer stack (BART, T5: the encoder's and the decoder's), negative from the
    end, None for every layer; ``layer_norm``: a layer norm on the adapter's input; ``dropout``: on
    the adapter's output; ``scale``: s.
    """

    preset: str = "pfeiffer"
    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    activation: str | None = None
    layers: tuple[int, ...] | None = None
    layer_norm: bool = False
    dropout: float = 0.0
    scale: float | None = None
    modules_to_save: tuple[str, ...] = ()

    peft_type: ClassVar[str] = "BOTTLENECK"  # deltatune's own: peft has no such adapter type
    cli_name: ClassVar[str] = "adapter"
    # adapters train at higher rates than whole models (Houlsby et al. swept 3e-5…3e-3; AdapterHub: 1e-4 and up)
    training_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 1e-3}

    def __post_init__(self) -> None:
        require_choice("preset", self.preset, PRESETS)
        preset = PRESETS[self.preset]
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise DeltatuneError(f"bottleneck_size={self.bottleneck_size} and reduction_factor={self.reduction_factor} "
                                 "both set the adapter's width; give only one of them.")
        if self.bottleneck_size is not None:
            require_size("bottleneck_size", self.bottleneck_size)
        else:
            factor = preset.reduction_factor if self.reduction_factor is None else self.reduction_factor
            object.__setattr__(self, "reduction_factor", require_number("reduction_factor", factor, minimum=1))
        object.__setattr__(self, "activation", self.activation or preset.activation)
        require_choice("activation", self.activation, ACTIVATIONS)
        scale = preset.scale if self.scale is None else self.scale
        if require_number("scale", scale, minimum=0) == 0:
            raise DeltatuneError("scale=0 switches the adapter off, so nothing would be learned; "
                                 "set it above 0, e.g. 1.")
        object.__setattr__(self, "scale", float(scale))
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers or any(
                    isinstance(i, bool) or not isinstance(i, int) for i in self.layers):
                raise DeltatuneError(f"layers must be a list of layer indices like [0, 1, -1], got {self.layers!r}: "
                                     "fix the config")
            object.__setattr__(self, "layers", tuple(self.layers))
        require_bool("layer_norm", self.layer_norm)
        require_number("dropout", self.dropout, minimum=0, below=1)
        object.__setattr__(self, "modules_to_save", require_names("modules_to_save", self.modules_to_save or ()))

    def width(self, hidden: int) -> int:
        """r: the bottleneck size, or hidden // reduction_factor (at least 1)."""
        return self.bottleneck_size or max(1, int(hidden // self.reduction_factor))

    # --- Method protocol -----------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return Capabilities(per_example_adapters=True)  # equals the base at init, reversible, not mergeable

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        preset = PRESETS[self.preset]
        heads = trained_modules(model, self.modules_to_save)
        sites = [site for stack in layer_sites(model) for site in self.chosen(stack)]
        paths = []
        for site in sites:
            if preset.after_attention:
                paths.append(self._add(model, site.attention_output, adapter_name))
            tap = None
            if preset.parallel:
                tap = wrapped(model, site.feed_forward_input, FeedForwardInput)
                tap.add_adapter(adapter_name)
                paths.append(site.feed_forward_input)
            paths.append(self._add(model, site.feed_forward_output, adapter_name, tap))
        return paths + inject_trained_copies(model, heads, adapter_name)

    def _add(self, model: nn.Module, path: str, adapter_name: str, tap: "FeedForwardInput | None" = None) -> str:
        """A bottleneck after the projection at ``path``; beside the block whose input ``tap`` holds, if given."""
        projection = wrapped(model, path, AdaptedProjection)
        hidden = projection.out_features
        projection.add_adapter(adapter_name, BottleneckLayer(
            hidden, self.width(hidden), self.activation, self.scale, self.layer_norm, self.dropout,
            **projection.parameter_kwargs()), tap)
        return path

    def chosen(self, stack: list["LayerSites"]) -> list["LayerSites"]:
        if self.layers is None:
            return stack
        wrong = [i for i in self.layers if not -len(stack) <= i < len(stack)]
        if wrong:
            raise DeltatuneError(f"layers names layer {wrong[0]}, but this model's layer stack has {len(stack)} layers "
                                 f"(0 to {len(stack) - 1}, or -1 for the last); fix layers.")
        return [stack[i] for i in sorted({i % len(stack) for i in self.layers})]

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        settings = self.describe()
        settings["modules_to_save"] = list(trained_modules(model, self.modules_to_save)) or None
        return {"peft_type": self.peft_type, **settings, "deltatune_peft_incompatible": PEFT_INCOMPATIBLE}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "Adapter":
        fields = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(k for k in config if k not in fields and k not in NOT_MATH)
        if ignored:
            warnings.warn(f"adapter_config.json keys not used by deltatune were ignored: {', '.join(ignored)}",
                          stacklevel=2)
        return cls(**{key: value for key, value in config.items() if key in fields and value is not None})


# --- the layer -----------------------------------------------------------------------------
class BottleneckLayer(nn.Module):
    """One adapter at one place: residual + s · (W_up f(W_down LN(x) + b_down) + b_up)."""

    def __init__(self, hidden: int, width: int, activation: str, scale: float, layer_norm: bool = False,
                 dropout: float = 0.0, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kwargs = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(hidden, **kwargs) if layer_norm else None
        self.down = nn.Linear(hidden, width, **kwargs)  # W_down: Kaiming-uniform (nn.Linear's own), b_down = 0
        self.up = nn.Linear(width, hidden, **kwargs)  # W_up = 0, b_up = 0: the adapter adds nothing at step 0
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = activation
        self.scale = scale
        self.dropout = dropout

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``x``: the adapter's input (..., d); ``residual``: what it is added to (..., d)."""
        if self.norm is not None:
            x = self.norm(x)
        down, up = self.down, self.up
        hidden = ACTIVATIONS[self.activation](F.linear(x.to(down.weight.dtype), down.weight, down.bias))  # (..., r)
        delta = F.linear(hidden, up.weight, up.bias)  # (..., r) -> (..., d)
        if self.dropout and self.training:
            delta = F.dropout(delta, self.dropout)
        return torch.add(residual, delta.to(residual.dtype), alpha=self.scale)  # residual + s·delta, one kernel

    def extra_repr(self) -> str:
        return f"activation={self.activation}, scale={self.scale}, dropout={self.dropout}"


class ProjectionWrapper(DeltaModule):
    """A wrapped projection that still answers for it: ``.weight``, ``.nf``, ... (T5 reads
    ``wo.weight.dtype``); ``unload()`` gives the projection back as it was (nothing folds in)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def __getattr__(self, attr: str) -> Any:
        try:
            return super().__getattr__(attr)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None:
                raise
            return getattr(base, attr)

    def unload(self) -> nn.Module:
        return self.base_layer


class AdaptedProjection(ProjectionWrapper):
    """A sublayer's output projection (``o_proj``, ``down_proj``, ``fc2``, ...) with bottlenecks
    after it: serial ones take its output, parallel ones the feed-forward block's input."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = layer_sizes(base_layer)
        self.bottlenecks = nn.ModuleDict()
        self.parallel: set[str] = set()  # adapters that take the feed-forward block's input
        object.__setattr__(self, "tap", None)  # where that input comes from: another module's, not a child

    def parameter_kwargs(self) -> dict[str, Any]:
        weight = self.base_layer.weight
        return {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}

    def add_adapter(self, name: str, layer: BottleneckLayer, tap: "FeedForwardInput | None") -> None:
        self.bottlenecks[name] = layer
        if tap is not None:
            self.parallel.add(name)
            object.__setattr__(self, "tap", tap)
        self.active_adapters = self.active_adapters or (name,)

    def adapter_names(self) -> list[str]:
        return list(self.bottlenecks.keys())

    def composition_conflict(self, names: Sequence[str]) -> str | None:
        return None  # active bottlenecks stack: serial ones one after another, parallel ones summed

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {f"adapter_{key}": param for key, param in self.bottlenecks[name].named_parameters()}

    def peft_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tensors)

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        params = self.adapter_parameters(name)
        check_shapes(where, {key: p.shape for key, p in params.items()}, state)
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(state[key])

    def delete_adapter(self, name: str) -> None:
        del self.bottlenecks[name]
        self.parallel.discard(name)
        if not self.parallel:
            object.__setattr__(self, "tap", None)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., d)
        block_input = self.tap.take() if self.tap is not None else None  # (..., d): the block's input
        if self.batch_adapter_names is not None:
            return self._forward_per_example(out, block_input)
        for name in self.active_adapters:
            out = self.bottlenecks[name](block_input if name in self.parallel else out, out)
        return out

    def _forward_per_example(self, out: torch.Tensor, block_input: torch.Tensor | None) -> torch.Tensor:
        """Each example of the batch runs its own adapter ("__base__": none)."""
        result = out.clone()
        for name, rows in self.rows_per_adapter(out.shape[0], out.device).items():
            if name in self.bottlenecks:
                source = block_input if name in self.parallel else out
                result[rows] = self.bottlenecks[name](source[rows], out[rows])
        return result

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, parallel={sorted(self.parallel)}"


class FeedForwardInput(ProjectionWrapper):
    """The feed-forward block's first projection, unchanged; it keeps its input (the block's
    input) for the parallel adapters of its layer until their projection takes it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.names: list[str] = []
        self.held: torch.Tensor | None = None

    def add_adapter(self, name: str) -> None:
        self.names.append(name)
        self.active_adapters = self.active_adapters or (name,)

    def take(self) -> torch.Tensor | None:
        held, self.held = self.held, None  # held for one layer call only
        return held

    def adapter_names(self) -> list[str]:
        return list(self.names)

    def composition_conflict(self, names: Sequence[str]) -> str | None:
        return None  # it only hands its input on, to every active parallel adapter alike

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {}

    def peft_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        pass  # it holds no tensors

    def delete_adapter(self, name: str) -> None:
        self.names.remove(name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_adapters or self.batch_adapter_names is not None:
            self.held = x
        return self.base_layer(x)


def wrapped(model: nn.Module, path: str, wrapper: type[DeltaModule]) -> Any:
    """The ``wrapper`` at ``path``, put there around the module found there if it is not yet."""
    module = model.get_submodule(path)
    if not isinstance(module, wrapper):
        module = wrapper(module)
        model.set_submodule(path, module)
    return module


# --- finding the sublayers by structure ----------------------------------------------------
PROJECTIONS = (nn.Linear, Conv1D)


class LayerSites(NamedTuple):
    """Paths (in the model) of one transformer layer's projections that adapters attach to."""

    attention_output: str
    feed_forward_input: str
    feed_forward_output: str


def layer_sites(model: nn.Module) -> list[list[LayerSites]]:
    """Per layer stack (a ModuleList of transformer blocks), each block's sites; an error naming
    the module types the model has when there is no stack."""
    stacks: list[list[LayerSites]] = []
    found: list[str] = []
    for path, module in plain_modules(model):
        if not isinstance(module, nn.ModuleList) or not len(module) or any(path.startswith(f + ".") for f in found):
            continue
        sites = [block_sites(f"{path}.{index}", block) for index, block in enumerate(module)]
        if all(site is not None for site in sites):
            stacks.append(sites)
            found.append(path)
    if not stacks:
        kinds = list(dict.fromkeys(type(m).__name__ for _, m in plain_modules(model)))
        shown = ", ".join(kinds[:16]) + (", ..." if len(kinds) > 16 else "")
        raise DeltatuneError(
            f"Bottleneck adapters find no transformer layers in {type(model).__name__} (a list of blocks, each "
            f"with an attention module and a feed-forward block of linear layers); its modules are {shown}, so "
            "use LoRA with targets naming its linear layers instead.")
    return stacks


def block_sites(path: str, block: nn.Module) -> LayerSites | None:
    """The block's self-attention output projection and its feed-forward block's first and last
    projections, or None when the block is not an attention + feed-forward layer."""
    modules = dict(plain_modules(block))
    attentions = [p for p, m in modules.items() if p and "Attention" in type(m).__name__]
    attentions = [p for p in attentions if not any(p.startswith(outer + ".") for outer in attentions)]
    projections = [p for p, m in modules.items() if isinstance(m, PROJECTIONS)]
    inside = lambda p, outer: p.startswith(outer + ".")
    attention_output = [p for p in projections if attentions and inside(p, attentions[0])]
    feed_forward = [p for p in projections if not any(inside(p, a) for a in attentions)]
    if not attention_output or len(feed_forward) < 2:
        return None
    hidden = layer_sizes(modules[attention_output[-1]])[1]
    if layer_sizes(modules[feed_forward[0]])[0] != hidden or layer_sizes(modules[feed_forward[-1]])[1] != hidden:
        return None  # not a d -> ... -> d block (a mixture-of-experts router, say)
    return LayerSites(f"{path}.{attention_output[-1]}", f"{path}.{feed_forward[0]}", f"{path}.{feed_forward[-1]}")


def bottleneck_parameters(hidden: int, width: int, layer_norm: bool) -> int:
    """Trainable numbers in one bottleneck: W_down, b_down, W_up, b_up (and the norm's γ, β)."""
    return 2 * hidden * width + width + hidden + (2 * hidden if layer_norm else 0)

