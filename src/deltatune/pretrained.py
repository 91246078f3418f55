"""Load a base model and its tokenizer from a local folder or a ``.gguf`` file — never from a hub — and
find the bundled demo files.

A model serves one task, and the task picks the transformers class:

    causal-lm       AutoModelForCausalLM                 (Llama, Qwen2, GPT-2, ...)
    classification  AutoModelForSequenceClassification   a fresh head sized from the labels
    seq2seq         AutoModelForSeq2SeqLM                (BART, T5)

``infer_task`` reads it from the folder's config (``architectures``) where that is unambiguous.
A ``.gguf`` file (llama.cpp's format) loads through transformers' GGUF reader — weights
dequantised to the chosen dtype, tokenizer from the same file — and afterwards is a plain
model: ``save_pretrained`` writes ordinary safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from deltatune.errors import DeltatuneError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TASKS = ("causal-lm", "classification", "seq2seq")
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
                "seq2seq": "AutoModelForSeq2SeqLM"}
LABELS_FILE = "labels.json"  # a classification run's label list, next to its adapter or model


def bundled(name: str) -> Path:
    """A path inside the package's bundled data (``stories260K``, ``e2e/train.jsonl``, ...)."""
    return Path(str(resources.files("deltatune") / "bundled" / name))


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise DeltatuneError(f"Unknown dtype {name!r}; use one of float32, bfloat16, float16 or auto.")
    return DTYPES[name]


def _model_source(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(folder, extra from_pretrained arguments): a model folder, or the folder of a ``.gguf`` file."""
    source = Path(path)
    if source.is_file() and source.suffix.lower() == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise DeltatuneError(f"Reading {source.name} needs the gguf package, which is not installed; "
                                 "run pip install deltatune[gguf].")
        return source.parent, {"gguf_file": source.name}
    if source.is_file():
        raise DeltatuneError(f"--model {str(source)!r} is a file but not a .gguf one; pass a Hugging Face model "
                             "folder (config.json and weights) or a .gguf file.")
    if not source.is_dir():
        raise DeltatuneError(f"Model folder {str(source)!r} does not exist; pass a local Hugging Face model folder "
                             "(config.json and weights) or a .gguf file — models are never downloaded.")
    if not (source / "config.json").is_file():
        raise DeltatuneError(f"{str(source)!r} has no config.json; it is not a Hugging Face model folder.")
    return source, {}


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


def infer_task(path: str | os.PathLike) -> str:
    """The task a model folder was made for, from its config; ``causal-lm`` when it does not say.

    ``*ForSequenceClassification`` → classification; an encoder-decoder (``is_encoder_decoder``,
    BART, T5) → seq2seq; anything else (a ``.gguf`` file too) → causal-lm.
    """
    if is_gguf(path):
        return "causal-lm"
    folder, _ = _model_source(path)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DeltatuneError(f"{folder / 'config.json'} is not valid JSON ({error.msg}); fix or re-save it.") from None
    architectures = config.get("architectures") or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "classification"
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    return "causal-lm"


def load_model(path: str | os.PathLike, task: str = "causal-lm", dtype: str | None = None,
               trust_remote_code: bool = False, labels: Sequence[Any] | None = None,
               pad_token_id: int | None = None) -> nn.Module:
    """The ``task``'s transformers model from a local folder or ``.gguf`` file, in eval mode.

    For classification, ``labels`` (class ``i`` is ``labels[i]``) sizes a fresh head and names
    its classes in the config (omit them to keep a classifier folder's own). A decoder finds
    each sequence's last non-padding token through ``config.pad_token_id``; when the config
    has none, ``pad_token_id`` (the tokenizer's) is written there.
    """
    import transformers
    from transformers.utils import logging

    if task not in TASKS:
        raise DeltatuneError(f"task {task!r} is unknown: use one of {', '.join(TASKS)}.")
    folder, extra = _model_source(path)
    if labels is not None:
        names = [str(label) for label in labels]
        # a classifier folder with another number of classes gets a fresh head of the right size
        extra.update(num_labels=len(names), id2label=dict(enumerate(names)),
                     label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True)
    logging.disable_progress_bar()
    auto_class = getattr(transformers, AUTO_CLASSES[task])
    verbosity = logging.get_verbosity()
    if labels is not None:  # a fresh head is the point: transformers' report of its missing weights is noise
        logging.set_verbosity_error()
    try:
        model = auto_class.from_pretrained(folder, dtype=parse_dtype(dtype) or "auto", local_files_only=True,
                                           trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        what = {"causal-lm": "causal language model", "classification": "sequence classifier",
                "seq2seq": "sequence-to-sequence model"}[task]
        raise DeltatuneError(f"Could not load a {what} from {str(path)!r}: {first_line}") from None
    finally:
        logging.set_verbosity(verbosity)
    if "gguf_file" in extra:
        _forget_gguf(model, Path(path))
    if task == "classification" and model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model.eval()


def _forget_gguf(model: nn.Module, source: Path) -> None:
    """A GGUF model is dequantised on load, so it is plain weights; transformers still marks it
    quantised and refuses ``save_pretrained``. Drop the marks: merge and full fine-tuning then
    write ordinary safetensors folders."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.config._name_or_path = str(source)  # adapters name the file they were trained on, not its folder


def load_causal_lm(path: str | os.PathLike, dtype: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM`` from a local folder or ``.gguf`` file, in eval mode."""
    return load_model(path, "causal-lm", dtype, trust_remote_code)


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    folder, extra = _model_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code,
                                                  **extra)
    except (OSError, ValueError) as error:
        raise DeltatuneError(f"Could not load a tokenizer from {str(path)!r}: {str(error).strip().splitlines()[0]}") from None
    return tokenizer


def pad_token_id(tokenizer: Any) -> int:
    """The pad id, falling back to EOS (many causal LM tokenizers define no pad token)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


# --- a trained run back: base + adapter, with the task and labels it was trained for -----------
def read_labels(folder: str | os.PathLike) -> list[Any] | None:
    """The label list a classification run stored in ``folder`` (``labels.json``), or None."""
    path = Path(folder, LABELS_FILE)
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DeltatuneError(f"{path} is not a label list like {{\"labels\": [\"negative\", \"positive\"]}}; "
                             "fix it or train again.") from None
    return list(labels)


def trained_task(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None) -> str:
    """The task of a trained run: the adapter's peft ``task_type`` when it has one, else the model's config."""
    if adapter is not None:
        config_path = Path(adapter, "adapter_config.json")
        if config_path.is_file():
            try:
                task_type = json.loads(config_path.read_text(encoding="utf-8")).get("task_type")
            except json.JSONDecodeError:
                task_type = None  # load_adapter names the broken file
            task = {"SEQ_CLS": "classification", "SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal-lm"}.get(task_type)
            if task:
                return task
        if read_labels(adapter) is not None:
            return "classification"
    return infer_task(model_path)


def load_trained(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, task: str | None = None) -> tuple[nn.Module, Any, str, list[Any] | None]:
    """(model, tokenizer, task, labels) of a trained run: the base from ``model_path`` with the adapter in
    ``adapter`` on it (or ``model_path`` alone: a full fine-tuning output or any model folder).

    A classifier's base gets a head sized from the run's ``labels.json`` before the adapter (with
    the trained head, via modules_to_save) goes on. ``labels`` is None for other tasks.
    """
    import deltatune as dt

    task = task or trained_task(model_path, adapter)
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    labels = None
    if task == "classification":
        labels = read_labels(adapter) if adapter is not None else None
        labels = labels if labels is not None else read_labels(model_path) if Path(model_path).is_dir() else None
    model = load_model(model_path, task, dtype, trust_remote_code, labels=labels, pad_token_id=pad_token_id(tokenizer))
    if task == "classification" and labels is None:
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if adapter is not None:
        model = dt.load_adapter(model, adapter)
    return model, tokenizer, task, labels


def write_labels(folder: str | os.PathLike, labels: Sequence[Any]) -> None:
    """Store a classifier's label list as ``labels.json`` in ``folder`` (``read_labels`` reads it back)."""
    from deltatune.atomic import atomic_write_text

    atomic_write_text(Path(folder, LABELS_FILE), json.dumps({"labels": list(labels)}, ensure_ascii=False) + "\n")
