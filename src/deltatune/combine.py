"""Weighted combinations of LoRA adapters into a new adapter (above the wrapper: it adds one).

For each wrapped layer, the combined delta is ΔW = Σᵢ wᵢ·sᵢ·Bᵢ Aᵢ (out × in, fp32).
- ``"linear"`` stores it exactly, by stacking: A = [A₁; A₂; …], B = [w₁s₁B₁, w₂s₂B₂, …], scale 1,
  so the rank is the sum of the ranks. (peft's "linear" adds the A's and B's themselves, which
  mixes cross terms BᵢAⱼ into the result; this does not.)
- ``"svd"`` re-compresses ΔW to ``rank`` with a truncated SVD: B = U_r S_r, A = V_rᵀ, scale 1 —
  the best rank-r approximation in Frobenius norm (Eckart–Young).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from deltatune.errors import DeltatuneError
from deltatune.validation import require_choice
from deltatune.methods.lora import LoRA, LoRALayer
from deltatune.model import DeltaModel

COMBINATIONS = ("linear", "svd")


def combine_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]], weights: Sequence[float],
                    combination: str, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A = Σ wᵢ sᵢ Bᵢ Aᵢ (linear, exact) or its best rank-``rank`` approximation (svd)."""
    if combination == "linear":
        lora_A = torch.cat([A.float() for A, _, _ in factors], dim=0)  # (Σr, in)
        lora_B = torch.cat([w * s * B.float() for (_, B, s), w in zip(factors, weights)], dim=1)  # (out, Σr)
        return lora_A, lora_B
    delta = sum(w * s * (B.float() @ A.float()) for (A, B, s), w in zip(factors, weights))  # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, S.numel())
    return Vh[:keep], U[:, :keep] * S[:keep]


def add_weighted_adapter(model: DeltaModel, adapters: Sequence[str], weights: Sequence[float], name: str,
                         combination: str = "linear", rank: int | None = None) -> None:
    """Add adapter ``name`` = Σ wᵢ·adapterᵢ (LoRA adapters only); it becomes the active adapter."""
    require_choice("combination", combination, COMBINATIONS)
    if len(adapters) != len(weights) or not adapters:
        raise DeltatuneError("Give one weight per adapter, and at least one adapter.")
    if combination == "svd" and not (isinstance(rank, int) and rank > 0):
        raise DeltatuneError("The svd combination needs rank=<positive integer>, the rank of the result.")
    for adapter in adapters:
        model.require_adapter(adapter)
        if not isinstance(model.methods[adapter], LoRA):
            raise DeltatuneError(f"Adapter {adapter!r} is not a LoRA adapter; only LoRA adapters can be combined.")
    combined: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, layer in model.delta_modules():
        if not isinstance(layer, LoRALayer):
            continue
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names()]
        if present:
            factors = [(layer.lora_A[a], layer.lora_B[a], layer.scaling[a]) for a, _ in present]
            combined[path] = combine_factors(factors, [w for _, w in present], combination, rank)
    ranks = {path: A.shape[0] for path, (A, _) in combined.items()}
    base_rank = max(ranks.values())
    pattern = {re.escape(p): r for p, r in ranks.items() if r != base_rank}
    method = LoRA(rank=base_rank, alpha=float(base_rank), targets=tuple(combined),
                  rank_pattern=pattern, alpha_pattern={k: float(r) for k, r in pattern.items()})
    model.add_adapter(name, method)
    with torch.no_grad():
        for path, (lora_A, lora_B) in combined.items():
            layer = model.base_model.get_submodule(path)
            layer.lora_A[name].copy_(lora_A)
            layer.lora_B[name].copy_(lora_B)
