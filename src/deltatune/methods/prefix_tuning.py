"""Prefix Tuning (Li & Liang, 2021, arXiv 2101.00190): trainable keys and values at every layer.

Every attention layer l sees [P_k^l; K] and [P_v^l; V]: the real tokens attend to
``num_virtual_tokens`` extra positions whose keys and values are free parameters (for a
decoder-only model, z = [PREFIX; x; y]). Training reparameterises them through a small MLP,
which is more stable (the paper's §4.3):

    table = MLP(E),  E: P × hidden,  MLP: hidden → projection_hidden_size → tanh → L·2·kv_dim
    table[p] viewed as (L·2, kv_heads, head_dim): layer l's key is row 2l, its value row 2l+1

For inference the MLP is folded away (``fold``): the table is all that is kept, and it is what
peft saves as ``prompt_embeddings`` [P, L·2·kv_dim]. With grouped-query attention kv_dim is
kv_heads × head_dim. Real tokens' positions start at P, as peft does.

The prefix enters through the model's KV cache: at the first call a cache is filled with the
prefix (generation then extends it as usual). In training the cache is a *stateless* view
that returns [prefix; new] without storing anything, so gradient checkpointing can recompute
a layer and get the same keys — peft refuses checkpointing for prefix tuning (peft#869).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from deltatune.errors import DeltatuneError
from deltatune.methods.protocol import check_shapes
from deltatune.methods.prompt_tuning import attached_module, check_context
from deltatune.methods.virtual_tokens import (SequenceDelta, batch_and_length, cached_length, shift_positions,
                                              widen_attention_mask)


@dataclass(frozen=True)
class PrefixTuning:
    """Keys and values for ``num_virtual_tokens`` positions at every layer, trained through an MLP."""

    num_virtual_tokens: int = 20
    projection: bool = True
    projection_hidden_size: int = 512

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    cli_name: ClassVar[str] = "prefix"

    def __post_init__(self) -> None:
        if not (isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0):
            raise DeltatuneError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}.")
        if not (isinstance(self.projection_hidden_size, int) and self.projection_hidden_size > 0):
            raise DeltatuneError(f"projection_hidden_size must be a positive integer, got {self.projection_hidden_size!r}.")

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        layout = AttentionLayout.of(model)
        check_context(model, self.num_virtual_tokens)
        module = attached_module(model, PrefixKeyValues)
        module.add_adapter(adapter_name, layout, self.num_virtual_tokens, self.projection, self.projection_hidden_size)
        return [PrefixKeyValues.attribute]

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        layout = AttentionLayout.of(model)
        return {
            "peft_type": self.peft_type, "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": layout.kv_heads * layout.head_dim, "num_transformer_submodules": 1,
            "num_attention_heads": layout.kv_heads, "num_layers": layout.layers,
            "encoder_hidden_size": self.projection_hidden_size, "prefix_projection": self.projection,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "PrefixTuning":
        if config.get("num_transformer_submodules", 1) not in (1, None):
            raise DeltatuneError("This prefix adapter is for an encoder–decoder model, which deltatune's prefix "
                                 "tuning does not load yet; use it with peft.")
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]),
                   projection=bool(config.get("prefix_projection", False)),
                   projection_hidden_size=int(config.get("encoder_hidden_size") or 512))


@dataclass(frozen=True)
class AttentionLayout:
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int

    @classmethod
    def of(cls, model: nn.Module) -> "AttentionLayout":
        config = getattr(model, "config", None)
        if config is None or getattr(config, "is_encoder_decoder", False):
            raise DeltatuneError("Prefix tuning supports decoder-only Hugging Face models with a KV cache "
                                 "(Llama/Qwen2/Mistral family, GPT-2); encoder–decoder models are not supported yet.")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = getattr(text, "num_attention_heads", None)
        layers = getattr(text, "num_hidden_layers", None)
        hidden = getattr(text, "hidden_size", None)
        if not (heads and layers and hidden):
            raise DeltatuneError(f"Prefix tuning cannot read the attention layout of model type "
                                 f"{getattr(config, 'model_type', None)!r}; it needs num_attention_heads, "
                                 "num_hidden_layers and hidden_size in the config.")
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        return cls(layers=layers, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden)


class PrefixLayer(DynamicLayer):
    """A training-time cache layer: returns [prefix; new] and stores nothing (recomputable)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.prefix_keys, self.prefix_values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return (torch.cat([self.prefix_keys.to(key_states.dtype), key_states], dim=-2),
                torch.cat([self.prefix_values.to(value_states.dtype), value_states], dim=-2))

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2]


class PrefixKeyValues(SequenceDelta):
    """Holds each adapter's prefix (an embedding and its MLP, or the folded table)."""

    attribute = "deltatune_prefix"
    peft_key_prefix = ""  # peft saves prompt tensors at the root of the file

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ParameterDict()
        self.projections = nn.ModuleDict()
        self.layouts: dict[str, AttentionLayout] = {}
        self._readonly_cache_layers: list[nn.Module] = []

    def add_adapter(self, name: str, layout: AttentionLayout, count: int, projection: bool, projection_hidden: int) -> None:
        width = layout.layers * 2 * layout.kv_heads * layout.head_dim
        if projection:
            self.embeddings[name] = nn.Parameter(torch.randn(count, layout.hidden))
            self.projections[name] = nn.Sequential(nn.Linear(layout.hidden, projection_hidden), nn.Tanh(),
                                                   nn.Linear(projection_hidden, width))
        else:
            self.embeddings[name] = nn.Parameter(torch.randn(count, width))
        self.layouts[name] = layout
        self.active_adapters = self.active_adapters or (name,)

    def table(self, name: str) -> torch.Tensor:
        """[P, L·2·kv_dim]: the keys and values of every layer for each virtual position."""
        embedding = self.embeddings[name]
        return self.projections[name](embedding) if name in self.projections else embedding

    def fold(self, name: str) -> None:
        """Replace the MLP by its output: what inference and peft need, and nothing more."""
        if name in self.projections:
            with torch.no_grad():
                table = self.table(name).detach().clone()
            del self.projections[name]
            self.embeddings[name] = nn.Parameter(table, requires_grad=self.embeddings[name].requires_grad)

    def adapter_names(self) -> list[str]:
        return list(self.embeddings.keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        params = {f"embeddings.{name}": self.embeddings[name]}
        if name in self.projections:
            params.update({f"projections.{name}.{k}": p for k, p in self.projections[name].named_parameters()})
        return params

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.table(name).detach()}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        self.fold(name)  # a saved adapter is the folded table
        check_shapes(where, {"prompt_embeddings": self.embeddings[name].shape}, state)
        with torch.no_grad():
            self.embeddings[name].copy_(state["prompt_embeddings"])

    def delete_adapter(self, name: str) -> None:
        del self.embeddings[name]
        self.projections.pop(name, None)
        self.layouts.pop(name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def key_values(self, name: str, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [batch, kv_heads, P, head_dim]."""
        layout, table = self.layouts[name], self.table(name)
        count = table.shape[0]
        stacked = table.view(count, layout.layers * 2, layout.kv_heads, layout.head_dim).permute(1, 2, 0, 3)
        return [(stacked[2 * l].expand(batch, -1, -1, -1), stacked[2 * l + 1].expand(batch, -1, -1, -1))
                for l in range(layout.layers)]

    def rewrite_call(self, host: nn.Module, name: str, call: dict) -> dict:
        count = self.embeddings[name].shape[0]
        cached = cached_length(call, self.cache_name)
        widen_attention_mask(call, count, already_cached=cached)
        shift_positions(call, count)
        if cached:  # a later generation step: the prefix is in the cache already
            return call
        batch, _, device = batch_and_length(call)
        key_values = self.key_values(name, batch)
        if host.training or call.get("use_cache") is False:
            # stateless: a checkpointed layer recomputes the same keys, and nothing grows across calls
            call[self.cache_name] = Cache(layers=[PrefixLayer(k, v) for k, v in key_values])
            self._readonly_cache_layers = [m for m in host.modules() if isinstance(m, GradientCheckpointingLayer)]
            for layer in self._readonly_cache_layers:  # our cache only reads: safe to keep under checkpointing
                layer._can_checkpoint_with_cache = True
        else:
            cache = call.get(self.cache_name)
            if cache is None:
                cache = DynamicCache()
            dtype = host.get_input_embeddings().weight.dtype
            for layer, (keys, values) in enumerate(key_values):
                cache.update(keys.to(dtype), values.to(dtype), layer)
            call[self.cache_name] = cache
        return call

    def finish_call(self, host: nn.Module) -> None:
        for layer in self._readonly_cache_layers:
            del layer._can_checkpoint_with_cache  # back to the class default
        self._readonly_cache_layers = []
