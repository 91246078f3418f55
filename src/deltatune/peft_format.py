"""Save and load adapters in the Hugging Face peft on-disk format.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensor keys are the
module path in the base model with a ``base_model.model.`` prefix and the adapter name left
out, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.

A composition (several adapters active together) is one such folder per adapter,
``<dir>/<adapter name>/`` (peft's own layout for named adapters), each loadable alone where peft
can express its method, plus ``deltatune_composition.json``: the adapters, active in that order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.atomic import atomic_file, atomic_write_text
from deltatune.errors import DeltatuneError
from deltatune.methods import DeltaModule, Method, method_class, method_from_peft_config
from deltatune.model import DeltaModel, wrap

CONFIG_NAME = "adapter_config.json"
TRAINING_STATE_NAME = "adapter_training_state.safetensors"  # deltatune's own: full trainable state
METHOD_NAME = "deltatune_method.json"  # deltatune's own: the method and its settings, exactly
COMPOSITION_NAME = "deltatune_composition.json"  # deltatune's own: which subfolders run together
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

def _auto_class_names(mapping_name: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, mapping_name, {}).values():
        names.update([value] if isinstance(value, str) else value)
    return names


TASK_MAPPINGS = {"CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                 "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                 "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                 "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                 "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"}


def task_type(model: nn.Module) -> str | None:
    """peft's task_type for a transformers model class (it decides how peft wraps the model)."""
    name = type(model).__name__
    return next((task for task, mapping in TASK_MAPPINGS.items() if name in _auto_class_names(mapping)), None)


def adapter_state_dict(model: DeltaModel, adapter_name: str,
                       parameters: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one adapter under its peft key.

    ``parameters`` (keyed as ``model.adapter_parameters(adapter_name)``) gives the values to use
    instead of the live parameters: a state dict gathered from sharded training, say.
    """
    state = {}
    for path, module in model.delta_modules():
        if adapter_name not in module.adapter_names():
            continue
        if parameters is None:
            tensors = module.adapter_state(adapter_name)
        else:
            own = {local: parameters[f"{path}.{local}"] for local in module.adapter_parameters(adapter_name)}
            with torch.no_grad():
                tensors = module.peft_state(adapter_name, own)
        for local, tensor in tensors.items():
            state[key_prefix(path, module, model.methods[adapter_name]) + local] = tensor.detach().to("cpu").contiguous().clone()
    return state


def key_prefix(path: str, module: DeltaModule, method: Method) -> str:
    """Where a module's tensors sit in the file: under its path below the method's root
    (``base_model.model.`` for LoRA, ``base_model.`` for prompt methods' trained heads, as peft
    wraps the model one level less there), or at the file's root (soft prompts, prefix tables)."""
    prefix = module.peft_key_prefix
    return f"{method.peft_module_root}{path}." if prefix is None else prefix


def adapter_config(model: DeltaModel, adapter_name: str) -> dict[str, Any]:
    base = model.base_model
    method = model.methods[adapter_name]
    config = method.peft_config(base)
    config["task_type"] = task_type(base)
    config["base_model_name_or_path"] = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    config["inference_mode"] = True
    return config


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None,
                 parameters: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write one adapter (default: the active one) into a peft folder, each file atomically.

    ``parameters`` (keyed as ``model.adapter_parameters(name)``) are the values to write instead
    of the live ones: what the main process of a sharded run gathered.
    """
    if not isinstance(model, DeltaModel):
        raise DeltatuneError("save_adapter needs a model wrapped by deltatune.wrap(...) or deltatune.load_adapter(...).")
    name = adapter_name or model.active_adapter
    model.require_adapter(name)
    state = adapter_state_dict(model, name, parameters)
    config = adapter_config(model, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first, config last, each through a temporary name: a folder whose config is
    # present holds a complete adapter, and other files in it (a run's log) are left alone.
    with atomic_file(directory / WEIGHTS_NAME) as staging:
        save_file(state, str(staging), metadata={"format": "pt"})
    training_state = training_state_dict(model, name, parameters)
    if training_state:
        with atomic_file(directory / TRAINING_STATE_NAME) as staging:
            save_file(training_state, str(staging), metadata={"format": "pt"})
    else:
        (directory / TRAINING_STATE_NAME).unlink(missing_ok=True)
    described = {"method": model.methods[name].cli_name, "settings": model.methods[name].describe()}
    atomic_write_text(directory / METHOD_NAME, json.dumps(described, indent=2, sort_keys=True) + "\n")
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / COMPOSITION_NAME).unlink(missing_ok=True)  # the folder now holds one adapter
    return Path(directory)


def save_composition(model: nn.Module, directory: str | os.PathLike, adapter_names: list[str] | None = None,
                     parameters: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> Path:
    """Write adapters that run together (default: the active ones) as ``<dir>/<name>/`` peft
    folders and, last, ``deltatune_composition.json`` naming them in order.

    ``parameters`` maps each adapter name to the values to write instead of its live ones.
    """
    if not isinstance(model, DeltaModel):
        raise DeltatuneError("save_composition needs a model wrapped by deltatune.wrap(...) or deltatune.load_adapter(...).")
    names = list(adapter_names) if adapter_names is not None else list(model.active_adapters)
    if len(names) < 2:
        raise DeltatuneError(f"save_composition needs at least two adapters, got {names}; save one adapter with "
                             "deltatune.save(model, directory, adapter_name).")
    for name in names:
        model.require_adapter(name)
    model.check_composable(names)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        save_adapter(model, directory / name, name, None if parameters is None else parameters[name])
    for stale in (CONFIG_NAME, WEIGHTS_NAME, TRAINING_STATE_NAME, METHOD_NAME):  # a single adapter saved here before
        (directory / stale).unlink(missing_ok=True)
    manifest = {"adapters": names, "active": names,
                "layout": "one peft adapter folder per adapter, <adapter name>/, active together in this order"}
    atomic_write_text(directory / COMPOSITION_NAME, json.dumps(manifest, indent=2) + "\n")
    return directory


def read_composition(directory: str | os.PathLike) -> list[str] | None:
    """The adapter names of a composition folder, in order; None for a folder of one adapter."""
    path = Path(directory, COMPOSITION_NAME)
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))["adapters"]
    except (json.JSONDecodeError, KeyError, TypeError):
        names = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DeltatuneError(f"{path} does not list the composition's adapters like {{\"adapters\": [\"prefix\", "
                             "\"adapter\"]}; re-save the composition.")
    for name in names:
        if Path(name).name != name or name in (".", ".."):
            raise DeltatuneError(f"{path} names {name!r}, which is not an adapter subfolder; re-save the composition.")
    return names


def training_state_dict(model: DeltaModel, adapter_name: str,
                        parameters: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the adapter, when peft's file holds less (a folded MLP, PiSSA's
    rewritten factors): what exact resumption needs. Empty when peft's tensors are the parameters."""
    params = model.adapter_parameters(adapter_name)
    pointers = {p.data_ptr() for p in params.values()}
    saved = [t for path, m in model.delta_modules() if adapter_name in m.adapter_names()
             for t in m.adapter_state(adapter_name).values()]
    if len(saved) == len(params) and all(t.data_ptr() in pointers for t in saved):
        return {}
    values = params if parameters is None else parameters
    return {key: values[key].detach().to("cpu").contiguous().clone() for key in params}


def read_adapter_folder(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a peft adapter folder, with one-sentence errors for what is wrong."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise DeltatuneError(f"Adapter folder {str(directory)!r} does not exist; pass the output folder of 'deltatune train'.")
    if not config_path.is_file():
        raise DeltatuneError(f"{str(directory)!r} has no {CONFIG_NAME}; it is not an adapter folder.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DeltatuneError(f"{config_path} is not valid JSON ({error.msg} at line {error.lineno}); fix or re-save the adapter.") from None
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise DeltatuneError(f"{str(directory)!r} holds adapter_model.bin (a pickle, unsafe to load); "
                                 "convert it to adapter_model.safetensors with peft first.")
        raise DeltatuneError(f"{str(directory)!r} has no {WEIGHTS_NAME}; the adapter was not saved completely.")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise DeltatuneError(f"{weights_path} is not a readable safetensors file ({error}); re-save the adapter.") from None
    return config, tensors


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 trainable: bool = False) -> DeltaModel:
    """Put the adapter saved in ``directory`` onto ``model`` (a base model or a DeltaModel).

    With ``trainable=True`` and a training state in the folder (written by deltatune when peft's
    file holds less than the trainable parameters), the exact training-time form comes back —
    the prefix MLP, PiSSA's factors — so training continues where it stopped.

    A composition folder (``deltatune_composition.json``) puts each of its adapters on under its
    own name (``adapter_name`` is not used) and activates them together, as when it was saved.
    """
    names = read_composition(directory)
    if names is not None:
        wrapped = model
        for name in names:
            wrapped = load_adapter(wrapped, Path(directory, name), name, trainable)
        wrapped.set_adapter(names)
        for name in names:
            for param in wrapped.adapter_parameters(name).values():
                param.requires_grad_(trainable)
        return wrapped
    config, tensors = read_adapter_folder(directory)
    described = read_method_description(directory)
    if trainable and described and Path(directory, TRAINING_STATE_NAME).is_file():
        wrapped = wrap(model, method_class(described["method"])(**described["settings"]), adapter_name)
        load_training_state(wrapped, adapter_name, load_file(str(Path(directory, TRAINING_STATE_NAME))))
    else:
        wrapped = wrap(model, method_from_peft_config(config), adapter_name)
        load_adapter_tensors(wrapped, adapter_name, tensors, config.get("base_model_name_or_path"))
    for param in wrapped.adapter_parameters(adapter_name).values():
        param.requires_grad_(trainable)
    return wrapped


def read_method_description(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory, METHOD_NAME)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # the peft files still describe the adapter


def load_training_state(model: DeltaModel, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    params = model.adapter_parameters(adapter_name)
    if set(params) != set(tensors):
        missing = sorted(set(params) ^ set(tensors))[0]
        raise DeltatuneError(f"The training state does not fit this model (tensor {missing!r}); "
                             "load it on the base model and method it was trained with.")
    with torch.no_grad():
        for key, param in params.items():
            if param.shape != tensors[key].shape:
                raise DeltatuneError(f"Training-state tensor {key!r} has shape {tuple(tensors[key].shape)} but the "
                                     f"model needs {tuple(param.shape)}; load it on the model it was trained on.")
            param.copy_(tensors[key])


def load_adapter_tensors(model: DeltaModel, adapter_name: str, tensors: dict[str, torch.Tensor],
                         made_for: str | None = None) -> None:
    """Hand each tensor to the module whose key it is; a tensor nobody expects is an error."""
    owners = [(key_prefix(path, module, model.methods[adapter_name]), module) for path, module in model.delta_modules()
              if adapter_name in module.adapter_names()]
    owner_of = {prefix + local: (prefix, module) for prefix, module in owners
                for local in module.adapter_state(adapter_name)}
    by_owner: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix, _ in owners}
    for key, tensor in tensors.items():
        if key not in owner_of and key.startswith(KEY_PREFIX):  # deltatune 0.1 wrote prompt methods' heads so
            key = "base_model." + key[len(KEY_PREFIX):]
        if key not in owner_of:
            hint = f" (it was made for {made_for})" if made_for else ""
            raise DeltatuneError(f"Adapter tensor {key!r} has no matching module in this base model{hint}; "
                                 "load the adapter on the model it was trained on.")
        prefix, _ = owner_of[key]
        by_owner[prefix][key[len(prefix):]] = tensor
    for prefix, module in owners:
        module.load_adapter_state(adapter_name, by_owner[prefix], where=prefix.rstrip(".") or "adapter")
