"""How a delta reads and writes the frozen layer it adapts: one seam for every storage.

LoRA's merge, unmerge and PiSSA's residual change a base weight. They never touch
``layer.weight`` directly; they go through :func:`read_weight` / :class:`WeightStore`, and the
sizes come from the layer's attributes (:func:`layer_sizes`), never from ``weight.shape`` —
a 4-bit weight is a packed buffer whose shape says nothing about the layer. A new storage
(NF4 for QLoRA) is one more :class:`WeightBackend` in ``BACKENDS``, not a new layer family.

A write replaces the weight by a new parameter when the old one must survive — a weight tied
to another module (embeddings and output head) or a storage that cannot be written in place
(quantised) — and keeps the original, so that undoing every change gives back the very same
tensor: bit-exact, ties kept. A plain untied weight is written in place (no second copy).

The NF4 storage (QLoRA, Dettmers et al. 2023) is torchao's ``NF4Tensor`` behind
:class:`NF4Weight`, a frozen tensor of the layer's own shape and compute dtype: each block of
``block_size`` weights keeps 4-bit indices into the 16 NormalFloat levels and one absmax scale;
the scales are themselves quantised to 8 bits in groups of ``scaler_block_size`` (double
quantisation), about 4.127 bits per weight at 64 / 256. A layer whose size is not a multiple
of the blocks is handled by :func:`nf4_layout`: fewer blocks per scale group when they fit,
zero padding of the flattened weight otherwise. A write to an NF4 weight (a merge) stores the
dense result in the weight's original dtype — a merged layer is a plain layer — and keeps the
NF4 original for unmerge. Only bitsandbytes would be another backend here; it is not wired in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map
from transformers.pytorch_utils import Conv1D

from deltatune.errors import DeltatuneError


def layer_sizes(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer, read from its attributes."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    if isinstance(layer, Conv1D):  # GPT-2: weight is (in × out), y = x W + b
        return layer.nx, layer.nf
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    raise DeltatuneError(f"Cannot read the input and output sizes of {type(layer).__name__}; "
                         "LoRA supports nn.Linear, GPT-2's Conv1D and nn.Embedding.")


def stored_transposed(layer: nn.Module) -> bool:
    """True when the weight is stored (in × out): GPT-2's Conv1D and embedding tables."""
    return isinstance(layer, (Conv1D, nn.Embedding))


class WeightBackend(Protocol):
    """One kind of weight storage: how to see it as a dense tensor and how to store one."""

    writes_in_place: bool

    def handles(self, weight: torch.Tensor) -> bool: ...

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as an ordinary tensor in the layer's own layout (any float dtype)."""

    def stored(self, like: nn.Parameter, dense: torch.Tensor) -> nn.Parameter:
        """A new frozen parameter holding ``dense`` in ``like``'s storage kind and dtype."""


class DenseBackend:
    """Ordinary float weights (fp32, bf16, fp16)."""

    writes_in_place = True

    def handles(self, weight: torch.Tensor) -> bool:
        return type(weight) in (torch.Tensor, nn.Parameter)

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach()

    def stored(self, like: nn.Parameter, dense: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(dense.to(like.dtype), requires_grad=False)


# --- NF4: 4-bit NormalFloat with double-quantised scales (torchao) -------------------------
@dataclass(frozen=True)
class NF4Layout:
    """How one weight is cut for NF4: its flattened values in blocks of ``block_size`` (one
    scale each), the scales in groups of ``scaler_block_size`` (one 8-bit quantisation each),
    zero padding up to ``padded_numel``."""

    block_size: int
    scaler_block_size: int
    padded_numel: int

    def describe(self, numel: int) -> str:
        text = f"blocks of {self.block_size}, 8-bit scales in groups of {self.scaler_block_size}"
        return text + (f", zero-padded {numel} -> {self.padded_numel}" if self.padded_numel != numel else "")


def nf4_layout(numel: int, block_size: int = 64, scaler_block_size: int = 256) -> NF4Layout:
    """The layout for a weight of ``numel`` values: blocks of ``block_size`` (the last one
    zero-padded when it is short); scale groups of ``scaler_block_size`` when the block count
    divides, else the largest group between half that and that which divides it, else one group
    when there are fewer blocks than a group, else zero blocks padded up to whole groups."""
    blocks = math.ceil(numel / block_size)
    if blocks <= scaler_block_size:
        return NF4Layout(block_size, blocks, blocks * block_size)
    for group in range(scaler_block_size, scaler_block_size // 2 - 1, -1):
        if blocks % group == 0:
            return NF4Layout(block_size, group, blocks * block_size)
    groups = math.ceil(blocks / scaler_block_size)
    return NF4Layout(block_size, scaler_block_size, groups * scaler_block_size * block_size)


def _torchao_nf4() -> type:
    """torchao's NF4Tensor, imported on first use with its start-up noise (missing CUDA
    kernels, a pytree deprecation) kept off the user's terminal."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import NF4Tensor
    except ImportError:
        raise DeltatuneError("QLoRA needs torchao for its 4-bit weights; install it with 'pip install torchao'.") from None
    finally:
        logging.disable(previous)
    return NF4Tensor


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256,
                 compute_dtype: torch.dtype | None = None) -> "NF4Weight":
    """``weight`` (any shape, any float dtype) as an :class:`NF4Weight`, quantised from its fp32 values."""
    layout = nf4_layout(weight.numel(), block_size, scaler_block_size)
    flat = weight.detach().float().reshape(-1)  # (numel,)
    flat = F.pad(flat, (0, layout.padded_numel - flat.numel()))  # (padded_numel,)
    packed = _torchao_nf4().from_tensor(flat, layout.block_size, layout.scaler_block_size)
    return NF4Weight(packed, weight.shape, compute_dtype or weight.dtype, weight.dtype)


NF4_COMPONENTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


def nf4_components(weight: "NF4Weight") -> dict[str, torch.Tensor]:
    """The tensors that make up an NF4 weight, for a file: 4-bit codes packed two to a byte
    (uint8), 8-bit scales (int8), one fp32 factor per group of scales, the scales' fp32 mean, and
    the 16 NF4 levels. With its layout, shape and dtypes they rebuild it exactly."""
    return {name: getattr(weight.packed, name).detach().to("cpu").contiguous() for name in NF4_COMPONENTS}


def nf4_from_components(components: dict[str, torch.Tensor], layout: NF4Layout, shape: torch.Size,
                        dtype: torch.dtype, stored_dtype: torch.dtype) -> "NF4Weight":
    """The inverse of :func:`nf4_components`: the very same codes, scales and factors."""
    template = _torchao_nf4().from_tensor(torch.zeros(layout.block_size), layout.block_size, 1)  # for its metadata class
    _, meta = template.__tensor_flatten__()
    meta = {"block_size": layout.block_size, "scaler_block_size": layout.scaler_block_size,
            "n_blocks": layout.padded_numel // layout.block_size,
            "tensor_meta": dataclasses.replace(meta["tensor_meta"], original_shape=torch.Size([layout.padded_numel]),
                                               original_strides=(1,), storage_offset=0, dtype=torch.float32,
                                               device=components["quantized_data"].device, requires_grad=False)}
    packed = type(template).__tensor_unflatten__({name: components[name] for name in NF4_COMPONENTS}, meta, None, None)
    return NF4Weight(packed, torch.Size(shape), dtype, stored_dtype)


class NF4Weight(torch.Tensor):
    """A frozen weight in NF4, seen as a tensor of the layer's own shape and compute ``dtype``.

    ``packed`` is torchao's NF4Tensor over the flattened, zero-padded values. ``F.linear`` (and
    GPT-2's ``addmm``) run through :class:`_NF4Linear`, which dequantises to the compute dtype
    for the matmul and again in backward, so no dense copy outlives a layer's call and the
    weight gets no gradient. Any other operation sees the dequantised tensor; in-place writes
    are refused. ``stored_dtype`` is the dtype it was quantised from: what a write gives back.
    ``.to(dtype)`` (and ``model.to(dtype)``) keeps the codes and changes both dtypes.
    """

    packed: Any
    stored_dtype: torch.dtype

    @staticmethod
    def __new__(cls, packed: Any, shape: torch.Size, dtype: torch.dtype, stored_dtype: torch.dtype) -> "NF4Weight":
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device, requires_grad=False)

    def __init__(self, packed: Any, shape: torch.Size, dtype: torch.dtype, stored_dtype: torch.dtype) -> None:
        self.packed = packed
        self.stored_dtype = stored_dtype

    @property
    def layout(self) -> NF4Layout:
        return NF4Layout(self.packed.block_size, self.packed.scaler_block_size, self.packed.numel())

    def dequantize(self) -> torch.Tensor:
        """The weight as a plain tensor of its shape, in the compute dtype."""
        flat = self.packed.get_original_weight().reshape(-1)  # (padded_numel,) fp32
        return flat[: self.numel()].view(self.shape).to(self.dtype)

    def storage_bytes(self) -> int:
        """Bytes held: 4-bit codes, 8-bit scales, one fp32 factor per scale group and the scales' mean
        (torchao's 16-entry table of the levels, 64 bytes per layer, is left out, as in the paper)."""
        names = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")
        return sum(getattr(self.packed, n).numel() * getattr(self.packed, n).element_size() for n in names)

    def _with(self, packed: Any) -> "NF4Weight":
        return NF4Weight(packed, self.shape, self.dtype, self.stored_dtype)

    def _cast(self, device: torch.device | None, dtype: torch.dtype | None) -> "NF4Weight":
        """The same codes on ``device``, seen in ``dtype``: ``model.to(torch.bfloat16)`` makes bf16 the
        compute dtype and the dtype a merge writes, and keeps the weight in 4 bits."""
        packed = self.packed
        if device is not None and torch.device(device) != self.device:
            packed = torch.ops.aten._to_copy.default(packed, device=device)
        if dtype is None or dtype == self.dtype:
            return self._with(packed)
        return NF4Weight(packed, self.shape, dtype, dtype)

    def __repr__(self) -> str:
        return f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, {self.layout.describe(self.numel())})"

    def __deepcopy__(self, memo: dict) -> "NF4Weight":
        names, meta = self.packed.__tensor_flatten__()
        inner = {name: getattr(self.packed, name).clone() for name in names}
        return self._with(type(self.packed).__tensor_unflatten__(inner, meta, None, None))

    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        return ["packed"], (tuple(self.shape), self.dtype, self.stored_dtype)

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: tuple, outer_size: Any, outer_stride: Any) -> "NF4Weight":
        return NF4Weight(inner["packed"], torch.Size(meta[0]), meta[1], meta[2])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:  # nn.Linear: y = x Wᵀ + b
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, NF4Weight) and not isinstance(x, NF4Weight):
                return _NF4Linear.apply(x, weight, bias, False)
        if func is torch.addmm and len(args) == 3 and not kwargs and isinstance(args[2], NF4Weight):
            return _NF4Linear.apply(args[1], args[2], args[0], True)  # GPT-2's Conv1D: b + x W, W is (in × out)
        if func is torch.Tensor.is_floating_point:
            return args[0].dtype.is_floating_point
        if func is torch.Tensor.untyped_storage:  # its bytes are the packed tensors' (storage_bytes)
            raise NotImplementedError("an NF4 weight has no plain storage")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default, aten.clone.default):
            return args[0]._with(args[0].packed)  # never written in place: a clone may share the codes
        if func is aten._to_copy.default and (kwargs.get("dtype") or args[0].dtype).is_floating_point:
            return args[0]._cast(kwargs.get("device"), kwargs.get("dtype"))  # a move or a cast stays NF4
        if func._schema.is_mutable:
            raise DeltatuneError(f"A 4-bit (NF4) base weight cannot be changed in place ({func.__name__}); "
                                 "merge the adapter or load the base model without quantisation to edit it.")
        dense = lambda value: value.dequantize() if isinstance(value, NF4Weight) else value
        return func(*tree_map(dense, args), **tree_map(dense, kwargs))


class _NF4Linear(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantised in the compute dtype, forward and backward alike: only
    the NF4 weight is kept for backward, never a dense copy of it. W has no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
        dense = weight.dequantize()  # (out, in), or (in, out) for Conv1D
        dense = dense.T if transposed else dense
        ctx.weight, ctx.transposed, ctx.input_dtype = weight, transposed, x.dtype
        out = F.linear(x.to(dense.dtype), dense, None if bias is None else bias.to(dense.dtype))  # (..., out)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            dense = ctx.weight.dequantize()
            dense = dense.T if ctx.transposed else dense
            grad_x = (grad.to(dense.dtype) @ dense).to(ctx.input_dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[2]:  # an adapter's own trained bias
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0)
        return grad_x, None, grad_bias, None


class NF4Backend:
    """NF4 weights: read dequantised; a write stores a dense parameter in the original dtype
    (so a merged layer is a plain layer) and the store keeps the NF4 original for unmerge."""

    writes_in_place = False

    def handles(self, weight: torch.Tensor) -> bool:
        return isinstance(weight, NF4Weight)

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.dequantize()

    def stored(self, like: nn.Parameter, dense: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(dense.detach().to(like.stored_dtype), requires_grad=False)


BACKENDS: list[WeightBackend] = [DenseBackend(), NF4Backend()]


def backend_of(weight: torch.Tensor) -> WeightBackend:
    for backend in reversed(BACKENDS):  # later registrations (quantised storages) are more specific
        if backend.handles(weight):
            return backend
    raise DeltatuneError(f"deltatune cannot read a base weight stored as {type(weight).__name__}; "
                         "load the base model in a float dtype or as NF4.")


def read_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense tensor, in its own layout."""
    return backend_of(layer.weight).dense(layer.weight)


class WeightStore:
    """Writes one layer's weight (and bias) and can put back the originals it replaced."""

    def __init__(self, layer: nn.Module, shared: bool) -> None:
        self.layer = layer
        self.shared = shared  # tied to another module: never written in place
        self.original_weight: nn.Parameter | None = None
        self.original_bias: nn.Parameter | None = None

    def write_weight(self, dense: torch.Tensor) -> None:
        """Set the weight to ``dense`` (own layout, any float dtype); rounds once to the weight's dtype."""
        weight = self.layer.weight
        backend = backend_of(weight)
        if backend.writes_in_place and not self.shared:
            with torch.no_grad():
                weight.copy_(dense)
            return
        if self.original_weight is None:
            self.original_weight = weight
        self.layer.weight = backend.stored(weight, dense)

    def write_bias(self, bias: torch.Tensor) -> None:
        if self.original_bias is None:
            self.original_bias = self.layer.bias
        self.layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def restore_bias(self) -> None:
        if self.original_bias is not None:
            self.layer.bias, self.original_bias = self.original_bias, None

    def restore_weight(self) -> bool:
        """Put the original weight back when one was kept; False when the weight was written in place."""
        if self.original_weight is None:
            return False
        self.layer.weight, self.original_weight = self.original_weight, None
        return True
