"""One batch, a different low-rank adapter per example, in two matmuls whatever the number of adapters.

A batch that mixes adapters (``model(..., adapter_names=[...])``, the way a server answers
several tenants at once) could run each adapter on its rows: gather the rows, two matmuls,
scatter the result back, once per adapter and layer. On a decode step that is a handful of
tiny kernels and copies per adapter per layer, and the cost grows with the number of adapters.
Here the factors of every adapter are stacked once (kept between calls by the layer while they
do not change), ranks padded with zeros to the largest, the scale folded into B, and a last
all-zero slot for rows without an adapter ("__base__"). Then, by the number of tokens per row:

  many (prefill)   each row takes its adapter's factors: two batched matmuls,
                   A_rows = A[slot_of_row] (batch, r, in), out += (x A_rowsᵀ) (s·B_rows)ᵀ
  few (decoding)   the down-projections of the k adapters the batch uses at once,
                   x [A_1; …; A_k]ᵀ (one matmul of width k·r), the columns of other adapters
                   zeroed, then one matmul with [s·B_1, …, s·B_k]: no per-row copies of the
                   factors, which at one token a row cost more than the k-fold narrow matmuls
                   (measured: +30 µs against +100 µs for a 512 → 1376 layer, batch 8, 8
                   adapters, one thread). The side-by-side factors and the row masks are kept
                   by the layer while the batch's adapters and the factors stay the same.

Padding, zeroed columns and the folded scale change nothing but the order of float additions.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


# at most this many tokens per row, every adapter's down-projection runs on every row
FEW_TOKENS = 4


class Stacked(NamedTuple):
    """The factors of a layer's n adapters, and a last all-zero slot; r is the largest rank."""

    lora_A: torch.Tensor  # (n+1, r, in)
    lora_B: torch.Tensor  # (n+1, out, r), scaled


class Wide(NamedTuple):
    """The adapters one batch uses, side by side, for the few-tokens path: k adapters, rank r."""

    lora_A: torch.Tensor  # (k·r, in)
    lora_B_t: torch.Tensor  # (k·r, out): each s·B, transposed
    own: torch.Tensor  # (batch, 1, k·r): 1 where a column belongs to the row's adapter, else 0


def stacked_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype) -> Stacked:
    """(A, s·B) of every adapter stacked along a new first axis, ranks padded with zeros to the
    largest, plus a last all-zero slot for rows without an adapter."""
    rank = max(lora_A.shape[0] for lora_A, _, _ in factors)
    first_A, first_B, _ = factors[0]
    stacked_A = first_A.new_zeros((len(factors) + 1, rank, first_A.shape[1]), dtype=dtype)
    stacked_B = first_B.new_zeros((len(factors) + 1, first_B.shape[0], rank), dtype=dtype)
    for slot, (lora_A, lora_B, scale) in enumerate(factors):
        stacked_A[slot, : lora_A.shape[0]] = lora_A
        stacked_B[slot, :, : lora_B.shape[1]] = lora_B * scale
    return Stacked(stacked_A, stacked_B)


def wide_factors(stacked: Stacked, slot_of_row: torch.Tensor) -> Wide | None:
    """The factors of the adapters that some row of the batch uses (not every adapter the layer
    holds: the cost follows the batch), side by side; None when every row is on the base."""
    zero_slot, rank = stacked.lora_A.shape[0] - 1, stacked.lora_A.shape[1]
    present = torch.unique(slot_of_row[slot_of_row != zero_slot])  # sorted
    if present.numel() == 0:
        return None
    lora_B_t = stacked.lora_B[present].transpose(1, 2).flatten(0, 1).contiguous()
    own = (present.repeat_interleave(rank) == slot_of_row[:, None]).unsqueeze(1).to(stacked.lora_A.dtype)
    return Wide(stacked.lora_A[present].flatten(0, 1), lora_B_t, own)


def add_per_example_low_rank(out: torch.Tensor, x: torch.Tensor, stacked: Stacked, slot_of_row: torch.Tensor,
                             wide: Wide | None = None) -> torch.Tensor:
    """``out`` plus, for each row b, s·B (A x_b) of the adapter in slot ``slot_of_row[b]`` of ``stacked``.
    ``x`` is (batch, ..., in), ``out`` (batch, ..., out); ``wide`` is ``wide_factors`` of the two if the
    caller keeps it (a few-tokens batch only). In place when no gradient is wanted, else a new tensor."""
    batch = x.shape[0]
    rows = x.reshape(batch, -1, x.shape[-1])
    if rows.dtype != stacked.lora_A.dtype:
        rows = rows.to(stacked.lora_A.dtype)
    in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (out, rows, *stacked)))
    if rows.shape[1] <= FEW_TOKENS:
        wide = wide_factors(stacked, slot_of_row) if wide is None else wide
        if wide is None:  # every row on the base
            return out
        hidden = F.linear(rows, wide.lora_A)  # (batch, tokens, k·r)
        if in_place and out.dtype == hidden.dtype and out.is_contiguous():  # decoding: no temporaries
            out.view(-1, out.shape[-1]).addmm_(hidden.mul_(wide.own).view(-1, hidden.shape[-1]), wide.lora_B_t)
            return out
        delta = (hidden * wide.own) @ wide.lora_B_t
    else:
        hidden = torch.bmm(rows, stacked.lora_A[slot_of_row].transpose(1, 2))  # (batch, tokens, r)
        delta = torch.bmm(hidden, stacked.lora_B[slot_of_row].transpose(1, 2))
    delta = delta.to(out.dtype).view(out.shape)
    return out.add_(delta) if in_place else out + delta
