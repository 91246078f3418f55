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
import pickle
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn

from deltatune.errors import DeltatuneError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TASKS = ("causal-lm", "classification", "seq2seq")
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
                "seq2seq": "AutoModelForSeq2SeqLM"}
LABELS_FILE = "labels.json"  # a classification run's label list, next to its adapter or model
JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json")


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
    from deltatune.peft_format import read_json_object

    for name in JSON_FILES:  # each one JSON object, checked here: transformers stumbles on others with a traceback
        if (source / name).exists():
            read_json_object(source / name, "fix it or save the model again")
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
    from deltatune.peft_format import read_json_object

    folder, _ = _model_source(path)
    config = read_json_object(folder / "config.json", "fix it or save the model again")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise DeltatuneError(f"{folder / 'config.json'} sets architectures to {architectures!r}, which must be a list "
                             "of class names like [\"LlamaForCausalLM\"]; fix it or save the model again.")
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "classification"
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    return "causal-lm"


def load_model(path: str | os.PathLike, task: str = "causal-lm", dtype: str | None = None,
               trust_remote_code: bool = False, labels: Sequence[Any] | None = None,
               pad_token_id: int | None = None, allow_pickle: bool = False) -> nn.Module:
    """The ``task``'s transformers model from a local folder or ``.gguf`` file, in eval mode.

    For classification, ``labels`` (class ``i`` is ``labels[i]``) sizes a fresh head and names
    its classes in the config (omit them to keep a classifier folder's own). A decoder finds
    each sequence's last non-padding token through ``config.pad_token_id``; when the config
    has none, ``pad_token_id`` (the tokenizer's) is written there.

    Weights come from safetensors only: a folder whose weights are pickles (``pytorch_model.bin``)
    is refused unless ``allow_pickle``, and then read with ``weights_only=True`` (tensors, never
    code). The folder's own Python code (``auto_map``) runs only with ``trust_remote_code=True``.
    """
    import transformers
    from transformers.utils import logging

    if task not in TASKS:
        raise DeltatuneError(f"task {task!r} is unknown: use one of {', '.join(TASKS)}.")
    folder, extra = _model_source(path)
    if "gguf_file" not in extra:
        _require_safe_weights(folder, allow_pickle)
        # transformers reads a pickle with weights_only=True; say so, whatever its default becomes
        extra.update({"use_safetensors": None, "weights_only": True} if allow_pickle else {"use_safetensors": True})
    if labels is not None:
        names = [str(label) for label in labels]
        # a classifier folder with another number of classes gets a fresh head of the right size
        extra.update(num_labels=len(names), id2label=dict(enumerate(names)),
                     label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True)
    logging.disable_progress_bar()
    auto_class = getattr(transformers, AUTO_CLASSES[task])
    from deltatune.nf4_model import is_nf4_model_folder, load_nf4_model

    if is_nf4_model_folder(folder):  # 'deltatune merge --requantize' wrote it: NF4 weights transformers cannot read
        return load_nf4_model(folder, auto_class, parse_dtype(dtype), trust_remote_code)
    verbosity = logging.get_verbosity()
    if labels is not None:  # a fresh head is the point: transformers' report of its missing weights is noise
        logging.set_verbosity_error()
    try:
        model, loading = auto_class.from_pretrained(folder, dtype=parse_dtype(dtype) or "auto", local_files_only=True,
                                                    trust_remote_code=trust_remote_code, output_loading_info=True,
                                                    **extra)
    except pickle.UnpicklingError:  # weights_only=True met something other than tensors: it stays unrun
        raise DeltatuneError(f"The pickled weights in {str(path)!r} hold more than tensors (code, or objects that "
                             "run code when loaded), so they were not loaded; use a safetensors copy of the model.") from None
    except (OSError, ValueError, SafetensorError, StrictDataclassError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        what = {"causal-lm": "causal language model", "classification": "sequence classifier",
                "seq2seq": "sequence-to-sequence model"}[task]
        raise DeltatuneError(f"Could not load a {what} from {str(path)!r}: {first_line}") from None
    finally:
        logging.set_verbosity(verbosity)
    _require_every_weight(path, model, loading.get("missing_keys", ()), fresh_head=labels is not None)
    if "gguf_file" in extra:
        _forget_gguf(model, Path(path))
    if task == "classification" and model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model.eval()


def _require_every_weight(path: str | os.PathLike, model: nn.Module, missing: Any, fresh_head: bool) -> None:
    """Refuse a model whose folder lacks some of its weights (transformers would start them at random),
    but for a classifier's fresh head, which ``labels`` asked for."""
    from deltatune.methods.trained_copy import trained_modules

    heads = tuple(f"{name}." for name in trained_modules(model, ())) if fresh_head else ()
    lacking = sorted(key for key in missing if not key.startswith(heads))
    if lacking:
        raise DeltatuneError(f"The weights in {str(path)!r} lack {len(lacking)} of the model's tensors ({', '.join(lacking[:3])}"
                             f"{', ...' if len(lacking) > 3 else ''}); its config.json and weights do not match: save "
                             "the model again.")


def _require_safe_weights(folder: Path, allow_pickle: bool) -> None:
    """Refuse a model folder whose weights exist only as pickles, unless the user allowed them."""
    pickles = sorted(p.name for p in folder.glob("*.bin") if p.is_file())
    if pickles and not allow_pickle and not any(folder.glob("*.safetensors")):
        raise DeltatuneError(f"{str(folder)!r} holds its weights only as pickle files ({', '.join(pickles[:3])}), which "
                             "can run code when loaded; convert them to safetensors (save_pretrained does), or, if you "
                             "trust where they came from, pass --allow-pickle (allow_pickle=True) to read their "
                             "tensors only.")


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
    except (OSError, ValueError, StrictDataclassError) as error:
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
    from deltatune.peft_format import read_json_object

    path = Path(folder, LABELS_FILE)
    if not path.exists():
        return None
    labels = read_json_object(path, "fix it or train again").get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(
            isinstance(label, (str, int)) and not isinstance(label, bool) for label in labels):
        raise DeltatuneError(f"{path} is not a label list like {{\"labels\": [\"negative\", \"positive\"]}}; "
                             "fix it or train again.")
    return labels


PEFT_TASKS = {"SEQ_CLS": "classification", "SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal-lm"}


def trained_task(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None) -> str:
    """The task of a trained run: the adapter's peft ``task_type`` when it has one, else the model's config."""
    if adapter is not None:
        from deltatune.peft_format import CONFIG_NAME, read_json_object

        config_path = Path(adapter, CONFIG_NAME)
        if config_path.is_file():
            task = PEFT_TASKS.get(str(read_json_object(config_path, "fix or re-save the adapter").get("task_type")))
            if task:
                return task
        if read_labels(adapter) is not None:
            return "classification"
    return infer_task(model_path)


def load_trained(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, task: str | None = None,
                 allow_pickle: bool = False) -> tuple[nn.Module, Any, str, list[Any] | None]:
    """(model, tokenizer, task, labels) of a trained run: the base from ``model_path`` with the adapter in
    ``adapter`` on it (or ``model_path`` alone: a full fine-tuning output or any model folder).

    Every file of the adapter is read and checked before the base model loads, so a broken adapter
    is refused at once. A classifier's base gets a head sized from the run's ``labels.json`` before
    the adapter (with the trained head, via modules_to_save) goes on. ``labels`` is None for other
    tasks. ``allow_pickle`` lets pickled weights in (read with ``weights_only=True``).
    """
    from deltatune.peft_format import put_on, read_adapter

    read = read_adapter(adapter, allow_pickle) if adapter is not None else None
    task = task or trained_task(model_path, adapter)
    labels = None
    if task == "classification":
        labels = read_labels(adapter) if adapter is not None else None
        labels = labels if labels is not None else read_labels(model_path) if Path(model_path).is_dir() else None
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    model = load_model(model_path, task, dtype, trust_remote_code, labels=labels, pad_token_id=pad_token_id(tokenizer),
                       allow_pickle=allow_pickle)
    if task == "classification" and labels is None:
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if read is not None:
        model = put_on(model, read)
    return model, tokenizer, task, labels


def write_labels(folder: str | os.PathLike, labels: Sequence[Any]) -> None:
    """Store a classifier's label list as ``labels.json`` in ``folder`` (``read_labels`` reads it back)."""
    from deltatune.atomic import atomic_write_text

    atomic_write_text(Path(folder, LABELS_FILE), json.dumps({"labels": list(labels)}, ensure_ascii=False) + "\n")
