"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv 2106.09685).

Beside a frozen weight W (out × in) learn a rank-r bypass; only A and B train:

    h = W x + s · B (A x),    A: r × in,  B: out × r,  s = α / r   (rsLoRA: s = α / √r)

Init: A random (Kaiming-uniform, or Gaussian with std 1/r), B = 0, so the wrapped model
equals the base model at step 0. PiSSA init (arXiv 2404.02948) instead takes A and B from
the top-r singular triplets of W (s·B A = U_r S_r V_rᵀ) and keeps the residual in W; at save
time it is rewritten as a plain LoRA of rank 2r relative to the original W, so any LoRA
loader (peft included) reads it.

Merge is a pure function on tensors: W' = W + s·B A, transposed for GPT-2's Conv1D (whose
weight is in × out), computed in fp32 whatever the storage dtype. Embedding layers use
A: r × vocab and B: dim × r, so the delta to the (vocab × dim) table is s·(B A)ᵀ.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from deltatune.errors import DeltatuneError
from deltatune.methods.base_weight import WeightStore, layer_sizes, read_weight, stored_transposed
from deltatune.methods.gated_mlp import LinearTerms, low_rank_linear, low_rank_linear_backward
from deltatune.methods.per_example import Stacked, Wide, add_per_example_low_rank, stacked_factors, wide_factors
from deltatune.methods.protocol import Capabilities, DeltaModule, Method, check_shapes, shared_parameter_ids
from deltatune.methods.trained_copy import inject_trained_copies, trained_modules
from deltatune.targets import ALL_LINEAR, Targets, find_targets, pattern_value, resolve_targets, target_names_for_config
from deltatune.validation import (require_bool, require_choice, require_mapping, require_names, require_number,
                                 require_size, require_targets)

INITS = ("kaiming", "gaussian", "pissa")
# peft LoraConfig keys that would change what a loaded adapter computes: refused unless off.
CHANGES_THE_MATH = ("use_dora", "layers_to_transform", "layers_pattern", "layer_replication", "exclude_modules",
                    "trainable_token_indices", "target_parameters", "lora_bias", "use_qalora",
                    "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config", "velora_config")
# peft keys that only matter when creating or training an adapter, not when loading one.
NO_EFFECT_ON_LOADING = ("peft_type", "task_type", "base_model_name_or_path", "fan_in_fan_out", "init_lora_weights",
                        "inference_mode", "revision", "auto_mapping", "peft_version", "megatron_config",
                        "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                        "qalora_group_size", "monteclora_config", "ensure_weight_tying")
BIASES = ("none", "all", "lora_only")
BIAS_KEY = "base_layer.bias"  # a wrapped layer's trained bias, under peft's key


# --- the math, as pure functions -----------------------------------------------------------
def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """s = α/r, or α/√r for rank-stabilised LoRA (arXiv 2312.03732)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, transposed: bool = False) -> torch.Tensor:
    """s·B A in fp32, as (out × in); (in × out) when ``transposed`` (Conv1D, embeddings)."""
    delta = (lora_B.float() @ lora_A.float()) * scale  # (out, r) @ (r, in) -> (out, in)
    return delta.T if transposed else delta


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                  transposed: bool = False) -> torch.Tensor:
    """W' = W + s·B A, summed in fp32 and cast back to W's dtype."""
    return (weight.float() + lora_delta(lora_A, lora_B, scale, transposed)).to(weight.dtype)


def svd_init(weight_out_in: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: A, B with s·B A = U_r S_r V_rᵀ, and the residual W − s·B A (all fp32, out × in)."""
    U, S, Vh = torch.linalg.svd(weight_out_in.float(), full_matrices=False)
    root = torch.sqrt(S[:rank] / scale)  # (r,)
    lora_A = root[:, None] * Vh[:rank]  # (r, in)
    lora_B = U[:, :rank] * root[None, :]  # (out, r)
    residual = weight_out_in.float() - scale * (lora_B @ lora_A)
    return lora_A, lora_B, residual


# --- the config ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRA(Method):
    """LoRA hyper-parameters. ``targets``: names, a regex, "all-linear", or None for defaults."""

    rank: int = 8
    alpha: float = 16.0
    targets: Targets = None
    dropout: float = 0.0
    rslora: bool = False
    bias: str = "none"
    init: str = "kaiming"
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()

    peft_type: ClassVar[str] = "LORA"
    cli_name: ClassVar[str] = "lora"
    # Measured: all-MiniLM-L6-v2 on SST-2, 100 steps: 81% at 1e-3, the majority class at 2e-4 (README).
    training_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 1e-3}

    def __post_init__(self) -> None:
        if self.targets is not None:
            object.__setattr__(self, "targets", require_targets("targets", self.targets))
        object.__setattr__(self, "modules_to_save", require_names("modules_to_save", self.modules_to_save or ()))
        object.__setattr__(self, "rank_pattern", require_mapping("rank_pattern", self.rank_pattern or {},
                                                                 require_size))
        object.__setattr__(self, "alpha_pattern", require_mapping("alpha_pattern", self.alpha_pattern or {},
                                                                  lambda name, value: require_number(name, value, minimum=0)))
        require_size("rank", self.rank)
        require_number("alpha", self.alpha, minimum=0)
        require_number("dropout", self.dropout, minimum=0, below=1)
        require_bool("rslora", self.rslora)
        require_choice("init", self.init, INITS)
        require_choice("bias", self.bias, BIASES)

    def rank_for(self, path: str) -> int:
        return int(pattern_value(path, self.rank_pattern, self.rank))

    def alpha_for(self, path: str) -> float:
        return float(pattern_value(path, self.alpha_pattern, self.alpha))

    # --- Method protocol -----------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        # every init starts at the base model (B = 0, or PiSSA's exact split W = W_res + s·B A)
        return Capabilities(mergeable=True, per_example_adapters=True, exact_reload=self.init != "pissa")

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        heads = trained_modules(model, self.modules_to_save)
        paths = find_targets(model, self.targets, LORA_LAYERS)
        if not self.modules_to_save:  # a classifier's implicit head trains in full, so "all-linear" leaves it
            paths = [p for p in paths if not any(p == h or p.startswith(h + ".") for h in heads)]
        shared = shared_parameter_ids(model)
        for path in paths:
            module = model.get_submodule(path)
            if not isinstance(module, LoRALayer):
                module = LoRALayer(module, shared_weight=id(module.weight) in shared)
                model.set_submodule(path, module)
            module.add_adapter(
                adapter_name, rank=self.rank_for(path), alpha=self.alpha_for(path), dropout=self.dropout,
                rslora=self.rslora, init=self.init, train_bias=self.bias != "none",
            )
        paths += inject_trained_copies(model, heads, adapter_name)
        if self.bias == "all":
            paths += inject_trained_biases(model, adapter_name)
        return paths

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        targets = resolve_targets(self.targets, model)
        if targets == ALL_LINEAR:
            paths = [p for p, m in model.named_modules() if isinstance(m, LoRALayer)]
            targets = target_names_for_config(model, paths)
        config = {
            "peft_type": self.peft_type,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else list(targets),
            "use_rslora": self.rslora,
            "bias": self.bias,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": list(trained_modules(model, self.modules_to_save)) or None,
            "fan_in_fan_out": any(isinstance(m, LoRALayer) and m.transposed and not m.is_embedding for m in model.modules()),
            "init_lora_weights": True,
            "use_dora": False,
        }
        if self.init == "pissa":  # saved as the equivalent rank-2r LoRA on the original W
            growth = math.sqrt(2) if self.rslora else 2.0
            config.update(r=2 * self.rank, lora_alpha=growth * self.alpha,
                          rank_pattern={k: 2 * v for k, v in self.rank_pattern.items()},
                          alpha_pattern={k: growth * v for k, v in self.alpha_pattern.items()})
            for key, rank in self.rank_pattern.items():  # a pattern on rank alone needs its alpha doubled too
                if key not in self.alpha_pattern:
                    config["alpha_pattern"][key] = growth * self.alpha
        return config

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "LoRA":
        for key, value in config.items():
            if key in CHANGES_THE_MATH and value not in (None, False, [], {}):
                raise DeltatuneError(f"This adapter sets {key}={value!r}, which deltatune does not support yet; "
                                     "retrain it without that option.")
        known = {"r": "rank", "lora_alpha": "alpha", "target_modules": "targets", "lora_dropout": "dropout",
                 "use_rslora": "rslora", "bias": "bias", "rank_pattern": "rank_pattern",
                 "alpha_pattern": "alpha_pattern", "modules_to_save": "modules_to_save"}
        ignored = sorted(k for k, v in config.items()
                         if k not in known and k not in NO_EFFECT_ON_LOADING and v not in (None, False, [], {}))
        if ignored:
            warnings.warn(f"adapter_config.json keys not used by deltatune were ignored: {', '.join(ignored)}", stacklevel=2)
        kwargs = {ours: config[theirs] for theirs, ours in known.items() if config.get(theirs) is not None}
        return cls(**kwargs)


# --- the layer -----------------------------------------------------------------------------
LORA_LAYERS = (nn.Linear, Conv1D, nn.Embedding)


class LoRALayer(DeltaModule):
    """Wraps one ``nn.Linear``, ``Conv1D`` or ``nn.Embedding``; holds any number of named adapters.

    The base layer's weight W changes in two ways only, both undone exactly by this layer:
    a merged adapter adds s·B A, and a PiSSA adapter leaves the residual W − s·B₀A₀ (its
    initial factors). While a PiSSA adapter is switched off, its s·B₀A₀ x is added back in the
    forward, so ``disabled()`` and the other adapters see the original W.
    """

    def __init__(self, base_layer: nn.Module, shared_weight: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self.transposed = stored_transposed(base_layer)  # weight is (in × out)
        self.in_features, self.out_features = layer_sizes(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.biases = nn.ParameterDict()  # adapters that train the bias: their own copy of it
        self.dropout: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.svd_init_state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA's A₀, B₀ (fp32)
        # PiSSA adapters whose A₀, B₀ come with the saved tensors (QLoRA's QPiSSA): name → where
        # load_adapter_state writes the residual W − s·B₀A₀ (see keep_svd_residual)
        self.svd_init_on_load: dict[str, Callable[[torch.Tensor], None]] = {}
        self.store = WeightStore(base_layer, shared_weight)
        self._merged: list[str] = []

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `.weight` of a projection still works
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # --- adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    init: str = "kaiming", train_bias: bool = False) -> None:
        if self._merged:
            raise DeltatuneError("Cannot add an adapter while others are merged; unmerge first.")
        weight = self.base_layer.weight
        kwargs = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        scale = lora_scale(rank, alpha, rslora)
        lora_A = torch.empty(rank, self.in_features, **kwargs)
        lora_B = torch.zeros(self.out_features, rank, **kwargs)
        if init == "pissa":
            lora_A, lora_B = self._take_svd_init(name, rank, scale)
        elif init == "gaussian":
            nn.init.normal_(lora_A, std=1.0 / rank)
        elif self.is_embedding:  # peft's convention for embeddings: A zero, B normal
            lora_A.zero_()
            nn.init.normal_(lora_B)
        else:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(lora_A.to(**kwargs))
        self.lora_B[name] = nn.Parameter(lora_B.to(**kwargs))
        self.dropout[name] = dropout
        self.scaling[name] = scale
        if train_bias and self.bias is not None:
            self.biases[name] = nn.Parameter(self.bias.detach().clone())
        self.active_adapters = self.active_adapters or (name,)

    def _take_svd_init(self, name: str, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA: A, B from the top-r singular triplets; the base weight keeps the residual."""
        lora_A, lora_B, residual = svd_init(self._weight_out_in(), rank, scale)
        self.store.write_weight(residual.T if self.transposed else residual)
        self.svd_init_state[name] = (lora_A.clone(), lora_B.clone())
        return lora_A, lora_B

    def keep_svd_residual(self, name: str, init_A: torch.Tensor, init_B: torch.Tensor,
                          write_residual: Callable[[torch.Tensor], None]) -> None:
        """PiSSA's split from given factors A₀ (r × in), B₀ (out × r): ``write_residual`` gets
        W − s·B₀A₀ (fp32, the weight's own layout) and stores it, and the forward adds s·B₀A₀ back
        while ``name`` is off. One expression for a fresh split and a reloaded one, so both give
        the same residual bit for bit (QLoRA quantises it: the same NF4 codes)."""
        residual = read_weight(self.base_layer).float() - lora_delta(init_A, init_B, self.scaling[name], self.transposed)
        write_residual(residual)
        self.svd_init_state[name] = (init_A.detach().float().clone(), init_B.detach().float().clone())

    def _weight_out_in(self) -> torch.Tensor:
        weight = read_weight(self.base_layer).float()
        return weight.T if self.transposed else weight

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        params = {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name]}
        if name in self.biases:
            params["bias"] = self.biases[name]
        return params

    def composition_conflict(self, names: Sequence[str]) -> str | None:
        """Active adapters sum here (h = Wx + Σ s·B A x); only their own trained biases cannot: one bias runs."""
        own_bias = [n for n in names if n in self.biases]
        if len(own_bias) > 1:
            return (f"{', '.join(map(repr, own_bias))} each train their own bias, and one layer runs one bias; "
                    "keep bias='none' on all but one of them")
        return None

    def _keys(self) -> tuple[str, str]:
        return ("lora_embedding_A", "lora_embedding_B") if self.is_embedding else ("lora_A.weight", "lora_B.weight")

    def peft_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key_A, key_B = self._keys()
        lora_A, lora_B = tensors["lora_A"], tensors["lora_B"]
        if name in self.svd_init_state:  # W_res + B A = W + [B, −B₀] [A; A₀]: a plain LoRA of rank 2r
            init_A, init_B = self.svd_init_state[name]
            lora_A = torch.cat([lora_A, init_A.to(lora_A)], dim=0)
            lora_B = torch.cat([lora_B, -init_B.to(lora_B)], dim=1)
        state = {key_A: lora_A, key_B: lora_B}
        if "bias" in tensors:
            state[BIAS_KEY] = tensors["bias"]
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        key_A, key_B = self._keys()
        if "bias" in state:  # deltatune 0.1 wrote a wrapped layer's bias as "bias"
            state = {**state, BIAS_KEY: state.pop("bias")}
        write_residual = self.svd_init_on_load.pop(name, None)
        if write_residual is not None:  # PiSSA saved as [A; A₀], [B, −B₀] on W: split back, A₀ B₀ from the file
            rank = self.lora_A[name].shape[0]
            check_shapes(where, {key_A: torch.Size([2 * rank, self.in_features]),
                                 key_B: torch.Size([self.out_features, 2 * rank])}, state)
            initial = (state[key_A][rank:], -state[key_B][:, rank:])
            state = {**state, key_A: state[key_A][:rank], key_B: state[key_B][:, :rank]}
        rank = self.lora_A[name].shape[0]
        if key_A in state and state[key_A].dim() == 2 and state[key_A].shape[0] != rank:
            raise DeltatuneError(f"Adapter tensor '{where}.{key_A}' has rank {state[key_A].shape[0]}, but "
                                 f"adapter_config.json gives this layer rank {rank} (r, rank_pattern); the config "
                                 "does not belong to these weights: save the adapter again.")
        expected = {key_A: self.lora_A[name].shape, key_B: self.lora_B[name].shape}
        check_shapes(where, expected, state)
        self._check_finite_delta(name, state[key_A], state[key_B], where)
        if name in self.svd_init_state:  # the file is a plain LoRA on the original W
            self._restore_svd_residual(name)
        with torch.no_grad():
            self.lora_A[name].copy_(state[key_A])
            self.lora_B[name].copy_(state[key_B])
            if BIAS_KEY in state and self.bias is not None:
                check_shapes(where, {BIAS_KEY: self.bias.shape}, state)
                if name not in self.biases:
                    self.biases[name] = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
                self.biases[name].copy_(state[BIAS_KEY])
        if write_residual is not None:
            self.keep_svd_residual(name, *initial, write_residual)

    def _check_finite_delta(self, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, where: str) -> None:
        """Refuse factors whose s·B A overflows the layer's dtype (lora_alpha: 1e308): every |s·(B A)_ij| is
        at most s·r·max|B|·max|A|, so only when that bound overflows is the product itself computed."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        largest, scale = torch.finfo(dtype).max, abs(self.scaling[name])
        bound = scale * lora_A.shape[0] * float(lora_A.abs().max()) * float(lora_B.abs().max())
        if scale > largest or (not bound < largest and not bool(
                torch.isfinite(lora_delta(lora_A, lora_B, self.scaling[name]).to(dtype)).all())):
            raise DeltatuneError(f"Adapter '{where}' scales B·A by {self.scaling[name]:.4g} (lora_alpha / r), which "
                                 "overflows to infinite weights; fix lora_alpha in adapter_config.json.")

    def _restore_svd_residual(self, name: str) -> None:
        """Give back PiSSA's s·B₀A₀ to the base weight: it is W again as far as ``name`` goes."""
        init_A, init_B = self.svd_init_state.pop(name)
        if not self._merged and not self.svd_init_state and self.store.restore_weight():
            return  # the original tensor itself (tied or quantised weights keep it)
        delta = lora_delta(init_A, init_B, self.scaling[name], self.transposed)
        self.store.write_weight(read_weight(self.base_layer).float() + delta.to(self.base_layer.weight.device))

    def delete_adapter(self, name: str) -> None:
        if name in self._merged:
            raise DeltatuneError(f"Adapter {name!r} is merged; unmerge it before deleting it.")
        if name in self.svd_init_state:
            self._restore_svd_residual(name)
        for container in (self.lora_A, self.lora_B):
            del container[name]
        if name in self.biases:
            del self.biases[name]
        self.scaling.pop(name)
        self.dropout.pop(name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    # --- merge ---------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> tuple[str, ...]:
        return tuple(self._merged)

    def delta(self, name: str) -> torch.Tensor:
        """s·B A in the base weight's own layout (fp32)."""
        return lora_delta(self.lora_A[name], self.lora_B[name], self.scaling[name], self.transposed)

    def merge(self, names: Iterable[str]) -> None:
        names = [n for n in dict.fromkeys(names) if n in self.lora_A and n not in self._merged]
        if not names:
            return
        # summed in fp32 and rounded once; a tied weight is replaced, not written, so the module
        # that shares it (the output head) keeps the original
        weight = read_weight(self.base_layer).float()
        for name in names:
            weight = weight + self.delta(name)
        self.store.write_weight(weight)
        bias_from = [n for n in names if n in self.biases]
        if bias_from:
            self.store.write_bias(self.biases[bias_from[-1]])
        self._merged.extend(names)

    def unmerge(self) -> None:
        if not self._merged:
            return  # nothing merged: the weight is not touched at all
        merged, self._merged = self._merged, []
        self.store.restore_bias()
        if not self.svd_init_state and self.store.restore_weight():
            return  # the original tensor itself: bit-exact, ties kept
        weight = read_weight(self.base_layer).float()
        for name in merged:
            weight = weight - self.delta(name)
        self.store.write_weight(weight)

    def unload(self) -> nn.Module:
        """The base layer with merged adapters folded in; PiSSA residuals of unmerged ones given back."""
        for name in [n for n in self.svd_init_state if n not in self._merged]:
            self._restore_svd_residual(name)
        return self.base_layer

    # --- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_adapter_names is not None:
            return self._forward_per_example(x)
        terms = self._fused_terms(x)
        if terms is not None:  # one adapter on a plain nn.Linear: training's kernel, decoding's two matmuls
            return fused_lora_linear(x, *terms)
        running = [n for n in self.active_adapters if n not in self._merged] if self._merged else self.active_adapters
        out = self._base_forward(x, self._bias_for(running))
        for name in running:
            out = out + self._lora(x, name).to(out.dtype)
        for name in self._svd_inits_to_restore(running):
            out = out + self._svd_init_term(x, name).to(out.dtype)
        return out

    def _fused_terms(self, x: torch.Tensor) -> tuple | None:
        """(W, b, A, B, s, dropout) of the one running adapter when this layer's forward is
        x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ on a frozen (or, without grad, any) ``nn.Linear`` in ``x``'s dtype
        (``LinearTerms``' fields, in order); None for the general path. The module dicts are read
        directly: decoding calls this for every projection and token, and at batch 1 nn.Module's
        attribute lookups cost more than the layer's matmuls."""
        running, base = self.active_adapters, self._modules["base_layer"]
        if len(running) != 1 or self._merged or type(base) is not nn.Linear:
            return None
        if self.svd_init_state and self._svd_inits_to_restore(running):
            return None
        name, base = running[0], base._parameters
        weight, lora_A = base["weight"], self._modules["lora_A"]._parameters[name]
        if ((weight.requires_grad and torch.is_grad_enabled()) or torch.is_autocast_enabled(x.device.type)
                or not x.dtype == weight.dtype == lora_A.dtype):
            return None
        own_bias = self._modules["biases"]._parameters
        return (weight, own_bias[name] if name in own_bias else base["bias"], lora_A,
                self._modules["lora_B"]._parameters[name], self.scaling[name],
                self.dropout[name] if self.training else 0.0)

    def _bias_for(self, running: Sequence[str]) -> torch.Tensor | None:
        """The running adapter's own bias if it trains one, else the base layer's."""
        own = self._modules["biases"]._parameters
        if own:
            names = [n for n in running if n in own]
            if names:
                return own[names[-1]]
        return self.bias

    def _base_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is self.bias:
            return self.base_layer(x)
        return functional_call(self.base_layer, {"bias": bias}, (x,))

    def _svd_inits_to_restore(self, running: Sequence[str]) -> list[str]:
        """PiSSA adapters neither running nor merged: the base weight lacks their s·B₀A₀."""
        return [n for n in self.svd_init_state if n not in running and n not in self._merged]

    def linear_terms(self, x: torch.Tensor) -> LinearTerms | None:
        """This layer's forward on ``x`` as x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ with at most one adapter
        (A = B = None: none running), for a kernel that fuses it with its neighbours (the gated
        MLP); None when it is more than that. ``x`` is the input's stand-in for dtype and device."""
        if self.batch_adapter_names is not None or self._merged:
            return None
        running = self.active_adapters
        if not running:
            if self._svd_inits_to_restore(running) or type(self.base_layer) is not nn.Linear:
                return None
            return LinearTerms(self.base_layer.weight, self.bias)
        terms = self._fused_terms(x)
        return None if terms is None else LinearTerms(*terms)

    def _low_rank(self, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                  dropout: float = 0.0) -> torch.Tensor:
        """s·B (A x), for a linear layer or an embedding lookup."""
        if self.is_embedding:  # A is (r × vocab): row lookup of Aᵀ
            hidden = F.embedding(x, lora_A.T, self.base_layer.padding_idx)  # (..., r)
        else:
            if dropout > 0:
                x = F.dropout(x, dropout, self.training)
            hidden = F.linear(x.to(lora_A.dtype), lora_A)  # (..., in) -> (..., r)
        # scale the narrow (..., r) hidden, not the wide output: one small multiply instead of a big one
        return F.linear(hidden * scale, lora_B)  # (..., r) -> (..., out)

    def _lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self._low_rank(x, self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name])

    def _svd_init_term(self, x: torch.Tensor, name: str) -> torch.Tensor:
        init_A, init_B = (t.to(x.device) for t in self.svd_init_state[name])
        dtype = x.dtype if x.is_floating_point() else init_A.dtype
        return self._low_rank(x, init_A.to(dtype), init_B.to(dtype), self.scaling[name])

    def _forward_per_example(self, x: torch.Tensor) -> torch.Tensor:
        """Each example of the batch uses its own adapter ("__base__": none): two matmuls for every
        adapter at once (``per_example``), or, where that does not apply (dropout while training, an
        adapter's own bias, PiSSA, embeddings), each adapter on its rows."""
        if not (self.is_embedding or self.biases or self.svd_init_state
                or (self.training and any(self.dropout[name] > 0 for name in self.lora_A))):
            names = self.batch_adapter_names
            if len(names) == x.shape[0] and not self._merged:  # else the general path says what is wrong
                base = self._modules["base_layer"]
                out = F.linear(x, base.weight, base.bias) if type(base) is nn.Linear else base(x)
                stacked, slots = self._stacked(), self._slots(tuple(names), x.device)
                return add_per_example_low_rank(out, x, stacked, slots, self._wide(stacked, slots))
        rows_of = self.rows_per_adapter(x.shape[0], x.device)
        out = self.base_layer(x).clone()
        for name, rows in rows_of.items():
            if name in self.lora_A:
                out[rows] = out[rows] + self._lora(x[rows], name).to(out.dtype)
                if name in self.biases:  # its own bias instead of the base layer's
                    out[rows] = out[rows] + (self.biases[name] - self.bias).to(out.dtype)
        for name in self.svd_init_state:  # PiSSA: rows that do not run it see W = W_res + s·B₀A₀
            rows = torch.cat([r for other, r in rows_of.items() if other != name] or [rows_of[name][:0]])
            if rows.numel():
                out[rows] = out[rows] + self._svd_init_term(x[rows], name).to(out.dtype)
        return out

    def _stacked(self) -> Stacked:
        """``stacked_factors`` of this layer's adapters, in ``lora_A``'s order. Kept between calls while
        no gradient is wanted and no factor changed (decoding a mixed batch reuses it every step); the
        parameter dicts are read directly, because at decode sizes attribute lookups cost more than the math."""
        lora_A, lora_B = self._modules["lora_A"]._parameters, self._modules["lora_B"]._parameters
        if torch.is_grad_enabled():
            factors = [(a, lora_B[n], self.scaling[n]) for n, a in lora_A.items()]
            return stacked_factors(factors, factors[0][0].dtype)
        key = tuple((a._version, a.data_ptr(), a.dtype, lora_B[n]._version, lora_B[n].data_ptr(), self.scaling[n])
                    for n, a in lora_A.items())
        cached = self.__dict__.get("_stacked_cache")
        if cached is None or cached[0] != key:
            factors = [(a, lora_B[n], self.scaling[n]) for n, a in lora_A.items()]
            cached = self.__dict__["_stacked_cache"] = (key, stacked_factors(factors, factors[0][0].dtype))
        return cached[1]

    def _slots(self, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """Each row's slot in ``_stacked``: its adapter's place in ``lora_A``, or the zero slot for a row
        whose adapter this layer does not have ("__base__", an adapter on other layers only)."""
        key = (names, tuple(self._modules["lora_A"]._parameters), device)
        cached = self.__dict__.get("_slots_cache")
        if cached is None or cached[0] != key:
            slots = {name: slot for slot, name in enumerate(key[1])}
            rows = torch.tensor([slots.get(name, len(slots)) for name in names], device=device)
            cached = self.__dict__["_slots_cache"] = (key, rows)
        return cached[1]

    def _wide(self, stacked: Stacked, slots: torch.Tensor) -> Wide | None:
        """``wide_factors`` of the kept stack and slots, kept with them while no gradient is wanted (a
        decode step reuses the last step's); None otherwise, and the kernel makes its own if it needs one."""
        if torch.is_grad_enabled():
            return None
        cached = self.__dict__.get("_wide_cache")
        if cached is None or cached[0] is not stacked or cached[1] is not slots:
            cached = self.__dict__["_wide_cache"] = (stacked, slots, wide_factors(stacked, slots))
        return cached[2]

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"ranks={ranks}, transposed={self.transposed}"


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scale: float, dropout: float) -> torch.Tensor:
    """x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ: through the fused autograd kernel when a gradient is wanted,
    else as two in-place matmuls with no autograd bookkeeping (decoding, evaluation)."""
    if torch.is_grad_enabled():
        return FusedLoRALinear.apply(x, weight, bias, lora_A, lora_B, scale, dropout)
    return lora_linear_without_grad(x, weight, bias, lora_A, lora_B, scale, dropout)


def lora_linear_without_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                             lora_B: torch.Tensor, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ as two in-place matmuls, for callers that want no gradient."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    hidden = F.linear(F.dropout(x2, dropout) if dropout > 0 else x2, lora_A)  # (N, r)
    out = F.linear(x2, weight, bias)  # (N, out): addmm / mm, as in the fused kernel
    out.addmm_(hidden, lora_B.T, alpha=scale)
    return out.view(*x.shape[:-1], out.shape[-1])


class FusedLoRALinear(torch.autograd.Function):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ for a frozen ``nn.Linear``, with a hand-written backward
    (the math is in ``gated_mlp.low_rank_linear``, shared with the fused gated MLP).

    Faster than two autograd graphs: the LoRA term is added into the base output in place
    (addmm_), and the backward fuses dx = g W + s·(g B) A into one buffer. Leaner with dropout:
    it keeps a 1-byte keep-mask instead of a second full-size copy of the dropped input
    (peft keeps dropout(x) for A's gradient).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        out, hidden, keep = low_rank_linear(x2, weight, bias, lora_A, lora_B, scale, dropout)  # (N, out)
        ctx.save_for_backward(x2, hidden, weight, lora_A, lora_B, keep)
        ctx.scale, ctx.dropout, ctx.in_shape = scale, dropout, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, hidden, weight, lora_A, lora_B, keep = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], *ctx.needs_input_grad[3:5])  # x, b, A, B
        d_x, d_bias, d_A, d_B = low_rank_linear_backward(g, x2, weight, lora_A, lora_B, ctx.scale, ctx.dropout,
                                                         hidden, keep, needs)
        d_x = d_x.view(ctx.in_shape) if d_x is not None else None
        return d_x, None, d_bias, d_A, d_B, None, None


class TrainedBias(DeltaModule):
    """bias="all": a module that LoRA does not wrap trains its bias — as a copy per adapter, so
    the original stays for ``disabled()`` and for the other adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.biases = nn.ParameterDict()
        self.store = WeightStore(base_layer, shared=True)
        self._merged: list[str] = []

    def __getattr__(self, attr: str) -> Any:
        try:
            return super().__getattr__(attr)
        except AttributeError:
            return getattr(self._modules["base_layer"], attr)

    def add_adapter(self, name: str) -> None:
        self.biases[name] = nn.Parameter(self.base_layer.bias.detach().clone())
        self.active_adapters = self.active_adapters or (name,)

    def adapter_names(self) -> list[str]:
        return list(self.biases.keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"bias": self.biases[name]}

    def peft_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"bias": tensors["bias"]}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        check_shapes(where, {"bias": self.biases[name].shape}, state)
        with torch.no_grad():
            self.biases[name].copy_(state["bias"])

    def delete_adapter(self, name: str) -> None:
        if name in self._merged:
            raise DeltatuneError(f"Adapter {name!r} is merged; unmerge it before deleting it.")
        del self.biases[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        return tuple(self._merged)

    def merge(self, names: Iterable[str]) -> None:
        names = [n for n in names if n in self.biases]
        if names:
            self.store.write_bias(self.biases[names[-1]])
            self._merged = names

    def unmerge(self) -> None:
        self.store.restore_bias()
        self._merged = []

    def unload(self) -> nn.Module:
        return self.base_layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapter_names is not None:
            return self._forward_per_example(*args, **kwargs)
        running = [n for n in self.active_adapters if n not in self._merged]
        if not running or self._merged:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, {"bias": self.biases[running[-1]]}, args, kwargs)

    def _forward_per_example(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Rows of the batch run with their own adapter's bias (the original for "__base__")."""
        out = self.base_layer(x, *args, **kwargs).clone()
        for name, rows in self.rows_per_adapter(x.shape[0], x.device).items():
            if name in self.biases:
                out[rows] = functional_call(self.base_layer, {"bias": self.biases[name]}, (x[rows], *args), kwargs)
        return out


def inject_trained_biases(model: nn.Module, adapter_name: str) -> list[str]:
    """bias="all": every bias outside LoRA's own layers trains, as adapter ``adapter_name``'s copy."""
    paths, inside = [], []
    for path, module in list(model.named_modules()):
        if not path or any(path.startswith(prefix) for prefix in inside):
            continue  # the root, or a module a delta already wraps (LoRA trains its layers' biases itself)
        if isinstance(module, DeltaModule):
            inside.append(path + ".")
            if isinstance(module, TrainedBias):
                module.add_adapter(adapter_name)
                paths.append(path)
            continue
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            wrapper = TrainedBias(module)
            model.set_submodule(path, wrapper)
            wrapper.add_adapter(adapter_name)
            inside.append(path + ".")
            paths.append(path)
    return paths
