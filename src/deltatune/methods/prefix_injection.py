"""Where prefix keys and values enter a model whose call carries no cache for them.

A decoder-only model takes its prefix through the KV cache it is called with (prefix_tuning.py).
Two other places need glue. Both are forward pre-hooks on the model's own modules, so a direct
call, ``generate()`` (which runs the encoder by itself, once) and a gradient-checkpointing
recompute all pass through the same code, and no model code is copied.

**Encoder self-attention** (BART/T5 encoders, BERT/RoBERTa), for each layer:

    scores = q·[P_k; K]ᵀ·scale + [0 | bias] + [0 | mask],   out = softmax(scores)·[P_v; V]
    P_k, P_v: [batch, heads, P, head_dim]   K, V: [batch, heads, L, head_dim]   scores: [batch, heads, L, P+L]

* a hook on the encoder stack widens its 2-D attention mask to [1…1 (P); mask] — transformers'
  mask builders take the key length from the mask — and builds a read-only prefix cache;
* a hook on each self-attention module hands that cache in as the module's ``cache`` argument, so
  the module's own ``cache.update(k, v, layer_idx)`` returns [prefix; k];
* T5's relative position bias (computed by layer 0 and handed on to the others) gets P zero
  columns in front: prefix keys have no position. Real tokens keep their positions everywhere in
  the encoder (BERT's [CLS] stays at position 0).

The cache of the latest encoder call is kept until the next one, not dropped when the call
returns: a checkpointed layer is recomputed during backward, after the call, and must find it.
(So under checkpointing, two forward calls before one backward must use the same adapter and batch size.)

**The decoder of an encoder–decoder model**: a hook on the decoder stack passes an
``EncoderDecoderCache`` whose self-attention side holds the decoder prefix and whose
cross-attention side holds the cross prefix. On the first call cross-attention appends the
encoder's keys after the prefix and marks the layer done (``is_updated``); later generation
steps reuse them. The cache is filled after it is built: EncoderDecoderCache's constructor marks
every non-empty cross layer done, which would skip the encoder's keys altogether (peft 0.21.2
avoids that by emptying the cross cache, dropping the cross prefix). In training, or with
``use_cache=False``, the cache is read-only — each layer returns [prefix; new] and stores nothing,
and ``is_updated`` ignores writes — so a checkpointed layer recomputes the same keys. The
cross-attention mask and a given decoder mask are widened by P; decoder positions start at P,
as with peft's prefilled cache.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer

from deltatune.errors import DeltatuneError
from deltatune.methods.virtual_tokens import CACHE_NAMES, batch_and_length, widen_attention_mask

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [batch, heads, P, head_dim]


class PrefixLayer(DynamicLayer):
    """A read-only cache layer: returns [prefix; new] and stores nothing (recomputable)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.prefix_keys, self.prefix_values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return (torch.cat([self.prefix_keys.to(key_states.dtype), key_states], dim=-2),
                torch.cat([self.prefix_values.to(value_states.dtype), value_states], dim=-2))

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2]

    # generate() without a cache hands the model's returned cache back on the next step, where it again
    # returns [prefix; all tokens]; beam search reorders it
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.prefix_keys = self.prefix_keys.index_select(0, indices.to(self.prefix_keys.device))
        self.prefix_values = self.prefix_values.index_select(0, indices.to(self.prefix_values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.prefix_keys = self.prefix_keys.repeat_interleave(repeats, dim=0)
        self.prefix_values = self.prefix_values.repeat_interleave(repeats, dim=0)


class NeverUpdated(dict):
    """``is_updated`` of a read-only cache: cross-attention recomputes the encoder's keys on every call."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


# --- which model, which modules --------------------------------------------------------------
def model_kind(model: nn.Module) -> str:
    """"encoder_decoder", "encoder" (bidirectional self-attention only) or "decoder"."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "encoder_decoder"
    attentions = self_attention_modules(model, strict=False)
    if attentions and not any(getattr(m, "is_causal", True) for m in attentions):
        return "encoder"
    return "decoder"


def cache_parameter(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache, if it takes one."""
    names = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_NAMES if name in names), None)


def self_attention_modules(stack: nn.Module, strict: bool = True) -> list[nn.Module]:
    """The innermost modules that take a KV cache and know their layer index, one per layer, in order."""
    found = [m for m in stack.modules() if isinstance(getattr(m, "layer_idx", None), int) and cache_parameter(m)]
    ids = {id(m) for m in found}
    innermost = [m for m in found if not any(id(c) in ids for c in m.modules() if c is not m)]
    innermost.sort(key=lambda m: m.layer_idx)
    if strict and [m.layer_idx for m in innermost] != list(range(len(innermost))):
        raise DeltatuneError(f"Prefix tuning cannot find one self-attention module per layer in "
                             f"{type(stack).__name__}; this architecture is not supported for encoder prefixes.")
    return innermost


class CallHook:
    """A forward pre-hook (and optional post-hook) that sees the call as {argument name: value}."""

    def __init__(self, module: nn.Module, before: Callable, after: Callable | None = None) -> None:
        self.names = list(inspect.signature(module.forward).parameters)
        self.before = before
        self.handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True)]
        if after is not None:
            hook = lambda m, args, kwargs, output: after(m, output)
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = dict(zip(self.names, args))
        call.update(kwargs)
        call = self.before(module, call)
        return None if call is None else ((), call)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def prepend_ones(mask: torch.Tensor, count: int) -> torch.Tensor:
    if mask.dim() != 2:
        raise DeltatuneError("Prefix tuning needs a 2-D attention mask (batch × length); pass that instead.")
    return torch.cat([torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device), mask], dim=1)


# --- encoder self-attention ------------------------------------------------------------------
class EncoderPrefix:
    """Hooks that give every self-attention layer of one encoder stack the active prefix.

    ``prefix_for(batch)`` returns the per-layer key/values, or None when no prefix applies.
    """

    def __init__(self, stack: nn.Module, prefix_for: Callable[[int], KeyValues | None]) -> None:
        self.prefix_for = prefix_for
        self._cache: Cache | None = None
        self._count = 0
        attentions = self_attention_modules(stack, strict=False)  # the layout checks them for an adapter that uses them
        self.hooks = [CallHook(stack, self._before_stack)] + [CallHook(m, self._before_attention) for m in attentions]

    def _before_stack(self, stack: nn.Module, call: dict) -> dict | None:
        self._cache = None  # a new call (the previous call's cache was kept for its recompute)
        key_values = self.prefix_for(batch_and_length(call)[0])
        if key_values is None:
            return None
        self._count = key_values[0][0].shape[-2]
        widen_attention_mask(call, self._count)  # [batch, P + L]
        self._cache = Cache(layers=[PrefixLayer(keys, values) for keys, values in key_values])
        return call

    def _before_attention(self, attention: nn.Module, call: dict) -> dict | None:
        if self._cache is None:
            return None
        name = cache_parameter(attention)
        if call.get(name) is not None:
            raise DeltatuneError(f"{type(attention).__name__} was given a KV cache inside an encoder; "
                                 "an encoder prefix cannot be combined with it.")
        call[name] = self._cache
        if getattr(attention, "has_relative_attention_bias", False) and call.get("position_bias") is None:
            length = call["hidden_states"].shape[1]
            bias = attention.compute_bias(length, length, device=call["hidden_states"].device)  # [1, heads, L, L]
            call["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:3], self._count), bias], dim=-1)
        return call

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self._cache = None


# --- the decoder of an encoder–decoder model ---------------------------------------------------
class DecoderPrefix:
    """A hook that gives an encoder–decoder model's decoder its self-attention and cross-attention prefixes.

    ``prefix_for(batch)`` returns (self-attention key/values, cross-attention key/values or None), or
    None when no prefix applies.
    """

    def __init__(self, stack: nn.Module,
                 prefix_for: Callable[[int], tuple[KeyValues, KeyValues | None] | None]) -> None:
        names = set(inspect.signature(stack.forward).parameters)
        self.cache_name = cache_parameter(stack)
        if self.cache_name is None or not {"encoder_hidden_states", "encoder_attention_mask"} <= names:
            raise DeltatuneError(f"The decoder {type(stack).__name__} takes no KV cache or no encoder mask; "
                                 "prefix tuning does not support this encoder–decoder architecture.")
        self.prefix_for = prefix_for
        self.layers = [m for m in stack.modules() if isinstance(m, GradientCheckpointingLayer)]
        self._read_only = False
        self.hooks = [CallHook(stack, self._before, self._after)]

    def _before(self, stack: nn.Module, call: dict) -> dict | None:
        batch = batch_and_length(call)[0]
        found = self.prefix_for(batch)
        if found is None:
            return None
        own, cross = found
        count = own[0][0].shape[-2]
        if call.get("attention_mask") is not None:  # a decoder mask covers the real tokens only
            call["attention_mask"] = prepend_ones(call["attention_mask"], count)
        if cross is not None:
            mask = call.get("encoder_attention_mask")
            if mask is None:
                states = call["encoder_hidden_states"]
                mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
            call["encoder_attention_mask"] = prepend_ones(mask, cross[0][0].shape[-2])  # [batch, P + source length]
        cache = call.get(self.cache_name)
        if cache is not None and cache.get_seq_length() > 0:  # a later generation step: the prefix is cached
            return call
        if stack.training or call.get("use_cache") is False:
            call[self.cache_name] = read_only_cache(own, cross)
            for layer in self.layers:  # our cache only reads: safe to keep under checkpointing
                layer._can_checkpoint_with_cache = True
            self._read_only = True
        else:
            call[self.cache_name] = filled_cache(cache, own, cross, stack.get_input_embeddings().weight.dtype)
        return call

    def _after(self, stack: nn.Module, output: Any) -> None:
        if self._read_only:
            for layer in self.layers:
                del layer._can_checkpoint_with_cache  # back to the class default
        self._read_only = False

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def read_only_cache(own: KeyValues, cross: KeyValues | None) -> EncoderDecoderCache:
    if cross is None:  # no cross prefix: a zero-length one passes the encoder's keys through
        cross = [(keys[..., :0, :], values[..., :0, :]) for keys, values in own]
    cache = EncoderDecoderCache(Cache(layers=[PrefixLayer(k, v) for k, v in own]),
                                Cache(layers=[PrefixLayer(k, v) for k, v in cross]))
    cache.is_updated = NeverUpdated()
    return cache


def filled_cache(cache: Cache | None, own: KeyValues, cross: KeyValues | None,
                 dtype: torch.dtype) -> EncoderDecoderCache:
    if cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    elif not isinstance(cache, EncoderDecoderCache):
        raise DeltatuneError(f"An encoder–decoder model with prefix tuning needs an EncoderDecoderCache, "
                             f"got {type(cache).__name__}; pass none and one is made.")
    for layer, (keys, values) in enumerate(own):
        cache.self_attention_cache.update(keys.to(dtype), values.to(dtype), layer)
    for layer, (keys, values) in enumerate(cross or []):
        cache.cross_attention_cache.update(keys.to(dtype), values.to(dtype), layer)
    for layer in range(len(own)):
        cache.is_updated[layer] = False  # cross-attention still has to append the encoder's keys
    return cache
