"""Save what a run trained, in the form its method produces (``Method.artifact``):

    "adapter"   an adapter folder in peft's layout (deltatune.peft_format.save_adapter): the
                method's tensors, adapter_config.json and deltatune_method.json. Freeze tuning
                writes this too: its tensors are the trained base weights under their own
                state-dict keys, and its config the selection (docs/freeze.md)
    "model"     a whole transformers model folder, loadable by ``from_pretrained`` (full
                fine-tuning, whose delta is every weight of the model)

The runner and the trainer call :func:`save` and never ask which method they hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping

import torch

from deltatune.atomic import atomic_write_text, files_into
from deltatune.errors import DeltatuneError
from deltatune.model import DeltaModel
from deltatune.peft_format import METHOD_NAME, save_adapter, save_composition


def save_model_folder(model: DeltaModel, directory: str | os.PathLike, adapter_name: str | None = None,
                      parameters: Mapping[str, torch.Tensor] | None = None) -> Path:
    """The base model with its trained weights as a transformers folder; each file lands by a rename.

    ``parameters`` (keyed as ``model.adapter_parameters(name)``) replace the live values of the
    trained weights: what the main process of a sharded run gathered.
    """
    name = adapter_name or model.active_adapter
    model.require_adapter(name)
    base = model.base_model
    state = None
    if parameters is not None:
        live = model.adapter_parameters(name)
        own = {id(p): key for key, p in base.state_dict(keep_vars=True).items()}
        state = base.state_dict()
        state.update({own[id(param)]: parameters[key] for key, param in live.items() if id(param) in own})
    directory = Path(directory)
    with files_into(directory) as staging:  # files already there (a run's log) stay
        base.save_pretrained(staging, state_dict=state)
    described = {"method": model.methods[name].cli_name, "settings": model.methods[name].describe()}
    atomic_write_text(directory / METHOD_NAME, json.dumps(described, indent=2, sort_keys=True) + "\n")
    return directory


WRITERS: dict[str, Callable[..., Path]] = {"adapter": save_adapter, "model": save_model_folder}


def save(model: DeltaModel, directory: str | os.PathLike, adapter_name: str | None = None,
         parameters: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) as its method's artifact.

    With several adapters active and no name given, the composition: one adapter folder per
    adapter (``peft_format.save_composition``); ``parameters`` then maps each name to its values.
    """
    if not isinstance(model, DeltaModel):
        raise DeltatuneError("save needs a model wrapped by deltatune.wrap(...) or deltatune.load_adapter(...).")
    if adapter_name is None and len(model.active_adapters) > 1:
        return save_composition(model, directory, parameters=parameters)
    name = adapter_name or model.active_adapter
    model.require_adapter(name)
    return WRITERS[model.methods[name].artifact](model, directory, name, parameters)
