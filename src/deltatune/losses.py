"""The causal-LM training loss, computed only where labels are set, in chunks.

``model(**batch).loss`` makes logits for every position: a [batch, length, vocabulary] fp32
tensor, its log-softmax and its gradient, although an SFT batch scores only the answer tokens
(labels -100 on the prompt and the padding). ``model_loss(model, batch)`` returns the same
token-mean cross-entropy

    loss = (1/n) · Σ_{(b,t): y[b,t+1] ≠ -100}  CE(W·h[b,t] + c,  y[b,t+1])      n = number of targets

from the final hidden states h at the n scored positions only, a chunk of rows at a time, so
the full logits tensor never exists:

1. The model is called as the user would call it, labels included, so that a method that
   rewrites the call (virtual tokens before the input, slots masked in the labels) rewrites
   them too. A forward pre-hook on the causal LM, registered last, takes the labels back out
   of the rewritten call (so the model computes no loss), and a pre-hook on the output head
   takes its input h [B, S, H] and hands the head only the last position.
2. The model's logits at that position must equal head(h) there, bit for bit: then the logits
   are the head's plain output (not scaled, soft-capped or otherwise changed). Anything else
   falls back to ``model(**batch).loss``, and that model is not tried again.
3. For an ``nn.Linear`` head one autograd function computes, chunk by chunk, the logits, the
   loss and its gradients in the forward, and keeps only the gradients ([n, H], plus [V, H] when
   the head trains): three matmuls per chunk and no recompute. Any other head (an adapted
   one) runs per chunk under activation checkpointing, recomputed in the backward.

4. The last decoder layer's MLP runs on the scored positions only, when it is a Llama-style gated
   MLP with no hooks of its own and no gradient checkpointing re-runs it: what it gives the
   other positions reaches nothing the loss reads (the final norm and the head work position by
   position), so it gets zeros there. On a batch whose first half is prompt that is half of one
   layer's MLP, forward and backward.

Classifiers (labels [batch]), encoder-decoders, models whose forward takes no
``logits_to_keep`` (not a transformers causal LM), sharded heads (DTensor weights) and batches
with no target all use ``model(**batch).loss`` unchanged. ``DELTATUNE_LABEL_ONLY_LOSS=0`` in
the environment turns the whole thing off.
"""

from __future__ import annotations

import inspect
import os
import weakref
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
SWITCH = "DELTATUNE_LABEL_ONLY_LOSS"  # "0" turns label-only logits off
CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MiB in fp32, whatever the vocabulary
MIN_CHUNK_ROWS = 64  # fewer rows make the matmuls inefficient

_hosts: "weakref.WeakKeyDictionary[nn.Module, nn.Module | None]" = weakref.WeakKeyDictionary()
_refused: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # hosts whose logits are not head(hidden)


def model_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model(**batch).loss``, from the label positions' logits only where that is exact."""
    loss = label_only_loss(model, batch)
    return model(**batch).loss if loss is None else loss


def enabled() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def label_only_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The loss of ``model(**batch)`` from label positions only, or None where that is not exact
    (then the model ran once for nothing, and its host is not tried again)."""
    labels = batch.get("labels")
    if not enabled() or not torch.is_tensor(labels) or labels.ndim != 2:
        return None
    host = _causal_lm(model)
    if host is None or host in _refused:
        return None
    head = host.get_output_embeddings()
    if not isinstance(head, nn.Module) or any(_sharded(p) for p in head.parameters()):
        return None
    call = _ObservedCall(_last_mlp(host))
    handles = [host.register_forward_pre_hook(call.take_labels, with_kwargs=True),
               head.register_forward_pre_hook(call.take_hidden)]
    try:
        output = model(**batch)
    finally:
        for handle in handles + call.handles:
            handle.remove()
    if not call.separable(output, head):
        _refused.add(host)
        return None
    return _scored_loss(head, call.hidden, call.labels, vocabulary=output.logits.shape[-1])


class _ObservedCall:
    """What the two pre-hooks see of one call: the labels as the causal LM gets them, and the head's
    input; and, where ``last_mlp`` is given, that MLP run on the scored positions only."""

    def __init__(self, last_mlp: nn.Module | None = None) -> None:
        self.labels: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.head_calls = 0
        self.last_mlp = last_mlp
        self.handles: list = []
        self.rows: torch.Tensor | None = None  # flat indices of the scored positions, until the MLP takes them
        self.taken: torch.Tensor | None = None  # the rows the MLP ran on, until its output is put back
        self.shape: torch.Size | None = None  # the MLP input's [B, S, H]

    def take_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.labels = kwargs.pop("labels", None)  # the model computes no loss of its own
        if self.last_mlp is not None and torch.is_tensor(self.labels) and self.labels.ndim == 2:
            self.rows = _scored_positions(self.labels).flatten().nonzero().squeeze(1)
            self.handles += [self.last_mlp.register_forward_pre_hook(self.take_scored_rows),
                             self.last_mlp.register_forward_hook(self.put_rows_back)]
        return args, kwargs

    def take_scored_rows(self, module: nn.Module, args: tuple) -> tuple | None:
        """The MLP's input [B, S, H] → [1, n, H], its scored positions (once per call)."""
        x, rows = args[0], self.rows
        if rows is None or not torch.is_tensor(x) or x.ndim != 3 or x.shape[:2] != self.labels.shape:
            self.rows = None
            return None
        self.rows, self.shape = None, x.shape
        self.taken = rows.to(x.device)
        return (x.reshape(-1, x.shape[-1]).index_select(0, self.taken).unsqueeze(0),) + args[1:]

    def put_rows_back(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """[1, n, H] → [B, S, H] with zeros at the positions no loss reads."""
        taken, self.taken = self.taken, None
        if taken is None:
            return None
        full = output.new_zeros(self.shape[0] * self.shape[1], output.shape[-1])
        return full.index_copy(0, taken, output.squeeze(0)).view(*self.shape[:2], output.shape[-1])

    def take_hidden(self, module: nn.Module, args: tuple) -> tuple:
        self.head_calls += 1
        self.hidden = args[0]  # [B, S, H]
        return (args[0][:, -1:],) + args[1:]  # the head makes logits for the last position only

    def separable(self, output: Any, head: nn.Module) -> bool:
        """The call went as planned and its logits are the head's plain output."""
        logits = getattr(output, "logits", None)
        if (self.head_calls != 1 or self.labels is None or self.hidden is None or logits is None
                or self.hidden.ndim != 3 or self.labels.shape != self.hidden.shape[:2]):
            return False
        with torch.no_grad():
            expected = head(self.hidden[:, -1:])
        return logits.shape == expected.shape and torch.equal(logits.float(), expected.float())


def _next_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, S]: the label each position predicts (h[b, t] predicts labels[b, t+1]; the last none)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def _scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the positions whose next label is set."""
    return _next_labels(labels) != IGNORE_INDEX


def _last_mlp(host: nn.Module) -> nn.Module | None:
    """The last decoder layer's MLP, when it is a Llama-style gated MLP that nothing else hooks and
    no gradient checkpointing recomputes (the recompute would not see the scored rows)."""
    from deltatune.methods.gated_mlp import is_gated_mlp  # (methods import this module's users)

    decoder = getattr(host, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    if any(getattr(module, "gradient_checkpointing", False) is True for module in (host, decoder, layers[-1])):
        return None  # (transformers sets the flag on each checkpointed layer, older versions on the model)
    mlp = getattr(layers[-1], "mlp", None)
    if (not isinstance(mlp, nn.Module) or not is_gated_mlp(mlp) or mlp._forward_hooks or mlp._forward_pre_hooks
            or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks):
        return None
    return mlp


def _scored_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, vocabulary: int) -> torch.Tensor | None:
    predicted = _next_labels(labels).to(hidden.device)  # [B, S]
    scored = predicted != IGNORE_INDEX
    count = int(scored.sum())
    if count == 0:
        return None  # the plain loss is 0/0 (nan); let the model say so itself
    rows, targets = hidden[scored], predicted[scored]  # [n, H], [n]
    chunk = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, vocabulary))
    if type(head) is nn.Linear:
        total = _LinearCrossEntropy.apply(rows, head.weight, head.bias, targets, chunk, torch.is_grad_enabled())
    else:
        total = sum(checkpoint(_chunk_loss, head, rows[start:start + chunk], targets[start:start + chunk],
                               use_reentrant=False) for start in range(0, count, chunk))
    return total / count


def _chunk_loss(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(rows.unsqueeze(0)).squeeze(0).float()  # [c, V]
    return F.cross_entropy(logits, targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ CE(x·Wᵀ + b, y) over rows, chunk by chunk; the gradients are made in the forward.

    Per chunk (c rows): z = x·Wᵀ + b [c, V] in fp32, lse = log Σ exp z, loss += Σ (lse − z_y);
    dz = softmax(z) − onehot(y); dx = dz·W [c, H]; dW += dzᵀ·x [V, H]; db += Σ dz. Only dx, dW, db
    are kept for the backward, which scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk, grad_enabled):
        device = rows.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else rows.dtype
        want_rows, want_weight, want_bias = (grad_enabled and wanted for wanted in ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if want_rows else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        with torch.autocast(device, enabled=False):
            matrix = weight.to(dtype)  # [V, H]
            shift = None if bias is None else bias.to(dtype)
            for start in range(0, rows.shape[0], chunk):
                x, y = rows[start:start + chunk].to(dtype), targets[start:start + chunk]  # [c, H], [c]
                logits = F.linear(x, matrix, shift).float()  # [c, V]
                lse = torch.logsumexp(logits, dim=-1)  # [c]
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if not (want_rows or want_weight or want_bias):
                    continue
                grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                grad_logits[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(dtype)
                if grad_rows is not None:
                    grad_rows[start:start + chunk] = grad_logits @ matrix  # [c, H]
                if grad_weight is not None:
                    grad_weight += grad_logits.t() @ x  # [V, H]
        ctx.save_for_backward(*(g for g in (grad_rows, grad_weight, grad_bias) if g is not None))
        ctx.kept = (grad_rows is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (rows.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_total).to(dtype) if kept else None for kept, dtype in zip(ctx.kept, ctx.dtypes)]
        return (*grads, None, None, None)


def _causal_lm(model: nn.Module) -> nn.Module | None:
    """The outermost module that is a decoder-only transformers causal LM: its forward takes
    ``logits_to_keep`` and it has an output head. None for classifiers and encoder-decoders."""
    if model in _hosts:
        return _hosts[model]
    host = None
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        if forward is None or not hasattr(module, "get_output_embeddings"):
            continue
        try:
            takes = "logits_to_keep" in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            continue
        if takes:
            config = getattr(module, "config", None)
            host = None if getattr(config, "is_encoder_decoder", False) else module
            break
    _hosts[model] = host
    return host


def _sharded(parameter: torch.Tensor) -> bool:
    """A DTensor (FSDP2 or tensor parallel): its head cannot be run outside the model's own call."""
    return type(parameter).__name__ == "DTensor" or hasattr(parameter, "device_mesh")
