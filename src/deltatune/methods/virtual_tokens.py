"""What the prompt-learning methods share: a hook around the host model's forward.

Prompt tuning, P-tuning and prefix tuning do not swap layers; they change the *call*: extra
positions before (or inside) the input, or extra keys and values at every layer. A
``SequenceDelta`` registers one pre-hook and one post-hook on the host model, so a direct call
and every step of ``generate()`` go through the same glue. Each method says only how to
rewrite the call (``rewrite_call``); this file keeps the bookkeeping they have in common:
reading the call's arguments by name, widening the attention mask, shifting position ids, and
dropping the virtual positions from the logits so outputs keep the base model's shape.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.protocol import DeltaModule

CACHE_NAMES = ("cache", "past_key_values")  # transformers ≥ 5.x calls it `cache`; older 5.x `past_key_values`


class SequenceDelta(DeltaModule):
    """Base of methods that rewrite the forward call of the model they are attached to."""

    slots_in_input_ids = False  # True for methods whose virtual tokens travel as negative ids

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[Any] = []
        self._strip = 0
        self._real_length = 0
        self._parameters_of_call: list[str] = []

    # --- attach / detach -----------------------------------------------------------------
    def attach(self, host: nn.Module) -> None:
        self._parameters_of_call = list(inspect.signature(host.forward).parameters)
        self._handles = [host.register_forward_pre_hook(self._before, with_kwargs=True),
                         host.register_forward_hook(self._after, with_kwargs=True)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def unload(self) -> None:
        """Nothing to put back: the hooks go, and the module is removed from the model."""
        self.detach()
        return None

    def _before(self, host: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._strip = 0
        self._real_length = 0
        if not self.active_adapters:
            if self.slots_in_input_ids:
                ids = kwargs.get("input_ids", args[0] if args else None)
                if torch.is_tensor(ids) and ids.numel() and int(ids.min()) < 0:
                    raise DeltatuneError("input_ids hold P-tuning template slots (negative ids), which the base model "
                                         "cannot read; for base behaviour encode the prompt without the template.")
            return args, kwargs
        if self.batch_adapter_names is not None:
            raise DeltatuneError("Per-example adapter choice is not available for prompt-learning methods.")
        call = dict(zip(self._parameters_of_call, args))
        call.update(kwargs)
        for name in CACHE_NAMES:  # one spelling inside the glue
            if name in call and name != self.cache_name:
                call[self.cache_name] = call.pop(name)
        self._real_length = batch_and_length(call)[1]
        call = self.rewrite_call(host, self.active_adapters[-1], call)
        return (), call

    def _after(self, host: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        self.finish_call(host)
        logits = getattr(output, "logits", None)
        if self._strip and logits is not None and logits.shape[1] > self._real_length:
            # drop the virtual positions; with logits_to_keep the model kept only the last ones already
            output.logits = logits[:, -self._real_length:] if self._real_length else logits[:, :0]
        self._strip = 0
        return output

    @property
    def cache_name(self) -> str:
        return next((n for n in CACHE_NAMES if n in self._parameters_of_call), CACHE_NAMES[0])

    def rewrite_call(self, host: nn.Module, name: str, call: dict) -> dict:
        raise NotImplementedError

    def finish_call(self, host: nn.Module) -> None:
        """Undo whatever ``rewrite_call`` set on the host for the length of one call."""


# --- attaching to a model ----------------------------------------------------------------
def check_not_encoder_decoder(model: nn.Module, method: str) -> None:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise DeltatuneError(f"{method} supports decoder-only and encoder-only models, not encoder–decoder ones "
                             "like BART or T5; use prefix tuning (method prefix) or LoRA there.")


def check_context(model: nn.Module, count: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and count >= limit:
        raise DeltatuneError(f"{count} virtual tokens do not fit the model's context of {limit} positions; "
                             "use fewer num_virtual_tokens.")


def attached_module(model: nn.Module, kind: type) -> Any:
    """The model's ``kind`` module (one per model, holding every adapter of that kind), made on first use."""
    existing = getattr(model, kind.attribute, None)
    if existing is None:
        existing = kind()
        model.add_module(kind.attribute, existing)
        existing.attach(model)
    elif not isinstance(existing, kind):
        raise DeltatuneError(f"The model already has an attribute {kind.attribute!r}; it cannot take a {kind.__name__}.")
    return existing


# --- the shared bookkeeping ----------------------------------------------------------------
def batch_and_length(call: dict) -> tuple[int, int, torch.device]:
    for key in ("input_ids", "inputs_embeds"):
        if call.get(key) is not None:
            tensor = call[key]
            return tensor.shape[0], tensor.shape[1], tensor.device
    raise DeltatuneError("The model was called without input_ids or inputs_embeds.")


def cached_length(call: dict, cache_name: str) -> int:
    cache = call.get(cache_name)
    if cache is None:
        return 0
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else int(cache[0][0].shape[-2])


def widen_attention_mask(call: dict, count: int, already_cached: int = 0, at: int = 0) -> None:
    """Insert ``count`` attended positions at index ``at`` of the 2-D attention mask.

    A missing mask becomes all ones over everything the model will see; on a later generation
    step (``already_cached`` > 0) the cache already holds the virtual positions.
    """
    batch, length, device = batch_and_length(call)
    mask = call.get("attention_mask")
    if mask is None:
        total = already_cached + length + (0 if already_cached else count)
        call["attention_mask"] = torch.ones(batch, total, dtype=torch.long, device=device)
        return
    if mask.dim() != 2:
        raise DeltatuneError("Prompt-learning methods need a 2-D attention mask (batch × length); pass that instead.")
    ones = torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device)
    call["attention_mask"] = torch.cat([mask[:, :at], ones, mask[:, at:]], dim=1)


def shift_positions(call: dict, count: int) -> None:
    """Real tokens move ``count`` positions right (the virtual tokens sit before them)."""
    for key in ("position_ids", "cache_position"):
        if call.get(key) is not None:
            call[key] = call[key] + count


def prepend_labels(call: dict, count: int, at: int = 0) -> None:
    """Token labels get ``count`` ignored positions; a classifier's one label per example stays."""
    labels = call.get("labels")
    if labels is not None and labels.dim() == 2:
        ignore = torch.full((labels.shape[0], count), -100, dtype=labels.dtype, device=labels.device)
        call["labels"] = torch.cat([labels[:, :at], ignore, labels[:, at:]], dim=1)


def prepend_virtual_tokens(host: nn.Module, call: dict, count: int, make_virtual: Callable[[], torch.Tensor],
                           cache_name: str) -> int:
    """Put ``count`` virtual embeddings (``make_virtual()``: [P, hidden]) before the input.

    On a later generation step they are in the cache already, so only the mask and positions
    move. Returns how many leading logits positions are virtual (0 on such a step).
    """
    cached = cached_length(call, cache_name)
    widen_attention_mask(call, count, already_cached=cached)
    if cached:
        shift_positions(call, count)
        return 0
    batch, _, _ = batch_and_length(call)
    ids = call.pop("input_ids", None)
    embeds = call.get("inputs_embeds")
    if embeds is None:
        embeds = host.get_input_embeddings()(ids)  # [B, L, hidden]
    virtual = make_virtual().to(embeds.dtype)  # [P, hidden]
    call["inputs_embeds"] = torch.cat([virtual.expand(batch, -1, -1), embeds], dim=1)  # [B, P+L, hidden]
    if call.get("position_ids") is not None:
        positions = torch.arange(count, device=embeds.device).expand(batch, -1)
        call["position_ids"] = torch.cat([positions, call["position_ids"] + count], dim=1)
    if call.get("token_type_ids") is not None:
        types = call["token_type_ids"]
        call["token_type_ids"] = torch.cat([types.new_zeros(batch, count), types], dim=1)
    prepend_labels(call, count)
    return count
