"""What a merge changes, in numbers: ``deltatune merge`` prints it for every method.

The merged model's logits on a few prompts are compared with the adapter model's just before
the merge (float noise only: W' = W + s·B A is summed in fp32 and rounded once). When the
method prepared the base (``Method.prepare_base``; QLoRA stores it in NF4), they are also
compared with the same adapter on the base as loaded (``Method.reference_method``): that
difference is what the preparation costs — the quantisation error — which a merge cannot undo.

``requantize=True`` then stores the merged model's linear weights in NF4 again (the layers the
adapter's base had in NF4, with their layouts; QLoRA's defaults for a full-precision base) and
compares its logits with the merged model's just before: the error re-quantising adds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from deltatune.methods.qlora import quantized_layers, requantize as requantize_nf4
from deltatune.model import DeltaModel, merge, wrap
from deltatune.peft_format import load_adapter_tensors, read_adapter_folder

PROMPTS = ("Once upon a time, there was a little", "name : The Eagle | Type : coffee shop | food : French |",
           "The quick brown fox jumps over the lazy dog.")


@dataclass(frozen=True)
class LogitDifference:
    against: str  # what the merged model is compared with
    max: float  # max |logit difference| over every position and vocabulary entry of the prompts
    mean: float
    of: str = ""  # the model compared, when it is not the merged model itself

    def line(self) -> str:
        of = f" of {self.of}" if self.of else ""
        return f"max / mean |logit difference|{of} vs {self.against}: {self.max:.3g} / {self.mean:.3g}"


def merge_with_report(model: DeltaModel, adapter_dir: str | os.PathLike, load_base: Callable[[], nn.Module],
                      prompts: Sequence[Sequence[int]], requantize: bool = False) -> tuple[nn.Module, list[LogitDifference]]:
    """``dt.merge(model)`` (its active adapter, loaded from ``adapter_dir``) and how far the merged
    model's logits on ``prompts`` (token ids) are from the models it stands for. ``load_base``
    loads a fresh copy of the base model, for the reference method's model. ``requantize``:
    the merged model comes back with its linear weights in NF4, and one more line says what that cost."""
    name = model.active_adapter
    method = model.methods[name]
    references = {"the adapter model": _logits(model, prompts)}
    reference = method.reference_method()
    if reference != method:
        twin = wrap(load_base(), reference, name)
        load_adapter_tensors(twin, name, read_adapter_folder(adapter_dir)[1])
        references[f"the base as loaded + the adapter as {reference.cli_name}"] = _logits(twin, prompts)
        del twin
    layers = quantized_layers(model.base_model)  # before the merge turns them dense
    merged = merge(model)
    out = _logits(merged, prompts)
    report = [_difference(out, ref, label) for label, ref in references.items()]
    if requantize:
        requantize_nf4(merged, layers)
        report.append(_difference(_logits(merged, prompts), out, "the merged model before re-quantising",
                                  of="the model re-quantised to NF4"))
    return merged, report


def _difference(out: torch.Tensor, reference: torch.Tensor, against: str, of: str = "") -> LogitDifference:
    gap = (out - reference).abs()
    return LogitDifference(against, gap.max().item(), gap.mean().item(), of)


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
