"""A model folder whose linear weights are stored in NF4: what ``deltatune merge --requantize`` writes.

A plain Hugging Face folder has no place for 4-bit codes (transformers reads NF4 only through
bitsandbytes' own layout, on CUDA), and writing the dequantised weights would undo the point: a
model 4× smaller. So the folder holds the NF4 tensors themselves, and says so:

    config.json, generation_config.json   the model's, as ``save_pretrained`` writes them
    deltatune_nf4_model.safetensors        every dense tensor under its state-dict key (a tied one
                                           once); each NF4 weight as ``<key>.nf4.<component>``:
                                           codes (uint8, two per byte), 8-bit scales, fp32 factors
                                           per group of scales, the scales' mean, the 16 levels
    deltatune_nf4_model.json               written last: per NF4 weight its shape, dtypes and
                                           layout; which keys are tied to which

There is no ``model.safetensors``, so transformers alone refuses the folder with its own message
instead of loading random weights; ``deltatune.pretrained.load_model`` (so ``deltatune generate``,
``eval``, ``train --model``) reads it back to the very same codes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.atomic import atomic_file, atomic_write_text
from deltatune.errors import DeltatuneError
from deltatune.methods.base_weight import NF4_COMPONENTS, NF4Layout, NF4Weight, nf4_components, nf4_from_components

WEIGHTS_NAME = "deltatune_nf4_model.safetensors"
INDEX_NAME = "deltatune_nf4_model.json"
FORMAT = "deltatune-nf4-model/1"
DENSE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def holds_nf4(model: nn.Module) -> bool:
    return any(isinstance(p, NF4Weight) for p in model.parameters())


def is_nf4_model_folder(folder: str | os.PathLike) -> bool:
    return Path(folder, INDEX_NAME).is_file()


def save_model_folder(model: nn.Module, folder: str | os.PathLike, replacing: str | os.PathLike | None = None) -> None:
    """``model`` into ``folder``: ``save_pretrained``'s plain safetensors, or this module's NF4 form
    when it holds NF4 weights. ``replacing`` is the folder the files will land in: the weight files
    of the other form are removed from it, so that one folder never holds two models."""
    nf4 = holds_nf4(model)
    if nf4:
        save_nf4_model(model, folder)
    else:
        model.save_pretrained(folder)
    if replacing is not None and Path(replacing).is_dir():
        stale = DENSE_WEIGHT_FILES if nf4 else (WEIGHTS_NAME, INDEX_NAME)
        for path in Path(replacing).iterdir():
            if path.name in stale or (nf4 and path.name.startswith("model-") and path.name.endswith(".safetensors")):
                path.unlink()


def save_nf4_model(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``model`` (a transformers model, some weights NF4) as described above; each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    owners = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    tensors: dict[str, torch.Tensor] = {}
    weights: dict[str, dict[str, Any]] = {}
    ties: dict[str, str] = {}
    first_key: dict[int, str] = {}
    for key, value in model.state_dict().items():
        owner = owners.get(key, value)
        if id(owner) in first_key:  # tied: stored once, pointed at
            ties[key] = first_key[id(owner)]
            continue
        first_key[id(owner)] = key
        if isinstance(owner, NF4Weight):
            tensors.update({f"{key}.nf4.{name}": t for name, t in nf4_components(owner).items()})
            layout = owner.layout
            weights[key] = {"shape": list(owner.shape), "dtype": _name(owner.dtype),
                            "stored_dtype": _name(owner.stored_dtype), "block_size": layout.block_size,
                            "scaler_block_size": layout.scaler_block_size, "padded_numel": layout.padded_numel}
        else:
            tensors[key] = value.detach().to("cpu").contiguous()
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    with atomic_file(folder / WEIGHTS_NAME) as staging:
        save_file(tensors, str(staging), metadata={"format": "pt"})
    index = {"format": FORMAT, "weights_file": WEIGHTS_NAME, "nf4_weights": weights, "tied": ties}
    atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def load_nf4_model(folder: str | os.PathLike, auto_class: Any = None, dtype: torch.dtype | None = None,
                   trust_remote_code: bool = False) -> nn.Module:
    """The model :func:`save_nf4_model` wrote, in eval mode, its NF4 weights bit-identical.
    ``auto_class`` (an Auto class or a model class; default ``AutoModelForCausalLM``) builds it
    from ``config.json``, with fresh weights that the file's then replace; ``dtype``
    casts it afterwards (the NF4 weights keep their codes and take ``dtype`` as compute dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    index = _read_index(folder)
    try:
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except (SafetensorError, OSError) as error:
        raise DeltatuneError(f"{folder / WEIGHTS_NAME} is missing or unreadable ({error}); write the folder again "
                             "with deltatune merge --requantize.") from None
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    builder = auto_class or AutoModelForCausalLM
    if hasattr(builder, "from_config"):  # an Auto class
        model = builder.from_config(config, trust_remote_code=trust_remote_code)
    else:  # a model class itself
        model = builder(config)
    nf4_keys = {f"{key}.nf4.{name}" for key in index["nf4_weights"] for name in NF4_COMPONENTS}
    missing, unexpected = model.load_state_dict({k: v for k, v in tensors.items() if k not in nf4_keys},
                                                strict=False, assign=True)
    for key, spec in index["nf4_weights"].items():
        layout = NF4Layout(spec["block_size"], spec["scaler_block_size"], spec["padded_numel"])
        components = {name: tensors[f"{key}.nf4.{name}"] for name in NF4_COMPONENTS}
        weight = nf4_from_components(components, layout, torch.Size(spec["shape"]), getattr(torch, spec["dtype"]),
                                     getattr(torch, spec["stored_dtype"]))
        _set_parameter(model, key, nn.Parameter(weight, requires_grad=False))
    for key, source in index["tied"].items():
        _set_parameter(model, key, model.get_parameter(source))
    missing = sorted(set(missing) - set(index["nf4_weights"]) - set(index["tied"]))
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"holds {sorted(unexpected)[0]!r}, which the model does not have"
        raise DeltatuneError(f"{folder / WEIGHTS_NAME} {what}; it was written for another model, write it again "
                             "with deltatune merge --requantize.")
    if dtype is not None:
        model.to(dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    model.config._name_or_path = str(folder)
    return model.eval()


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DeltatuneError(f"{path} is unreadable ({error}); write the folder again with deltatune merge "
                             "--requantize.") from None
    found = index.get("format") if isinstance(index, dict) else None
    if found != FORMAT:
        raise DeltatuneError(f"{path} is not a {FORMAT} index (format {found!r}); write the folder again with this "
                             "deltatune's merge --requantize.")
    if not isinstance(index.get("nf4_weights"), dict) or not isinstance(index.get("tied"), dict):
        raise DeltatuneError(f"{path} lacks its nf4_weights or tied table; write the folder again with deltatune "
                             "merge --requantize.")
    return index


def _set_parameter(model: nn.Module, key: str, param: nn.Parameter) -> None:
    path, _, name = key.rpartition(".")
    setattr(model.get_submodule(path) if path else model, name, param)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
