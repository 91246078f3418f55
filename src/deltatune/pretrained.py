"""Load a base model and its tokenizer from a local folder — never from a hub — and find the bundled demo files."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def bundled(name: str) -> Path:
    """A path inside the package's bundled data (``stories260K``, ``e2e/train.jsonl``, ...)."""
    return Path(str(resources.files("deltatune") / "bundled" / name))


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise DeltatuneError(f"Unknown dtype {name!r}; use one of float32, bfloat16, float16 or auto.")
    return DTYPES[name]


def _require_model_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise DeltatuneError(f"Model folder {str(folder)!r} does not exist; pass a local Hugging Face model folder "
                             "(config.json and weights) — models are never downloaded.")
    if not (folder / "config.json").is_file():
        raise DeltatuneError(f"{str(folder)!r} has no config.json; it is not a Hugging Face model folder.")
    return folder


def load_causal_lm(path: str | os.PathLike, dtype: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM`` from a local folder, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    folder = _require_model_folder(path)
    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=parse_dtype(dtype) or "auto", local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DeltatuneError(f"Could not load a causal language model from {str(folder)!r}: {first_line}") from None
    return model.eval()


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    folder = _require_model_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise DeltatuneError(f"Could not load a tokenizer from {str(folder)!r}: {str(error).strip().splitlines()[0]}") from None
    return tokenizer


def pad_token_id(tokenizer: Any) -> int:
    """The pad id, falling back to EOS (many causal LM tokenizers define no pad token)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
