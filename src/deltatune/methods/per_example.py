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
  few (decoding)   every adapter's down-projection at once, x [A_1; …; A_n]ᵀ (one matmul of
                   width n·r), the columns of other adapters zeroed, then one matmul with
                   [s·B_1, …, s·B_n]: no per-row copies of the factors, which at one token a
                   row cost more than the n-fold narrow matmuls (measured: +30 µs against
                   +100 µs for a 512 → 1376 layer, batch 8, 8 adapters, one thread)

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
    lora_B_side_by_side: torch.Tensor  # (out, (n+1)·r), the same
    slot_of_column: torch.Tensor  # ((n+1)·r,): the slot each column of the wide down-projection belongs to


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
    side_by_side = stacked_B.permute(1, 0, 2).reshape(stacked_B.shape[1], -1)
    columns = torch.arange(len(factors) + 1, device=stacked_A.device).repeat_interleave(rank)
    return Stacked(stacked_A, stacked_B, side_by_side, columns)


def own_columns(stacked: Stacked, slot_of_row: torch.Tensor) -> torch.Tensor:
    """(batch, 1, (n+1)·r): 1 where a column of the wide down-projection belongs to the row's adapter, else 0."""
    return (stacked.slot_of_column == slot_of_row[:, None]).unsqueeze(1).to(stacked.lora_A.dtype)


def add_per_example_low_rank(out: torch.Tensor, x: torch.Tensor, stacked: Stacked, slot_of_row: torch.Tensor,
                             own: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` plus, for each row b, s·B (A x_b) of the adapter in slot ``slot_of_row[b]`` of ``stacked``.
    ``x`` is (batch, ..., in), ``out`` (batch, ..., out); ``own`` is ``own_columns`` of the two, if the
    caller keeps it. In place when no gradient is wanted, else a new tensor."""
    batch = x.shape[0]
    rows = x.reshape(batch, -1, x.shape[-1])
    if rows.dtype != stacked.lora_A.dtype:
        rows = rows.to(stacked.lora_A.dtype)
    in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (out, rows, *stacked[:2])))
    if rows.shape[1] <= FEW_TOKENS:
        wide = F.linear(rows, stacked.lora_A.flatten(0, 1))  # (batch, tokens, (n+1)·r)
        own = own_columns(stacked, slot_of_row) if own is None else own
        if in_place and out.dtype == wide.dtype and out.is_contiguous():  # decoding: two matmuls, a mask, no temporaries
            out.view(-1, out.shape[-1]).addmm_(wide.mul_(own).view(-1, wide.shape[-1]), stacked.lora_B_side_by_side.T)
            return out
        delta = F.linear(wide * own, stacked.lora_B_side_by_side)
    else:
        hidden = torch.bmm(rows, stacked.lora_A[slot_of_row].transpose(1, 2))  # (batch, tokens, r)
        delta = torch.bmm(hidden, stacked.lora_B[slot_of_row].transpose(1, 2))
    delta = delta.to(out.dtype).view(out.shape)
    return out.add_(delta) if in_place else out + delta
