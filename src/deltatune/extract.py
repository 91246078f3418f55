"""Low-rank extraction: a LoRA adapter from a fine-tuned model, by truncated SVD of each weight difference.

For every linear layer (``nn.Linear``, GPT-2's ``Conv1D``) whose weight the fine-tuning changed:

    ΔW = W_tuned − W_base = U S Vᵀ                       (out × in; Conv1D's in × out is transposed)
    B = U_r S_r^½  (out × r),   A = S_r^½ V_rᵀ  (r × in),   α = r, so s = α/r = 1 and s·B A = U_r S_r V_rᵀ
    retained energy = Σ_{i<r} σ_i² / Σ_i σ_i²

By Eckart–Young, B A is the best rank-r approximation of ΔW: the error ‖ΔW − B A‖²_F = Σ_{i≥r} σ_i²
falls as r grows and is zero at the rank of ΔW (at most min(out, in)), where the adapter reproduces
the tuned model. ``rank=R`` keeps R directions in every layer (fewer where a layer has fewer);
``energy=e`` keeps, per layer, the fewest that retain the share e (per-layer ranks go into peft's
``rank_pattern``/``alpha_pattern``). The SVD runs in float64.

The tuned side is a model folder (full fine-tuning), or an adapter folder of any method that folds
into the weights (LoRA: re-compression to another rank; freeze tuning's trained layers): it is
merged onto the base in fp32 first. Tensors that differ but are no linear layer's weight (norms,
embeddings, biases) are listed; with ``include_other`` they are saved too — modules as peft's
``modules_to_save`` (a trained copy, the whole module), and biases of extracted layers as LoRA's
``bias="lora_only"`` (the layer's own trained bias, peft's ``…base_layer.bias``). A classifier's
head is always saved whole: a base loads it freshly initialised.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.atomic import check_output_folder, files_into
from deltatune.errors import DeltatuneError
from deltatune.methods import LoRA
from deltatune.methods.base_weight import stored_transposed
from deltatune.methods.lora import LoRALayer
from deltatune.methods.trained_copy import TrainedCopy, trained_modules
from deltatune.model import DeltaModel, merge, wrap
from deltatune.peft_format import CONFIG_NAME, adapter_method, load_adapter_tensors, read_adapter_folder, save_adapter
from deltatune.pretrained import infer_task, load_model, read_labels, trained_task, write_labels

LINEAR = (nn.Linear, Conv1D)


# --- the math, as pure functions -----------------------------------------------------------
def singular_triplets(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out × k), σ (k,), Vᵀ (k × in) of ``delta`` (out × in) in float64, k = min(out, in)."""
    return torch.linalg.svd(delta.double(), full_matrices=False)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading directions whose Σσ² is at least ``energy`` of the total (1 at least)."""
    squares = singular_values.double() ** 2
    share = torch.cumsum(squares, 0) / squares.sum()
    return max(1, min(int((share < energy - 1e-12).sum()) + 1, len(singular_values)))


def low_rank_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r × in), B (out × r) with B A = U_r S_r V_rᵀ, the root of σ on both sides."""
    root = S[:rank].sqrt()  # (r,)
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]  # (r, in), (out, r)


def retained_energy(singular_values: torch.Tensor, rank: int) -> float:
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    return 1.0 if total == 0 else float(squares[:rank].sum()) / total


# --- what an extraction gives ----------------------------------------------------------------
@dataclass(frozen=True)
class LayerDelta:
    """One extracted layer: how many directions it kept of how many, and their share of ‖ΔW‖²."""

    path: str
    rank: int
    full_rank: int  # min(out, in): the most a difference of this shape can have
    energy: float  # Σ_{i<r} σ_i² / Σ σ_i²
    parameters: int  # r·(in + out)

    def line(self) -> str:
        return f"{self.path}  rank {self.rank}/{self.full_rank}  energy {self.energy:.4f}  parameters {self.parameters:,}"


@dataclass
class Extraction:
    """The base model with the extracted LoRA adapter on it (``model``, adapter "default"), and a report."""

    model: DeltaModel
    layers: tuple[LayerDelta, ...]
    other: tuple[str, ...]  # tensors that differ but are no linear layer's weight
    saved_modules: tuple[str, ...]  # modules saved whole (modules_to_save)
    saved_biases: tuple[str, ...]  # biases saved as the extracted layers' own (bias="lora_only")
    base_parameters: int

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.adapter_parameters("default").values())

    def lines(self) -> list[str]:
        lines = [layer.line() for layer in self.layers]
        kept = sum(layer.energy for layer in self.layers) / max(1, len(self.layers))
        lines.append(f"{len(self.layers)} layers, mean retained energy {kept:.4f}; adapter parameters "
                     f"{self.parameters:,} ({100 * self.parameters / self.base_parameters:.2f}% of the model's "
                     f"{self.base_parameters:,})")
        saved = set(self.saved_biases) | {t for t in self.other if any(t.startswith(m + ".") for m in self.saved_modules)}
        left = [t for t in self.other if t not in saved]
        if self.saved_modules:
            lines.append(f"saved whole (modules_to_save): {', '.join(self.saved_modules)}")
        if self.saved_biases:
            lines.append(f"saved as the layers' own trained biases (bias=lora_only): {', '.join(self.saved_biases)}")
        if left:
            lines.append(f"differ but are not linear weights, not saved (pass --include-other to save them): "
                         f"{', '.join(left)}")
        return lines


@torch.no_grad()
def extract_lora(base: nn.Module, tuned: nn.Module, *, rank: int | None = None, energy: float | None = None,
                 include_other: bool = False) -> Extraction:
    """A LoRA adapter on ``base`` (wrapped in place) that approximates ``tuned`` − ``base``.

    Exactly one of ``rank`` (directions per layer) and ``energy`` (share of ‖ΔW‖² per layer, in
    (0, 1]) is given. ``tuned`` is only read.
    """
    if (rank is None) == (energy is None):
        raise DeltatuneError("Give exactly one of rank (e.g. 8) and energy (e.g. 0.9) to choose how much to keep.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise DeltatuneError(f"rank must be a whole number of at least 1, got {rank!r}; pass e.g. --rank 8.")
    if energy is not None and not 0 < energy <= 1:
        raise DeltatuneError(f"energy must be a share in (0, 1], got {energy!r}; pass e.g. --energy 0.9.")
    check_same_architecture(base, tuned)
    base_tensors = dict(base.named_parameters(remove_duplicate=False))
    tuned_tensors = dict(tuned.named_parameters(remove_duplicate=False))
    linear = {path: module for path, module in base.named_modules() if isinstance(module, LINEAR)}
    heads = trained_modules(base, ())  # a classifier's head: saved whole, never factored
    differs = [name for name, tensor in base_tensors.items() if not torch.equal(tensor, tuned_tensors[name])]
    if not differs:
        raise DeltatuneError("--tuned has the same weights as --base; there is no difference to extract.")
    changed = [p for p in linear if f"{p}.weight" in differs and not _inside(p, heads)]
    factored = {f"{p}.weight" for p in changed}
    other = tuple(name for name in differs if name not in factored)
    copies, biases = list(heads), []
    if include_other:
        for name in other:
            owner = name.rpartition(".")[0]
            if owner in changed and name.endswith(".bias"):
                biases.append(name)
            elif owner and not _inside(owner, copies):
                copies.append(owner)
    copies = [c for c in copies if not _inside(c, [d for d in copies if d != c])]  # outermost only
    targets = [p for p in changed if not _inside(p, copies)]
    if not targets:
        raise DeltatuneError(f"No linear layer's weight differs between --base and --tuned (only {', '.join(other[:4])}"
                             f"{', ...' if len(other) > 4 else ''}), so LoRA has nothing to factor; keep the tuned model folder itself.")
    layers, factors = [], {}
    for path in targets:
        module = linear[path]
        delta = (tuned_tensors[f"{path}.weight"].double() - base_tensors[f"{path}.weight"].double())
        delta = delta.T if stored_transposed(module) else delta  # (out × in)
        U, S, Vh = singular_triplets(delta)
        kept = min(rank, len(S)) if rank is not None else rank_for_energy(S, energy)
        factors[path] = low_rank_factors(U, S, Vh, kept)
        layers.append(LayerDelta(path, kept, len(S), retained_energy(S, kept), kept * sum(delta.shape)))
    method = _lora_for(base, layers, copies, bias="lora_only" if biases else "none")
    base_parameters = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    model = wrap(base, method)
    _fill(model, factors, copies, biases, tuned)
    return Extraction(model, tuple(layers), other, tuple(copies), tuple(biases), base_parameters)


def _inside(path: str, modules: list[str] | tuple[str, ...]) -> bool:
    return any(path == m or path.startswith(m + ".") for m in modules)


def _lora_for(base: nn.Module, layers: list[LayerDelta], copies: list[str], bias: str) -> LoRA:
    """The LoRA config: α = r everywhere (s = 1); the most common rank as ``rank``, the others as patterns.
    Targets are short names when they pick exactly the extracted layers, else the full paths."""
    ranks = Counter(layer.rank for layer in layers)
    rank = ranks.most_common(1)[0][0]
    pattern = {layer.path: layer.rank for layer in layers if layer.rank != rank}
    paths = [layer.path for layer in layers]
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    picked = [p for p, m in base.named_modules() if isinstance(m, LINEAR) and p.rsplit(".", 1)[-1] in names]
    targets = names if sorted(picked) == sorted(paths) else paths
    return LoRA(rank=rank, alpha=float(rank), targets=targets, rank_pattern=pattern,
                alpha_pattern={path: float(r) for path, r in pattern.items()}, modules_to_save=tuple(copies), bias=bias)


def _fill(model: DeltaModel, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], copies: list[str],
          biases: list[str], tuned: nn.Module) -> None:
    """Write the factors, the trained copies and the biases into the wrapped model's adapter."""
    tuned_state = tuned.state_dict()
    with torch.no_grad():
        for path, (lora_A, lora_B) in factors.items():
            layer: LoRALayer = model.base_model.get_submodule(path)
            layer.lora_A["default"].copy_(lora_A)
            layer.lora_B["default"].copy_(lora_B)
            if f"{path}.bias" in biases:
                layer.biases["default"].copy_(tuned_state[f"{path}.bias"])
        for path in copies:
            copy: TrainedCopy = model.base_model.get_submodule(path)
            own = copy.copies["default"].state_dict()
            copy.copies["default"].load_state_dict({key: tuned_state[f"{path}.{key}"] for key in own})


def check_same_architecture(base: nn.Module, tuned: nn.Module) -> None:
    """One sentence when ``tuned`` cannot be a fine-tune of ``base``: another class, a tensor one lacks, a shape."""
    if type(base).__name__ != type(tuned).__name__:
        raise DeltatuneError(f"--base is a {type(base).__name__} but --tuned is a {type(tuned).__name__}; extract needs "
                             "a model and the base it was fine-tuned from.")
    ours = {name: tuple(t.shape) for name, t in base.named_parameters(remove_duplicate=False)}
    theirs = {name: tuple(t.shape) for name, t in tuned.named_parameters(remove_duplicate=False)}
    for name in sorted(ours.keys() ^ theirs.keys()):
        side, other_side = ("--base", "--tuned") if name in ours else ("--tuned", "--base")
        raise DeltatuneError(f"{side} has a tensor {name!r} that {other_side} lacks; the two are different architectures, "
                             "so extract needs a model and the base it was fine-tuned from.")
    for name, shape in ours.items():
        if theirs[name] != shape:
            raise DeltatuneError(f"Tensor {name!r} is {shape} in --base but {theirs[name]} in --tuned; the two are "
                                 "different model sizes, so extract needs a model and the base it was fine-tuned from.")


# --- folders in, folder out ------------------------------------------------------------------
def load_tuned(base_path: str | os.PathLike, tuned_path: str | os.PathLike,
               trust_remote_code: bool = False) -> tuple[nn.Module, str, list[Any] | None]:
    """(the tuned model in fp32, its task, its labels): a model folder as it is, or an adapter folder
    merged onto a fresh fp32 copy of the base (the method's reference form: QLoRA as plain LoRA)."""
    tuned_path = Path(tuned_path)
    if (tuned_path / CONFIG_NAME).is_file():
        config, tensors = read_adapter_folder(tuned_path)
        method = adapter_method(tuned_path, config).reference_method()
        if not method.capabilities().mergeable:
            raise DeltatuneError(f"--tuned {str(tuned_path)!r} holds a {method.cli_name} adapter, which does not fold into "
                                 "the weights; extract reads a model folder or a mergeable adapter (lora, freeze).")
        task, labels = trained_task(base_path, tuned_path), read_labels(tuned_path)
        model = wrap(load_model(base_path, task, "float32", trust_remote_code, labels=labels), method)
        load_adapter_tensors(model, "default", tensors, config.get("base_model_name_or_path"))
        return merge(model), task, labels
    task = infer_task(tuned_path)
    model = load_model(tuned_path, task, "float32", trust_remote_code)
    labels = None
    if task == "classification":
        labels = read_labels(tuned_path) or [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, task, labels


def extract_folder(base_path: str | os.PathLike, tuned_path: str | os.PathLike, output: str | os.PathLike, *,
                   rank: int | None = None, energy: float | None = None, include_other: bool = False,
                   overwrite: bool = False, trust_remote_code: bool = False) -> Iterator[str]:
    """``deltatune extract``: write the adapter into ``output`` (files land by renames) and yield the report lines."""
    check_output_folder(output, overwrite=overwrite, reads=(base_path, tuned_path))
    tuned, task, labels = load_tuned(base_path, tuned_path, trust_remote_code)
    base = load_model(base_path, task, "float32", trust_remote_code, labels=labels)
    extraction = extract_lora(base, tuned, rank=rank, energy=energy, include_other=include_other)
    with files_into(output) as staging:
        save_adapter(extraction.model, staging)
        if labels is not None:
            write_labels(staging, labels)
    yield from extraction.lines()
    yield f"LoRA adapter written to {output} (peft format: PeftModel.from_pretrained loads it)"
