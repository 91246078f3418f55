"""QLoRA: LoRA on a 4-bit NormalFloat base (Dettmers et al., 2023, arXiv 2305.14314).

The targeted linear layers keep their weight W in NF4 (frozen, no gradient, no optimizer
state): 4-bit codes in blocks of 64, one absmax scale per block, the scales quantised to 8 bits
in groups of 256 (double quantisation) — about 4.127 bits per weight. LoRA trains on top,
exactly as in ``lora.py``:

    h = deq(W_nf4) x + s · B (A x),    A: r × in,  B: out × r,  s = α / r   (rsLoRA: α / √r)

in the compute dtype (``"float32"``, ``"bfloat16"``, or ``"auto"``: the weight's own), which
is the dtype the weight is dequantised to and the dtype of A and B. The storage itself is a
backend of ``base_weight.py`` (``NF4Weight``), so the LoRA layer, its merge and the trainer do
not know the base is quantised. Layer sizes that are not multiples of the blocks get a layout
of their own (``nf4_layout``); the adapter config records each layer's.

Saved, a QLoRA adapter is a plain peft LoRA (A and B). ``adapter_config.json`` also carries
``deltatune_method: "qlora"`` and ``deltatune_quantization`` (the settings and each layer's
layout), so ``load_adapter`` on the full-precision base quantises it again — deterministically,
to the very same codes — and the outputs equal the training-time model's. peft reads the folder
as a LoRA for the full-precision base: its outputs differ by the quantisation error.

Merge: deq(W_nf4) + s·B A summed in fp32 and stored dense in the base's dtype, a plain model.
``reference_method()`` is the same LoRA on the full-precision base, so ``deltatune merge`` can
report both the float noise of the merge and the quantisation error. ``requantize`` stores a
merged model's linear weights in NF4 again (``deltatune merge --requantize``).

PiSSA init (QPiSSA, Meng et al. 2024, arXiv 2404.02948, section 4.3): A₀, B₀ from the top-r
singular triplets of the full-precision W (s·B₀A₀ = U_r S_r V_rᵀ), rounded to the adapter's
dtype, and the *residual* is quantised:

    h = deq(nf4(W − s·B₀A₀)) x + s · B (A x),    A = A₀, B = B₀ at init

so the quantisation error is that of the residual, which lacks W's largest directions. Saved,
it is LoRA's PiSSA file: the rank-2r LoRA [A; A₀], [B, −B₀] on the original W (peft loads it
on the full-precision base), plus ``deltatune_quantization.pissa`` (the rank-r settings). A
load splits each layer's tensors back and quantises W − s·B₀A₀ from the file's own A₀, B₀
(``LoRALayer.svd_init_on_load``): no SVD is redone, and the codes are the training-time ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base_weight import NF4Layout, NF4Weight, nf4_layout, quantize_nf4, read_weight
from deltatune.methods.lora import LORA_LAYERS, LoRA, LoRALayer, svd_init
from deltatune.methods.protocol import Capabilities, DeltaModule, Method, shared_parameter_ids
from deltatune.methods.trained_copy import trained_modules
from deltatune.targets import ALL_LINEAR, LINEAR_TYPES, Targets, find_targets, plain_modules
from deltatune.validation import require_choice, require_size

COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
BACKENDS = ("torchao", "bitsandbytes")  # bitsandbytes: the seam for CUDA's 4-bit kernels, not wired in yet
QUANTIZATION_KEYS = ("block_size", "scaler_block_size", "compute_dtype", "backend")
PISSA_KEYS = ("rank", "alpha", "rank_pattern", "alpha_pattern")  # what a PiSSA file's rank-2r config doubles


@dataclass(frozen=True)
class QLoRA(LoRA):
    """LoRA's options (``rank``, ``alpha``, ``targets``, ...) on a base quantised to NF4.

    ``targets`` defaults to every linear layer but the output head (the paper's setting);
    those layers are quantised, embeddings, norms and heads keep their dtype. ``block_size``
    values share a scale; ``scaler_block_size`` scales share one 8-bit quantisation.
    """

    targets: Targets = ALL_LINEAR
    block_size: int = 64
    scaler_block_size: int = 256
    compute_dtype: str = "auto"
    backend: str = "torchao"

    cli_name: ClassVar[str] = "qlora"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_size("block_size", self.block_size)
        require_size("scaler_block_size", self.scaler_block_size)
        if self.block_size % 2:
            raise DeltatuneError(f"block_size must be even (NF4 packs two 4-bit codes per byte), got {self.block_size}; "
                                 "use 64, the paper's value.")
        require_choice("compute_dtype", self.compute_dtype, tuple(COMPUTE_DTYPES))
        require_choice("backend", self.backend, BACKENDS)

    # --- Method protocol -----------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        # every promise is about the prepared (quantised) base: at init the output equals it,
        # disabled() gives it, merged = unmerged up to the fp32 sum's rounding
        return Capabilities(mergeable=True, per_example_adapters=True, exact_reload=True)

    def prepare_base(self, model: nn.Module) -> nn.Module:
        """Store the weights of the targeted linear layers in NF4, in place (layers already in
        NF4 with these settings stay as they are; tied weights stay dense). With PiSSA init the
        base the adapter runs on is deq(nf4(W − s·B₀A₀)) + s·B₀A₀, stored dense: what
        ``disabled()`` gives, closer to W than deq(nf4(W)) is."""
        if self.init == "pissa":
            scratch = "__prepare_base__"
            self.inject(model, scratch)
            for path, module in [(p, m) for p, m in model.named_modules() if isinstance(m, DeltaModule)]:
                if module.adapter_names() == [scratch]:
                    model.set_submodule(path, module.unload())  # PiSSA's s·B₀A₀ given back to the NF4 residual
            return model
        for layer in self._layers_to_quantize(model):
            self._nf4_writer(layer)(layer.weight)
        return model

    def reference_method(self) -> Method:
        """The saved adapter as a LoRA on the full-precision base: the same LoRA, or for PiSSA the
        rank-2r LoRA its file holds (as ``LoRA.peft_config`` writes it)."""
        lora = LoRA(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoRA)})
        if self.init != "pissa":
            return lora
        growth = math.sqrt(2) if self.rslora else 2.0  # keeps s = α/r (α/√r) at rank 2r
        alpha_pattern = {key: growth * value for key, value in self.alpha_pattern.items()}
        alpha_pattern.update({key: growth * self.alpha for key in self.rank_pattern if key not in self.alpha_pattern})
        return dataclasses.replace(lora, init="kaiming", rank=2 * self.rank, alpha=growth * self.alpha,
                                   rank_pattern={key: 2 * value for key, value in self.rank_pattern.items()},
                                   alpha_pattern=alpha_pattern)

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        if self.init != "pissa":
            self.prepare_base(model)
            return super().inject(model, adapter_name)
        quantized = {id(layer) for layer in self._layers_to_quantize(model, pissa=True)}
        plain = LoRA(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoRA)} | {"init": "kaiming"})
        paths = plain.inject(model, adapter_name)  # A, B placed, W untouched: the split follows
        for path in paths:
            layer = model.get_submodule(path)
            if not isinstance(layer, LoRALayer) or adapter_name not in layer.lora_A:
                continue  # a trained head or bias
            if id(layer.base_layer) in quantized:
                write = self._nf4_writer(layer.base_layer)
                dtype = COMPUTE_DTYPES[self.compute_dtype] or layer.weight.dtype
                for factors in (layer.lora_A, layer.lora_B):  # A and B in the compute dtype, as on an NF4 weight
                    factors[adapter_name] = nn.Parameter(factors[adapter_name].detach().to(dtype))
            else:  # an embedding or a tied weight: PiSSA on the dense weight, as LoRA does
                write = layer.store.write_weight
            self._split(layer, adapter_name, write)
        return paths

    def _split(self, layer: LoRALayer, name: str, write_residual: Callable[[torch.Tensor], None]) -> None:
        """PiSSA's split, now: A₀, B₀ from W's top-r singular triplets, rounded to the adapter's
        dtype first (what the file will hold), then the residual from exactly those."""
        weight = read_weight(layer.base_layer).float()
        init_A, init_B, _ = svd_init(weight.T if layer.transposed else weight, layer.lora_A[name].shape[0],
                                     layer.scaling[name])
        with torch.no_grad():
            layer.lora_A[name].copy_(init_A)
            layer.lora_B[name].copy_(init_B)
        layer.keep_svd_residual(name, layer.lora_A[name].detach(), layer.lora_B[name].detach(), write_residual)

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        config = super().peft_config(model)
        layers = quantized_layers(model)
        config["deltatune_method"] = self.cli_name  # read back as QLoRA; peft ignores deltatune_* keys
        config["deltatune_quantization"] = {"format": "nf4", "double_quantization": True, "layers": layers,
                                            **{key: getattr(self, key) for key in QUANTIZATION_KEYS}}
        if self.init == "pissa":  # the file is rank 2r on W; the adapter itself is rank r on the NF4 residual
            config["deltatune_quantization"]["pissa"] = {key: getattr(self, key) for key in PISSA_KEYS}
        config["deltatune_quantized_base"] = describe_quantized_layers(layers) + (
            f"; PiSSA init: the residual W - s*B0A0 is in NF4, the adapter has rank {self.rank} (the file: rank "
            f"{2 * self.rank} on W)" if self.init == "pissa" else "")
        return config

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "QLoRA":
        quantization = config.get("deltatune_quantization") or {}
        lora = LoRA.from_peft_config({k: v for k, v in config.items() if not k.startswith("deltatune_")})
        settings = {f.name: getattr(lora, f.name) for f in dataclasses.fields(LoRA)}
        settings.update({key: quantization[key] for key in QUANTIZATION_KEYS if key in quantization})
        pissa = quantization.get("pissa")
        if not pissa:
            return cls(**settings)
        if not isinstance(pissa, dict) or config.get("r") != 2 * pissa.get("rank", 0):
            raise DeltatuneError(f"adapter_config.json's deltatune_quantization.pissa ({pissa!r}) does not fit its "
                                 f"rank r={config.get('r')!r} (a PiSSA QLoRA of rank r saves 2r); re-save the adapter.")
        return _SavedPiSSAQLoRA(**settings | {key: pissa[key] for key in PISSA_KEYS if key in pissa} | {"init": "pissa"})

    # --- helpers -------------------------------------------------------------------------
    def _quantizable_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(path, plain layer) of every linear layer LoRA targets, less the heads that train in full."""
        heads = trained_modules(model, self.modules_to_save)
        layers = []
        for path in find_targets(model, self.targets, LORA_LAYERS):
            layer = model.get_submodule(path)
            layer = getattr(layer, "base_layer", layer) if isinstance(layer, DeltaModule) else layer
            if isinstance(layer, LINEAR_TYPES) and not any(path == h or path.startswith(h + ".") for h in heads):
                layers.append((path, layer))
        return layers

    def _layers_to_quantize(self, model: nn.Module, pissa: bool = False) -> list[nn.Module]:
        """The plain layers whose weight goes to NF4, after every check (nothing changed before)."""
        self._require_backend()
        shared = shared_parameter_ids(model)
        dense = []
        for path, layer in self._quantizable_layers(model):
            if isinstance(layer.weight, NF4Weight):
                if pissa:
                    raise DeltatuneError(f"Layer '{path}' is already in NF4, and init='pissa' needs its full-precision "
                                         "weight; add the PiSSA QLoRA adapter first, or to a fresh base model.")
                self._require_same_quantization(path, layer.weight)
            elif id(layer.weight) not in shared:
                wrapper = model.get_submodule(path)
                if isinstance(wrapper, DeltaModule) and wrapper.adapter_names():
                    raise DeltatuneError(f"Layer '{path}' already carries adapter(s) {', '.join(wrapper.adapter_names())} "
                                         "on its full-precision weight; add the QLoRA adapter first, or to a fresh base model.")
                dense.append(layer)
        return dense

    def _nf4_writer(self, layer: nn.Module) -> Callable[[torch.Tensor], None]:
        """Stores a dense tensor (the layer's own layout) as the layer's weight in NF4, rounded to the
        weight's dtype first: a merge writes back in that dtype."""
        stored, dtype = layer.weight.dtype, COMPUTE_DTYPES[self.compute_dtype]

        def write(dense: torch.Tensor) -> None:
            layer.weight = nn.Parameter(quantize_nf4(dense.detach().to(stored), self.block_size, self.scaler_block_size,
                                                     dtype), requires_grad=False)
        return write

    def _require_same_quantization(self, path: str, weight: NF4Weight) -> None:
        wanted = nf4_layout(weight.numel(), self.block_size, self.scaler_block_size)
        dtype = COMPUTE_DTYPES[self.compute_dtype] or weight.stored_dtype
        if weight.layout != wanted or weight.dtype != dtype:
            raise DeltatuneError(f"Layer '{path}' is already in NF4 with other settings ({weight.layout.describe(weight.numel())}, "
                                 f"compute {weight.dtype}); give every QLoRA adapter of a model the same block_size, "
                                 "scaler_block_size and compute_dtype.")

    def _require_backend(self) -> None:
        if self.backend == "bitsandbytes":
            if not torch.cuda.is_available():
                raise DeltatuneError("backend='bitsandbytes' needs a CUDA GPU and this machine has none; use "
                                     "backend='torchao', whose NF4 runs on CPU and GPU.")
            raise DeltatuneError("backend='bitsandbytes' is not wired into deltatune yet; use backend='torchao', "
                                 "whose NF4 runs on CUDA too.")


@dataclass(frozen=True)
class _SavedPiSSAQLoRA(QLoRA):
    """``QLoRA(init="pissa")`` read from a saved folder: the same settings, but ``inject`` leaves
    the weights in full precision with their split pending, because the factors to split off come
    with the saved tensors, not from a new SVD (which another machine's BLAS could round
    differently). ``load_adapter_state`` then quantises W − s·B₀A₀ from the file's A₀, B₀."""

    def _split(self, layer: LoRALayer, name: str, write_residual: Callable[[torch.Tensor], None]) -> None:
        layer.svd_init_on_load[name] = write_residual


def requantize(model: nn.Module, layers: dict[str, dict[str, Any]] | None = None) -> nn.Module:
    """Store a plain model's linear weights in NF4, in place: the layers in ``layers`` (what
    :func:`quantized_layers` said of the model before its merge), each with its own layout and
    compute dtype; without them, every linear layer but the output head, with QLoRA's defaults."""
    if not layers:
        return QLoRA().prepare_base(model)
    for path, layout in layers.items():
        layer = model.get_submodule(path)
        weight = read_weight(layer)
        layer.weight = nn.Parameter(quantize_nf4(weight, layout["block_size"], layout["scaler_block_size"],
                                                 getattr(torch, layout["compute_dtype"])), requires_grad=False)
    return model


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every layer whose weight is in NF4: path → its layout (and its number of weights)."""
    layers = {}
    for path, layer in plain_modules(model):
        weight = getattr(layer, "weight", None)
        if isinstance(weight, NF4Weight):
            layout = weight.layout
            layers[path] = {"numel": weight.numel(), "block_size": layout.block_size,
                            "scaler_block_size": layout.scaler_block_size, "padded_numel": layout.padded_numel,
                            "compute_dtype": str(weight.dtype).removeprefix("torch.")}
    return layers


def describe_quantized_layers(layers: dict[str, dict[str, Any]]) -> str:
    """One line for ``deltatune info``: how many layers are in NF4, grouped by layout, with their names."""
    groups: dict[str, list[str]] = {}
    for path, layout in layers.items():
        text = NF4Layout(layout["block_size"], layout["scaler_block_size"], layout["padded_numel"]).describe(layout["numel"])
        groups.setdefault(text, []).append(path.rsplit(".", 1)[-1])
    parts = [f"{len(names)} in {text} ({', '.join(sorted(set(names)))})" for text, names in groups.items()]
    dtypes = ", ".join(sorted({layout["compute_dtype"] for layout in layers.values()}))
    return f"NF4, compute {dtypes}: {len(layers)} linear layers; " + "; ".join(parts)


def nf4_bits_per_weight(model: nn.Module) -> float:
    """Bits of storage per weight over every NF4 weight of ``model`` (codes, scales and their factors)."""
    weights = [layer.weight for _, layer in plain_modules(model) if isinstance(getattr(layer, "weight", None), NF4Weight)]
    if not weights:
        raise DeltatuneError("This model holds no NF4 weight; wrap it with deltatune.QLoRA(...) first.")
    return 8 * sum(w.storage_bytes() for w in weights) / sum(w.numel() for w in weights)
