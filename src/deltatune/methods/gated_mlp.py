"""A gated MLP (with LoRA projections or frozen ones) as one autograd function that keeps only what it must.

Llama's MLP (and every MLP whose forward is the same code: Mistral, Qwen2, Gemma...) is

    y = down( act(gate(x)) · up(x) )        x: (N, H),  g = gate(x), u = up(x): (N, I),  y: (N, H)

with each projection p(z) = z Wᵀ + b + s·(drop(z) Aᵀ) Bᵀ (a LoRA layer running one adapter) or
z Wᵀ + b (a frozen ``nn.Linear``). Run op by op, autograd keeps four (N, I) tensors per layer:
g (for act's gradient), act(g) and u (for the product's) and h = act(g)·u (for down's A
gradient). This function keeps g and u only, and recomputes act(g) and h in the backward, an
elementwise pass, as Unsloth's fast LoRA MLP does:

    dh = dy W_d + s·(dy B_d) A_d        dA_d = s·(dy B_d)ᵀ drop(h),  h = act(g)·u recomputed
    du = dh · act(g)                    dg = act'(g) · (dh · u)
    dx = dg W_g + du W_u + s·(dg B_g) A_g + s·(du B_u) A_u      (dropout masks applied as in the forward)

Forward values are the op-by-op ones bit for bit (the same kernels in the same order, dropout
masks drawn in the same order); gradients equal them up to summation order.

With every projection frozen (the prompt-learning methods, a bottleneck adapter, the frozen layers
of freeze tuning), op by op keeps g, act(g) and u; this keeps g and u.

``fuse_gated_mlps(model)`` (called by ``deltatune.wrap`` for every method) points the ``forward``
of every such MLP at ``gated_mlp_forward``; state dict, module tree and on-disk format do not
change, and ``deltatune.merge`` puts the module's own forward back (``unfuse_gated_mlps``).
Each call checks that the fused function computes what the module's own forward would (grad
enabled, no autocast, plain fp weights of one dtype, no hooks on the projections, each
projection a frozen ``nn.Linear`` (QLoRA's NF4 weight included) or one running LoRA adapter, no
per-example adapters) and otherwise runs the module's own forward (a trained projection, as in
full fine-tuning, included). ``DELTATUNE_FUSED_MLP=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import activations
from transformers.models.llama.modeling_llama import LlamaMLP

from deltatune.methods.base_weight import NF4Weight

SWITCH = "DELTATUNE_FUSED_MLP"  # "0" turns the fused gated MLP off
# tensors the fused function can take as they are: QLoRA's NF4 base dequantises itself in each
# matmul (forward and backward), so only its 4-bit codes are kept; a DTensor (sharded) is not here
KNOWN_TENSORS = (torch.Tensor, nn.Parameter, NF4Weight)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# deterministic, parameter-free, elementwise: recomputing one in the backward gives the same values
ELEMENTWISE_ACTIVATIONS = tuple(
    [nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish]
    + [getattr(activations, name) for name in ("SiLUActivation", "GELUActivation", "NewGELUActivation", "GELUTanh",
                                               "PytorchGELUTanh", "FastGELUActivation", "QuickGELUActivation",
                                               "AccurateGELUActivation", "MishActivation", "ReLUSquaredActivation")
       if isinstance(getattr(activations, name, None), type)])


def enabled() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


# --- one projection: z Wᵀ + b + s·(drop(z) Aᵀ) Bᵀ, forward and backward ------------------------
class LinearTerms(NamedTuple):
    """A projection as the fused kernels run it; ``lora_A`` = ``lora_B`` = None for a frozen linear."""

    weight: torch.Tensor  # (out, in), frozen
    bias: torch.Tensor | None  # (out,)
    lora_A: torch.Tensor | None = None  # (r, in)
    lora_B: torch.Tensor | None = None  # (out, r)
    scale: float = 0.0
    dropout: float = 0.0


def dense(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a plain tensor: an NF4 one dequantised (a transient copy), any other as it is."""
    return weight.dequantize() if isinstance(weight, NF4Weight) else weight


def low_rank_linear(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor | None,
                    lora_B: torch.Tensor | None, scale: float, dropout: float):
    """(z Wᵀ + b + s·(drop(z) Aᵀ) Bᵀ, the low-rank hidden drop(z) Aᵀ, the dropout keep-mask) for z: (N, in).

    The LoRA term goes into the base output in place (addmm_): no (N, out) temporary. With
    dropout the keep-mask (1 byte per element) is what the backward needs, not drop(z) itself.
    """
    weight = dense(weight)
    keep, hidden = None, None
    if lora_A is not None:
        dropped = z
        if dropout > 0:
            keep = torch.rand_like(z) >= dropout  # (N, in) bool
            dropped = z * keep / (1.0 - dropout)
        hidden = dropped @ lora_A.T  # (N, r)
    out = torch.addmm(bias, z, weight.T) if bias is not None else z @ weight.T  # (N, out)
    if hidden is not None:
        out.addmm_(hidden, lora_B.T, alpha=scale)  # + s·hidden Bᵀ
    return out, hidden, keep


def low_rank_linear_backward(grad: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor,
                             lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scale: float, dropout: float,
                             hidden: torch.Tensor | None, keep: torch.Tensor | None,
                             needs: tuple[bool, bool, bool, bool],
                             d_z: torch.Tensor | None = None):
    """(dz, db, dA, dB) of ``low_rank_linear`` for the output gradient ``grad`` (N, out); each only
    where ``needs`` (z, b, A, B) says so. ``z`` is read for dA only; dz is added into ``d_z`` if given."""
    need_z, need_b, need_A, need_B = needs
    weight = dense(weight) if need_z else weight
    d_hidden = (grad @ lora_B).mul_(scale) if lora_A is not None and (need_z or need_A) else None  # (N, r)
    if need_z:
        d_z = grad @ weight if d_z is None else d_z.addmm_(grad, weight)  # (N, in)
        if d_hidden is not None and keep is None:
            d_z.addmm_(d_hidden, lora_A)
        elif d_hidden is not None:
            d_z.add_((d_hidden @ lora_A) * keep, alpha=1.0 / (1.0 - dropout))
    d_A = d_hidden.T @ (z if keep is None else z * keep / (1.0 - dropout)) if need_A else None  # (r, in)
    d_B = (grad.T @ hidden).mul_(scale) if need_B else None  # (out, r)
    d_b = grad.sum(dim=0) if need_b else None  # an adapter's own trained bias
    return d_z, d_b, d_A, d_B


# --- the gated MLP ---------------------------------------------------------------------------
class GatedMLP(torch.autograd.Function):
    """y = down(act(gate(x)) · up(x)), keeping x, g, u (and rank-r hiddens, dropout masks)."""

    @staticmethod
    def forward(ctx, x, act, scales, dropouts, *tensors):  # tensors: (W, b, A, B) of gate, up, down
        gate, up, down = (tensors[i:i + 4] for i in range(0, 12, 4))
        x2 = x.reshape(-1, x.shape[-1])  # (N, H)
        g, hidden_g, keep_g = low_rank_linear(x2, *gate, scales[0], dropouts[0])  # (N, I)
        u, hidden_u, keep_u = low_rank_linear(x2, *up, scales[1], dropouts[1])  # (N, I)
        h = act(g).mul_(u)  # (N, I)
        y, hidden_d, keep_d = low_rank_linear(h, *down, scales[2], dropouts[2])  # (N, H)
        x_for_A = x2 if gate[2] is not None or up[2] is not None else None  # read for gate's and up's dA only
        ctx.save_for_backward(x_for_A, g, u, *(t for p in (gate, up, down) for t in (p[0], p[2], p[3])),
                              hidden_g, hidden_u, hidden_d, keep_g, keep_u, keep_d)
        ctx.act, ctx.scales, ctx.dropouts, ctx.in_shape = act, scales, dropouts, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x2, g, u, *saved = ctx.saved_tensors
        weights, hiddens, keeps = saved[:9], saved[9:12], saved[12:]
        gate, up, down = ([*weights[3 * i:3 * i + 3], ctx.scales[i], ctx.dropouts[i], hiddens[i], keeps[i]]
                          for i in range(3))  # W, A, B, scale, dropout, hidden, keep
        needs = [tuple(ctx.needs_input_grad[4 + 4 * i:8 + 4 * i]) for i in range(3)]  # (W, b, A, B) each
        need_x = ctx.needs_input_grad[0]
        need_inner = need_x or any(any(n[1:]) for n in needs[:2])  # anything that needs dg, du
        dy = grad.reshape(-1, grad.shape[-1])  # (N, H)

        with torch.enable_grad():  # act(g) again, with its graph: its backward is autograd's own
            g_leaf = g.detach().requires_grad_()
            a_graph = ctx.act(g_leaf)
        a = a_graph.detach()  # (N, I)
        h = a * u if needs[2][2] else None  # down's input, only for its dA
        d_h, d_bd, d_Ad, d_Bd = low_rank_linear_backward(dy, h, *down, (need_inner, *needs[2][1:]))
        d_x, grads_g, grads_u = None, (None, None, None), (None, None, None)
        if need_inner:
            d_u = torch.mul(d_h, a, out=h) if h is not None else d_h * a  # (N, I), in h's buffer
            d_g, = torch.autograd.grad(a_graph, g_leaf, d_h.mul_(u))  # act'(g) · (dh · u)
            del a, a_graph, d_h
            d_x, *grads_g = low_rank_linear_backward(d_g, x2, *gate, (need_x, *needs[0][1:]))
            d_x, *grads_u = low_rank_linear_backward(d_u, x2, *up, (need_x, *needs[1][1:]), d_z=d_x)
        d_x = d_x.view(ctx.in_shape) if d_x is not None else None
        return (d_x, None, None, None,
                None, *grads_g, None, *grads_u, None, d_bd, d_Ad, d_Bd)


def gated_mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module.forward(x)``: through ``GatedMLP`` where that computes the same, else the module's own."""
    if torch.is_grad_enabled():  # (checked first: decoding, one token at a time, pays for every lookup)
        terms = fusable_terms(module, x)
        if terms is not None:
            return GatedMLP.apply(x, module.act_fn, tuple(t.scale for t in terms), tuple(t.dropout for t in terms),
                                  *(tensor for t in terms for tensor in t[:4]))
    return type(module).forward(module, x)


def fusable_terms(module: nn.Module, x: torch.Tensor) -> list[LinearTerms] | None:
    """gate, up and down as ``LinearTerms`` when the fused function runs exactly this forward, else None."""
    if not (enabled() and torch.is_grad_enabled() and x.is_floating_point()):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    if not isinstance(module.act_fn, ELEMENTWISE_ACTIVATIONS) or getattr(module.act_fn, "inplace", False):
        return None  # recomputing it in the backward must give act(g) again, and g must survive it
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    terms = []
    for name in PROJECTIONS:  # the first that is not expressible (a trained weight, say) ends it
        term = _linear_terms(getattr(module, name), x)
        if term is None:
            return None
        terms.append(term)
    return terms


def _linear_terms(projection: nn.Module, x: torch.Tensor) -> LinearTerms | None:
    if projection._forward_hooks or projection._forward_pre_hooks:
        return None  # the fused function would skip them
    if type(projection) is nn.Linear:
        terms = LinearTerms(projection.weight, projection.bias)
    elif hasattr(projection, "linear_terms"):  # a LoRA layer running one adapter (or none)
        terms = projection.linear_terms(x)
        if terms is None:
            return None
    else:
        return None
    tensors = [t for t in (terms.weight, terms.bias, terms.lora_A, terms.lora_B) if t is not None]
    if terms.weight.requires_grad or any(type(t) not in KNOWN_TENSORS or t.dtype != x.dtype or t.device != x.device
                                         for t in tensors):
        return None  # a trained or sharded base weight, another dtype or device: the module's own forward
    return terms


# --- installing it --------------------------------------------------------------------------
def _code_key(function) -> tuple | None:
    code = getattr(function, "__code__", None)
    return None if code is None else (code.co_code, code.co_names, code.co_consts, code.co_varnames, code.co_argcount)


GATED_FORWARD = _code_key(LlamaMLP.forward)  # down_proj(act_fn(gate_proj(x)) * up_proj(x))


def is_gated_mlp(module: nn.Module) -> bool:
    """A module whose forward is Llama's MLP's, word for word, with an elementwise activation."""
    return (_code_key(type(module).forward) == GATED_FORWARD
            and all(isinstance(getattr(module, name, None), nn.Module) for name in PROJECTIONS)
            and isinstance(getattr(module, "act_fn", None), ELEMENTWISE_ACTIVATIONS))


def fuse_gated_mlps(model: nn.Module) -> list[str]:
    """Point the forward of every gated MLP at ``gated_mlp_forward``; idempotent. A module whose
    forward was replaced already (by another library's hooks) is left alone."""
    paths = []
    for path, module in model.named_modules():
        if not is_gated_mlp(module):
            continue
        current = module.__dict__.get("forward")
        if current is None:
            module.forward = functools.partial(gated_mlp_forward, module)
        elif not (isinstance(current, functools.partial) and current.func is gated_mlp_forward):
            continue
        paths.append(path)
    return paths


def unfuse_gated_mlps(model: nn.Module) -> None:
    """Give every MLP that ``fuse_gated_mlps`` pointed at ``gated_mlp_forward`` its own forward back."""
    for module in model.modules():
        current = module.__dict__.get("forward")
        if isinstance(current, functools.partial) and current.func is gated_mlp_forward:
            del module.__dict__["forward"]
