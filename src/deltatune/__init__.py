"""deltatune: adapt a pretrained transformer by learning a small delta.

    import deltatune as dt
    model = dt.wrap(base_model, dt.LoRA(rank=8, alpha=16, targets="all-linear"))
    trainable, total = dt.trainable_parameters(model)
    dt.save_adapter(model, "out/")                 # peft on-disk format
    model = dt.load_adapter(base_model, "out/")    # method read from adapter_config.json
    plain = dt.merge(model)                        # base architecture, delta folded in
    with dt.disabled(model): ...                   # base behaviour
"""

import logging

# torchao (QLoRA's NF4) is imported by transformers itself as soon as it is installed; its
# start-up messages (CUDA kernels it cannot load here, a torch deprecation) are not the user's concern
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

from deltatune.errors import DeltatuneError
from deltatune.methods import (METHODS, Adapter, DeltaModule, FreezeTuning, FullFineTuning, LoRA, Method, PrefixTuning,
                               PromptTuning, PTuning, PTuningV2, QLoRA)
from deltatune.model import DeltaModel, disabled, merge, trainable_parameters, wrap
from deltatune.combine import add_weighted_adapter
from deltatune.methods.composition import Composition
from deltatune.methods.p_tuning import label_loss, label_scores
from deltatune.peft_format import load_adapter, save_adapter

from deltatune.saving import save

DeltaModel.writer = staticmethod(save)  # model.py knows no file format; saving wires itself in here

__version__ = "0.1.0"

__all__ = [
    "METHODS", "Adapter", "Composition", "DeltaModel", "add_weighted_adapter", "DeltaModule", "DeltatuneError", "FreezeTuning", "FullFineTuning", "LoRA", "Method", "PTuning", "PTuningV2", "PrefixTuning", "PromptTuning", "QLoRA",
    "disabled", "label_loss", "label_scores", "load_adapter", "merge", "save", "save_adapter", "trainable_parameters", "wrap",
]
