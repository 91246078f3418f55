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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.atomic import COMPOSITION_NAME, atomic_file, atomic_write_text
from deltatune.errors import DeltatuneError
from deltatune.methods import METHODS, DeltaModule, Method, method_class, method_from_peft_config
from deltatune.model import ADAPTER_NAME, DeltaModel, require_adapter_name

CONFIG_NAME = "adapter_config.json"
TRAINING_STATE_NAME = "adapter_training_state.safetensors"  # deltatune's own: full trainable state
METHOD_NAME = "deltatune_method.json"  # deltatune's own: the method and its settings, exactly
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
    if not path.exists():
        return None
    names = read_json_object(path, "re-save the composition").get("adapters")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DeltatuneError(f"{path} does not list the composition's adapters like {{\"adapters\": [\"prefix\", "
                             "\"adapter\"]}; re-save the composition.")
    for name in names:  # each is a subfolder: an adapter name, never a path out of the folder
        if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME, name):
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


# --- reading: every file checked before any model changes -----------------------------------
PICKLE_NAME = "adapter_model.bin"  # old peft's weights: a pickle, read only when the user allows it


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# The peft keys that methods read with a conversion (int(), bool(), a lookup): each must hold its
# kind of value, or the conversion would turn garbage into a setting. Ranges are the methods' own
# checks (``Method.from_peft_config`` builds the method, whose construction validates it).
PEFT_KEY_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "peft_type": ("text, like \"LORA\"", _is_text),
    "task_type": ("text, like \"CAUSAL_LM\"", _is_text),
    "base_model_name_or_path": ("text", _is_text),
    "deltatune_method": ("text, like \"qlora\"", _is_text),
    "deltatune_peft_incompatible": ("text", _is_text),
    "target_modules": ("a list of module names or one regular expression", lambda v: _is_text(v) or _is_names(v)),
    "modules_to_save": ("a list of module names", _is_names),
    "modules": ("a list of module names or one regular expression", lambda v: _is_text(v) or _is_names(v)),
    "num_virtual_tokens": ("a whole number", _is_whole),
    "num_transformer_submodules": ("a whole number", _is_whole),
    "encoder_hidden_size": ("a whole number", _is_whole),
    "encoder_num_layers": ("a whole number", _is_whole),
    "encoder_reparameterization_type": ("text, MLP or LSTM", _is_text),
    "prefix_projection": ("true or false", lambda v: isinstance(v, bool)),
    "deltatune_encoder_prefix": ("true or false", lambda v: isinstance(v, bool)),
    "deltatune_cross_prefix": ("true or false", lambda v: isinstance(v, bool)),
    "deltatune_quantization": ("a mapping of quantisation settings", lambda v: isinstance(v, dict)),
}


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file that must hold one object; ``fix`` ends each error sentence."""
    try:
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except OSError as error:
        raise DeltatuneError(f"{path} cannot be read ({error.strerror or error}); {fix}.") from None
    except UnicodeDecodeError as error:
        raise DeltatuneError(f"{path} is not UTF-8 text (byte {error.start}); {fix}.") from None
    except json.JSONDecodeError as error:
        raise DeltatuneError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}); {fix}.") from None
    except RecursionError:
        raise DeltatuneError(f"{path} nests lists or objects too deeply to be a settings file; {fix}.") from None
    if not isinstance(value, dict):
        kind = {list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(type(value), "a number")
        raise DeltatuneError(f"{path} must hold one JSON object ({{\"key\": value, ...}}) but holds {kind}; {fix}.")
    return value


def check_peft_config(path: Path, config: dict[str, Any]) -> None:
    if "peft_type" not in config:
        raise DeltatuneError(f"{path} has no peft_type, so it describes no adapter; re-save the adapter.")
    for key, (kind, fits) in PEFT_KEY_KINDS.items():
        if config.get(key) is not None and not fits(config[key]):
            raise DeltatuneError(f"{path} sets {key} to {config[key]!r}, which must be {kind}; fix the file or "
                                 "re-save the adapter.")
    named = METHODS.get(config.get("deltatune_method"))
    if named is not None and named.peft_type != config["peft_type"]:
        raise DeltatuneError(f"{path} names method {config['deltatune_method']!r}, whose peft_type is "
                             f"{named.peft_type}, but sets peft_type {config['peft_type']!r}; fix the file or re-save "
                             "the adapter.")


def check_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Adapter tensors are floating-point arrays of finite numbers: an int8 or bool tensor would be
    cast into a parameter silently, a scalar fits no layer, and NaN or inf spreads to every output."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise DeltatuneError(f"{path} holds tensor {key!r} as {str(tensor.dtype).removeprefix('torch.')}, "
                                 "not floating point, so it is no adapter weight; re-save the adapter.")
        if tensor.dim() == 0:
            raise DeltatuneError(f"{path} holds tensor {key!r} as a single number, which fits no layer; "
                                 "re-save the adapter.")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise DeltatuneError(f"{path} holds {bad:,} NaN or infinite value(s) in tensor {key!r} (training diverged, "
                                 "or the file is damaged); use an earlier checkpoint or train again.")


def read_weights(directory: Path, allow_pickle: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the weights file, its tensors): safetensors, or old peft's pickle only when ``allow_pickle``."""
    weights_path, pickle_path = directory / WEIGHTS_NAME, directory / PICKLE_NAME
    if not weights_path.exists() and pickle_path.is_file():
        if not allow_pickle:
            raise DeltatuneError(f"{str(directory)!r} holds its weights only as {PICKLE_NAME}, a pickle, which can run "
                                 "code when loaded; convert it to adapter_model.safetensors with peft, or, if you trust "
                                 "where it came from, pass allow_pickle=True (--allow-pickle) to read its tensors only.")
        return pickle_path, read_pickled_tensors(pickle_path)
    if not weights_path.is_file():
        state = "is not a file" if weights_path.exists() else "is missing"
        raise DeltatuneError(f"{weights_path} {state}; the adapter was not saved completely: save it again.")
    try:
        return weights_path, load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise DeltatuneError(f"{weights_path} is not a readable safetensors file ({error}); re-save the adapter.") from None


def read_pickled_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a pickle through ``torch.load(weights_only=True)``: plain tensors and containers
    only, so a pickle that would run code is refused instead of run."""
    import pickle

    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DeltatuneError(f"{path} is not a plain file of tensors ({first[:200]}); it was not loaded. Convert it "
                             "to safetensors where it was made.") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise DeltatuneError(f"{path} does not hold a mapping of names to tensors; it is no adapter's weights.")
    return tensors


def read_adapter_folder(directory: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a peft adapter folder, each checked: one sentence for what is wrong."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        state = "is a file, not a folder" if directory.exists() else "does not exist"
        raise DeltatuneError(f"Adapter folder {str(directory)!r} {state}; pass the output folder of 'deltatune train'.")
    if not config_path.is_file():
        whole_model = " but a whole model folder: pass it as --model" if (directory / "config.json").is_file() else ""
        raise DeltatuneError(f"{str(directory)!r} has no {CONFIG_NAME}; it is not an adapter folder{whole_model}.")
    config = read_json_object(config_path, "fix or re-save the adapter")
    check_peft_config(config_path, config)
    weights_path, tensors = read_weights(directory, allow_pickle)
    check_tensors(weights_path, tensors)
    return config, tensors


def adapter_method(directory: str | os.PathLike, config: dict[str, Any]) -> Method:
    """The method an adapter_config.json describes; a value it refuses names the file."""
    path = Path(directory, CONFIG_NAME)
    try:
        return method_from_peft_config(config)
    except DeltatuneError as error:
        raise DeltatuneError(f"{path} does not describe a usable adapter: {error}") from None
    except KeyError as error:  # a setting the method's peft type cannot do without
        raise DeltatuneError(f"{path} has no {error.args[0]!r}, which a {config['peft_type']} adapter needs; "
                             "re-save the adapter.") from None


def read_method_description(directory: str | os.PathLike) -> dict[str, Any] | None:
    """deltatune's own record of the method and its settings (``deltatune_method.json``), or None."""
    path = Path(directory, METHOD_NAME)
    if not path.exists():
        return None
    fix = "delete it (adapter_config.json still describes the adapter) or save the adapter again"
    described = read_json_object(path, fix)
    if described.get("method") not in METHODS or not isinstance(described.get("settings", {}), dict):
        raise DeltatuneError(f"{path} does not name a method and its settings like {{\"method\": \"lora\", "
                             f"\"settings\": {{...}}}}; {fix}.")
    return described


@dataclass(frozen=True)
class AdapterFiles:
    """One adapter folder, read and checked without a model: what ``put_on`` needs."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    method: Method
    described: dict[str, Any] | None


def read_adapter(directory: str | os.PathLike, allow_pickle: bool = False) -> list[tuple[str | None, AdapterFiles]]:
    """Every file of an adapter folder, checked: [(None, files)], or for a composition folder
    [(adapter name, files), ...] in order. Nothing here needs the base model, so a broken folder
    is refused before one is loaded."""
    names = read_composition(directory)
    folders = [(None, Path(directory))] if names is None else [(name, Path(directory, name)) for name in names]
    read = []
    for name, folder in folders:
        config, tensors = read_adapter_folder(folder, allow_pickle)
        read.append((name, AdapterFiles(folder, config, tensors, adapter_method(folder, config),
                                        read_method_description(folder))))
    return read


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 trainable: bool = False, allow_pickle: bool = False) -> DeltaModel:
    """Put the adapter saved in ``directory`` onto ``model`` (a base model or a DeltaModel).

    With ``trainable=True`` and a training state in the folder (written by deltatune when peft's
    file holds less than the trainable parameters), the exact training-time form comes back —
    the prefix MLP, PiSSA's factors — so training continues where it stopped.

    A composition folder (``deltatune_composition.json``) puts each of its adapters on under its
    own name (``adapter_name`` is not used) and activates them together, as when it was saved.

    Weights come from ``adapter_model.safetensors``; a folder with only a pickle
    (``adapter_model.bin``) is refused unless ``allow_pickle``, and then read with
    ``torch.load(weights_only=True)``, which never runs code. A folder deltatune refuses leaves
    ``model`` exactly as it was.
    """
    require_adapter_name(adapter_name)
    return put_on(model, read_adapter(directory, allow_pickle), adapter_name, trainable)


def put_on(model: nn.Module, read: list[tuple[str | None, AdapterFiles]], adapter_name: str = "default",
           trainable: bool = False) -> DeltaModel:
    """Put adapters read by ``read_adapter`` onto ``model``: all of them, or — when one does not fit
    the model — none, with ``model`` as it was."""
    trains = {id(p): p.requires_grad for p in model.parameters()}
    wrapped = model if isinstance(model, DeltaModel) else DeltaModel(model)
    before, active = set(wrapped.methods), wrapped.active_adapters
    names = [name or adapter_name for name, _ in read]
    try:
        for name, (_, files) in zip(names, read):
            _put_one_on(wrapped, name, files, trainable)
        wrapped.set_adapter(names)
    except DeltatuneError:
        for name in reversed([n for n in wrapped.methods if n not in before]):
            wrapped.delete_adapter(name)
        if active:
            wrapped.set_adapter(list(active))
        for param in model.parameters():
            param.requires_grad_(trains.get(id(param), False))
        raise
    for name in names:
        for param in wrapped.adapter_parameters(name).values():
            param.requires_grad_(trainable)
    return wrapped


def _put_one_on(wrapped: DeltaModel, name: str, files: AdapterFiles, trainable: bool) -> None:
    training_state = files.folder / TRAINING_STATE_NAME
    if trainable and files.described and training_state.is_file():
        tensors = read_training_state(training_state)
        try:
            method = method_class(files.described["method"])(**files.described.get("settings", {}))
        except (TypeError, DeltatuneError) as error:  # a setting the method does not take, or refuses
            raise DeltatuneError(f"{files.folder / METHOD_NAME} holds settings its method cannot use ({error}); "
                                 "save the adapter again, or load it without trainable=True.") from None
        if method.reference_method() != method:
            _rehearse(wrapped, name, method.reference_method(), lambda: load_training_state(wrapped, name, tensors))
        wrapped.add_adapter(name, method)
        load_training_state(wrapped, name, tensors)
        return
    made_for = files.config.get("base_model_name_or_path")
    load = lambda: load_adapter_tensors(wrapped, name, files.tensors, made_for)
    if files.method.reference_method() != files.method:
        _rehearse(wrapped, name, files.method.reference_method(), load)
    wrapped.add_adapter(name, files.method)
    load()


def _rehearse(wrapped: DeltaModel, name: str, reference: Method, load: Callable[[], None]) -> None:
    """Load onto ``reference`` first and take it off again: a method whose ``prepare_base`` changes the
    base for good (QLoRA quantises it) meets a misfit tensor there, before the base is changed."""
    wrapped.add_adapter(name, reference)
    try:
        load()
    finally:
        wrapped.delete_adapter(name)


def read_training_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise DeltatuneError(f"{path} is not a readable safetensors file ({error}); load the adapter without "
                             "trainable=True, or save it again.") from None
    check_tensors(path, tensors)
    return tensors


def load_training_state(model: DeltaModel, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    params = model.adapter_parameters(adapter_name)
    if set(params) != set(tensors):
        missing = sorted(set(params) ^ set(tensors))[0]
        raise DeltatuneError(f"The training state does not fit this model (tensor {missing!r}); "
                             "load it on the base model and method it was trained with.")
    for key, param in params.items():  # every shape first: nothing is copied from a state that does not fit
        if param.shape != tensors[key].shape:
            raise DeltatuneError(f"Training-state tensor {key!r} has shape {tuple(tensors[key].shape)} but the "
                                 f"model needs {tuple(param.shape)}; load it on the model it was trained on.")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


def load_adapter_tensors(model: DeltaModel, adapter_name: str, tensors: dict[str, torch.Tensor],
                         made_for: str | None = None) -> None:
    """Hand each tensor to the module whose key it is; a tensor nobody expects is an error."""
    owners = [(key_prefix(path, module, model.methods[adapter_name]), module) for path, module in model.delta_modules()
              if adapter_name in module.adapter_names()]
    owner_of = {prefix + local: (prefix, module) for prefix, module in owners
                for local in module.adapter_state(adapter_name)}
    by_owner: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix, _ in owners}
    for written, tensor in tensors.items():
        key = written
        if key not in owner_of and key.startswith(KEY_PREFIX):  # deltatune 0.1 wrote prompt methods' heads so
            key = "base_model." + key[len(KEY_PREFIX):]
        if key not in owner_of:
            hint = f" (it was made for {made_for})" if made_for else ""
            raise DeltatuneError(f"Adapter tensor {written!r} has no matching module in this base model{hint}; "
                                 "load the adapter on the model it was trained on.")
        prefix, _ = owner_of[key]
        by_owner[prefix][key[len(prefix):]] = tensor
    for prefix, module in owners:
        module.load_adapter_state(adapter_name, by_owner[prefix], where=prefix.rstrip(".") or "adapter")
