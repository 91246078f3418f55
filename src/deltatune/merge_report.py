"""What a merge changes, in numbers: ``deltatune merge`` prints it for every method.

The merged model's logits on a few prompts are compared with the adapter model's just before
the merge (float noise only: W' = W + s·B A is summed in fp32 and rounded once). When the
method prepared the base (``Method.prepare_base``; QLoRA stores it in NF4), they are also
compared with the same adapter on the base as loaded (``Method.reference_method``): that
difference is what the preparation costs — the quantisation error — which a merge cannot undo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from deltatune.model import DeltaModel, merge, wrap
from deltatune.peft_format import load_adapter_tensors, read_adapter_folder

PROMPTS = ("Once upon a time, there was a little", "name : The Eagle | Type : coffee shop | food : French |",
           "The quick brown fox jumps over the lazy dog.")


@dataclass(frozen=True)
class LogitDifference:
    against: str  # what the merged model is compared with
    max: float  # max |logit difference| over every position and vocabulary entry of the prompts
    mean: float

    def line(self) -> str:
        return f"max / mean |logit difference| vs {self.against}: {self.max:.3g} / {self.mean:.3g}"


def merge_with_report(model: DeltaModel, adapter_dir: str | os.PathLike, load_base: Callable[[], nn.Module],
                      prompts: Sequence[Sequence[int]]) -> tuple[nn.Module, list[LogitDifference]]:
    """``dt.merge(model)`` (its active adapter, loaded from ``adapter_dir``) and how far the merged
    model's logits on ``prompts`` (token ids) are from the models it stands for. ``load_base``
    loads a fresh copy of the base model, for the reference method's model."""
    name = model.active_adapter
    method = model.methods[name]
    references = {"the adapter model": _logits(model, prompts)}
    reference = method.reference_method()
    if reference != method:
        twin = wrap(load_base(), reference, name)
        load_adapter_tensors(twin, name, read_adapter_folder(adapter_dir)[1])
        references[f"the base as loaded + the adapter as {reference.cli_name}"] = _logits(twin, prompts)
        del twin
    merged = merge(model)
    out = _logits(merged, prompts)
    return merged, [LogitDifference(label, (out - ref).abs().max().item(), (out - ref).abs().mean().item())
                    for label, ref in references.items()]


def prompt_ids(tokenizer: object) -> list[list[int]]:
    """The report's prompts as token ids, each on its own (no padding to get wrong)."""
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


def _logits(model: nn.Module, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Every prompt's logits, positions concatenated, in fp32: (total positions, vocab)."""
    device = next(model.parameters()).device
    decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)  # the prompt on both sides
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            ids = torch.tensor([ids], device=device)
            kwargs = {"decoder_input_ids": ids} if decoder else {}
            outputs.append(model(input_ids=ids, **kwargs).logits[0].float().cpu())
    return torch.cat(outputs)
