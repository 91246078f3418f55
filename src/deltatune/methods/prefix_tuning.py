"""Prefix Tuning (Li & Liang, 2021, arXiv 2101.00190): trainable keys and values at every layer.

Every attention layer l sees [P_k^l; K] and [P_v^l; V]: the real tokens attend to P =
``num_virtual_tokens`` extra positions whose keys and values are free parameters.

    decoder-only (GPT-2, Llama)    z = [PREFIX; x; y]           every self-attention layer
    encoder–decoder (BART, T5)     z = [PREFIX; x | PREFIX'; y]  encoder self-attention, decoder
                                   self-attention and cross-attention, one table each
    encoder-only (BERT, RoBERTa)   z = [PREFIX; x]              every encoder layer (P-Tuning v2's NLU setup)

Training reparameterises each table through a small MLP, which is more stable (the paper's §4.3):

    table = MLP(E),  E: P × hidden,  MLP: hidden → projection_hidden_size → tanh → L·2·kv_dim
    table[p] viewed as (L·2, kv_heads, head_dim): layer l's key is row 2l, its value row 2l+1

For inference the MLP is folded away (``fold``): the table is all that is kept. With
grouped-query attention kv_dim is kv_heads × head_dim.

A decoder's prefix enters through its KV cache: at the first call a cache is filled with the
prefix (generation then extends it as usual), and real tokens' positions start at P, as peft
does. In training the cache is a *stateless* view that returns [prefix; new] without storing
anything, so gradient checkpointing can recompute a layer and get the same keys — peft refuses
checkpointing for prefix tuning (peft#869). An encoder has no cache in its call: its prefix is
handed to each self-attention module by a hook (prefix_injection.py), and the encoder's real
tokens keep their positions.

Saved in peft's layout: ``prompt_embeddings`` [P, L·2·kv_dim] is the decoder's self-attention
table, which is what peft applies; ``encoder_prompt_embeddings`` and ``cross_prompt_embeddings``
hold the other sides (an encoder-only model has only the first). adapter_config.json announces
them with ``deltatune_encoder_prefix`` / ``deltatune_cross_prefix`` and says why peft cannot use
such an adapter in ``deltatune_peft_incompatible``: peft loads the file but ignores them.

peft 0.21.2 reads an encoder–decoder table with decoder layer l taking block 2l mod L (its
``get_prompt`` concatenates the table with itself and splits it in fours). With
``encoder_prefix=False, cross_prefix=False`` — peft's own setup — deltatune reads the table the
same way, so adapters move between the two unchanged; with an extra side on, every layer has
its own block.

Classifiers (``*ForSequenceClassification``, ``*ForTokenClassification``) also train their
freshly initialised head: an empty ``modules_to_save`` means the model's ``classifier``,
``score`` or ``classification_head`` (what peft does for SEQ_CLS).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping

import torch
from torch import nn
from torch.func import functional_call
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from deltatune.errors import DeltatuneError
from deltatune.methods.prefix_injection import (CallHook, DecoderPrefix, EncoderPrefix, KeyValues, PrefixLayer,
                                                cache_parameter, model_kind,
                                                self_attention_modules)
from deltatune.methods.protocol import Capabilities, Method, check_shapes
from deltatune.methods.trained_copy import inject_trained_copies, trained_modules
from deltatune.methods.virtual_tokens import (SequenceDelta, attached_module, batch_and_length, cached_length,
                                              check_context, shift_positions,
                                              widen_attention_mask)
from deltatune.validation import require_bool, require_names, require_size

__all__ = ["AttentionLayout", "PrefixKeyValues", "PrefixLayer", "PrefixTuning"]

TENSOR_NAMES = {"decoder": "prompt_embeddings", "encoder": "encoder_prompt_embeddings",
                "cross": "cross_prompt_embeddings"}


@dataclass(frozen=True)
class PrefixTuning(Method):
    """Keys and values for ``num_virtual_tokens`` positions at every layer, trained through an MLP.

    ``encoder_prefix`` / ``cross_prefix`` add the encoder and cross-attention prefixes of an
    encoder–decoder model (ignored by decoder-only models; an encoder-only model needs
    ``encoder_prefix``). ``modules_to_save`` are trained in full; empty means a classifier's head.
    """

    num_virtual_tokens: int = 20
    projection: bool = True
    projection_hidden_size: int = 512
    encoder_prefix: bool = True
    cross_prefix: bool = True
    modules_to_save: tuple[str, ...] = ()

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    peft_module_root: ClassVar[str] = "base_model."  # peft wraps prompt-learning models one level less
    cli_name: ClassVar[str] = "prefix"
    training_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 1e-3}  # see README: learning rates

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules_to_save", require_names("modules_to_save", self.modules_to_save or ()))
        require_size("num_virtual_tokens", self.num_virtual_tokens)
        require_size("projection_hidden_size", self.projection_hidden_size)
        for name in ("projection", "encoder_prefix", "cross_prefix"):
            require_bool(name, getattr(self, name))

    def capabilities(self) -> Capabilities:
        return Capabilities(equals_base_at_init=False, rewrites_call=True)

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        layouts = self.layouts(model)
        check_context(model, self.num_virtual_tokens)
        module = attached_module(model, PrefixKeyValues)
        module.add_adapter(adapter_name, layouts, self.num_virtual_tokens, self.projection, self.projection_hidden_size)
        return [PrefixKeyValues.attribute] + inject_trained_copies(model, self.trained_modules(model), adapter_name)

    def layouts(self, model: nn.Module) -> dict[str, "AttentionLayout"]:
        """The prefix tables this method puts into ``model``: side → layout."""
        kind = model_kind(model)
        if kind == "decoder":
            return {"decoder": AttentionLayout.of(model, "decoder")}
        if kind == "encoder":
            if not self.encoder_prefix:
                raise DeltatuneError("An encoder-only model's prefix is its encoder prefix; keep encoder_prefix=True "
                                     "(adapters peft made for encoder-only models are not supported).")
            return {"encoder": AttentionLayout.of(model, "encoder", model.base_model)}
        decoder = AttentionLayout.of(model, "decoder")
        layouts = {"decoder": replace(decoder, peft_layer_order=not (self.encoder_prefix or self.cross_prefix))}
        if self.encoder_prefix:
            layouts["encoder"] = AttentionLayout.of(model, "encoder", model.get_encoder())
        if self.cross_prefix:
            layouts["cross"] = decoder
        return layouts

    def trained_modules(self, model: nn.Module) -> tuple[str, ...]:
        return trained_modules(model, self.modules_to_save)

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        layouts = self.layouts(model)
        main = layouts.get("decoder") or layouts["encoder"]
        config = {
            "peft_type": self.peft_type, "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": main.kv_heads * main.head_dim,
            "num_transformer_submodules": 2 if model_kind(model) == "encoder_decoder" else 1,
            "num_attention_heads": main.kv_heads, "num_layers": main.layers,
            "encoder_hidden_size": self.projection_hidden_size, "prefix_projection": self.projection,
            "modules_to_save": list(self.trained_modules(model)) or None,
        }
        if "encoder" in layouts:  # peft cannot apply these: it reads prompt_embeddings only
            config["deltatune_encoder_prefix"] = True
        if "cross" in layouts:
            config["deltatune_cross_prefix"] = True
        if "decoder" not in layouts:
            config["deltatune_peft_incompatible"] = ("its prefix is an encoder-only model's encoder prefix "
                                                     "(encoder_prompt_embeddings), which peft does not read")
        elif len(layouts) > 1:
            ignored = " and ".join(TENSOR_NAMES[side] for side in layouts if side != "decoder")
            config["deltatune_peft_incompatible"] = ("peft applies only the decoder self-attention prefix "
                                                     f"(prompt_embeddings) and silently ignores {ignored}")
        elif type(model).__name__.endswith("ForSequenceClassification"):  # measured with peft 0.21.2
            config["deltatune_peft_incompatible"] = ("peft's prefix tuning for sequence classification passes "
                                                     "past_key_values, which transformers 5 classifiers do not take")
        return config

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "PrefixTuning":
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]),
                   projection=bool(config.get("prefix_projection", False)),
                   projection_hidden_size=int(config.get("encoder_hidden_size") or 512),
                   encoder_prefix=bool(config.get("deltatune_encoder_prefix", False)),
                   cross_prefix=bool(config.get("deltatune_cross_prefix", False)),
                   modules_to_save=tuple(config.get("modules_to_save") or ()))


# config spellings of each side's layer and head counts, first present wins (BART, T5, BERT/Llama/GPT-2)
SPELLINGS = {
    "decoder": (("decoder_layers", "num_decoder_layers", "num_hidden_layers"),
                ("decoder_attention_heads", "num_attention_heads")),
    "encoder": (("encoder_layers", "num_layers", "num_hidden_layers"),
                ("encoder_attention_heads", "num_attention_heads")),
}


@dataclass(frozen=True)
class AttentionLayout:
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    peft_layer_order: bool = False  # decoder layer l reads block 2l mod L, as peft reads encoder–decoder tables

    @classmethod
    def of(cls, model: nn.Module, side: str, stack: nn.Module | None = None) -> "AttentionLayout":
        config = getattr(model, "config", None)
        if config is None:
            raise DeltatuneError("Prefix tuning needs a Hugging Face transformers model (one with a config).")
        text = config  # for a decoder-only model, its language part (BART's get_text_config is a fresh default)
        decoder_only = side == "decoder" and not getattr(config, "is_encoder_decoder", False)
        if decoder_only and hasattr(config, "get_text_config"):
            text = config.get_text_config(decoder=True)
        first = lambda names: next((getattr(text, n) for n in names if getattr(text, n, None)), None)
        layers, heads = first(SPELLINGS[side][0]), first(SPELLINGS[side][1])
        hidden = first(("d_model", "hidden_size"))
        if not (heads and layers and hidden):
            raise DeltatuneError(f"Prefix tuning cannot read the attention layout of model type "
                                 f"{getattr(config, 'model_type', None)!r}; it needs num_attention_heads, "
                                 "num_hidden_layers and hidden_size in the config.")
        if stack is not None and len(self_attention_modules(stack)) != layers:
            raise DeltatuneError(f"The {side} of model type {config.model_type!r} does not have one self-attention "
                                 f"module per layer ({layers}); prefix tuning does not support it.")
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = first(("head_dim", "d_kv")) or hidden // heads
        return cls(layers=layers, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden)

    @property
    def width(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim

    def blocks(self) -> list[int]:
        """The table block each layer reads."""
        return [(2 * l) % self.layers if self.peft_layer_order else l for l in range(self.layers)]


class PrefixTables(nn.Module):
    """One side's prefix (decoder self-attention, encoder or cross-attention) for each adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ParameterDict()
        self.projections = nn.ModuleDict()
        self.layouts: dict[str, AttentionLayout] = {}

    def add(self, name: str, layout: AttentionLayout, count: int, projection: bool, projection_hidden: int) -> None:
        if projection:
            self.embeddings[name] = nn.Parameter(torch.randn(count, layout.hidden))
            self.projections[name] = nn.Sequential(nn.Linear(layout.hidden, projection_hidden), nn.Tanh(),
                                                   nn.Linear(projection_hidden, layout.width))
        else:
            # Small keys and values: the model starts close to the base model (N(0, 1), peft's
            # default, raised stories260K's held-out loss from 4.75 to 6.89 before any training;
            # N(0, 0.1²) starts at 4.75 and ends lower after the same 25 steps: 3.81 against 4.63).
            self.embeddings[name] = nn.Parameter(torch.randn(count, layout.width) * 0.1)
        self.layouts[name] = layout

    def table(self, name: str) -> torch.Tensor:
        """[P, L·2·kv_dim]: the keys and values of every layer for each virtual position."""
        embedding = self.embeddings[name]
        return self.projections[name](embedding) if name in self.projections else embedding

    def table_from(self, name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``table(name)`` computed from given values of ``parameters_of(name)`` (a gathered copy)."""
        embedding = tensors[f"embeddings.{name}"]
        if name not in self.projections:
            return embedding
        prefix = f"projections.{name}."
        weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return functional_call(self.projections[name], weights, (embedding,))

    def fold(self, name: str) -> None:
        """Replace the MLP by its output: what inference and peft need, and nothing more."""
        if name in self.projections:
            with torch.no_grad():
                table = self.table(name).detach().clone()
            del self.projections[name]
            self.embeddings[name] = nn.Parameter(table, requires_grad=self.embeddings[name].requires_grad)

    def parameters_of(self, name: str) -> dict[str, nn.Parameter]:
        params = {f"embeddings.{name}": self.embeddings[name]}
        if name in self.projections:
            params.update({f"projections.{name}.{k}": p for k, p in self.projections[name].named_parameters()})
        return params

    def delete(self, name: str) -> None:
        if name in self.embeddings:
            del self.embeddings[name]
            if name in self.projections:
                del self.projections[name]
            self.layouts.pop(name)

    def key_values(self, name: str, batch: int) -> KeyValues:
        """Per layer (keys, values), each [batch, kv_heads, P, head_dim]."""
        layout, table = self.layouts[name], self.table(name)
        count = table.shape[0]
        stacked = table.view(count, layout.layers * 2, layout.kv_heads, layout.head_dim).permute(1, 2, 0, 3)
        return [(stacked[2 * b].expand(batch, -1, -1, -1), stacked[2 * b + 1].expand(batch, -1, -1, -1))
                for b in layout.blocks()]


class PrefixKeyValues(SequenceDelta):
    """Holds each adapter's prefix tables and puts the active one into the model's attention."""

    attribute = "deltatune_prefix"
    peft_key_prefix = ""  # peft saves prompt tensors at the root of the file

    def __init__(self) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({side: PrefixTables() for side in TENSOR_NAMES})
        self.kind = "decoder"
        self._injections: list[Any] = []
        self._readonly_cache_layers: list[nn.Module] = []
        self._training_cache: Cache | None = None  # kept after the call: a checkpointed layer recomputes with it
        self._attention_hooks: list[CallHook] = []

    # the decoder side under the names the decoder-only code has always had
    embeddings = property(lambda self: self.tables["decoder"].embeddings)
    projections = property(lambda self: self.tables["decoder"].projections)

    def attach(self, host: nn.Module) -> None:
        self.kind = model_kind(host)
        if self.kind == "decoder":
            super().attach(host)  # the prefix rides in the host's KV cache
            return
        if self.kind == "encoder_decoder":
            self._injections = [EncoderPrefix(host.get_encoder(), self._encoder_prefix),
                                DecoderPrefix(host.get_decoder(), self._decoder_prefix)]
        else:
            self._injections = [EncoderPrefix(host.base_model, self._encoder_prefix)]

    def detach(self) -> None:
        super().detach()
        for injection in self._injections:
            injection.remove()
        self._injections = []
        self._hand_cache_to_attention(None, False)

    # --- adapters --------------------------------------------------------------------------
    def add_adapter(self, name: str, layouts: dict[str, AttentionLayout], count: int, projection: bool,
                    projection_hidden: int) -> None:
        for side, layout in layouts.items():
            self.tables[side].add(name, layout, count, projection, projection_hidden)
        self.active_adapters = self.active_adapters or (name,)

    def sides(self, name: str) -> list[str]:
        return [side for side, tables in self.tables.items() if name in tables.embeddings]

    def table(self, name: str) -> torch.Tensor:
        return self.tables["decoder"].table(name)

    def key_values(self, name: str, batch: int) -> KeyValues:
        return self.tables["decoder"].key_values(name, batch)

    def fold(self, name: str) -> None:
        for side in self.sides(name):
            self.tables[side].fold(name)

    def adapter_names(self) -> list[str]:
        return list(dict.fromkeys(n for tables in self.tables.values() for n in tables.embeddings))

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        params = {}
        for side in self.sides(name):  # the decoder side keeps the names saved training states use
            prefix = "" if side == "decoder" else f"tables.{side}."
            params.update({prefix + k: p for k, p in self.tables[side].parameters_of(name).items()})
        return params

    def peft_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {}
        for side in self.sides(name):
            prefix = "" if side == "decoder" else f"tables.{side}."
            own = {k: tensors[prefix + k] for k in self.tables[side].parameters_of(name)}
            state[TENSOR_NAMES[side]] = self.tables[side].table_from(name, own)
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        self.fold(name)  # a saved adapter is the folded tables
        sides = self.sides(name)
        check_shapes(where, {TENSOR_NAMES[s]: self.tables[s].embeddings[name].shape for s in sides}, state)
        with torch.no_grad():
            for side in sides:
                self.tables[side].embeddings[name].copy_(state[TENSOR_NAMES[side]])

    def delete_adapter(self, name: str) -> None:
        for tables in self.tables.values():
            tables.delete(name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    # --- encoder–decoder and encoder-only models: called by the hooks of prefix_injection.py -----
    def _running(self) -> str | None:
        if self.active_adapters and self.batch_adapter_names is not None:
            raise DeltatuneError("Per-example adapter choice is not available for prompt-learning methods.")
        return self.active_adapters[-1] if self.active_adapters else None

    def _encoder_prefix(self, batch: int) -> KeyValues | None:
        name = self._running()
        return self.tables["encoder"].key_values(name, batch) if name in self.tables["encoder"].embeddings else None

    def _decoder_prefix(self, batch: int) -> tuple[KeyValues, KeyValues | None] | None:
        name = self._running()
        if name not in self.tables["decoder"].embeddings:
            return None
        cross = self.tables["cross"].key_values(name, batch) if name in self.tables["cross"].embeddings else None
        return self.tables["decoder"].key_values(name, batch), cross

    # --- decoder-only models: the host's own KV cache ---------------------------------------------
    def _before(self, host: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._training_cache = None  # a new call: the last one's recompute is over
        return super()._before(host, args, kwargs)

    def _hand_cache_to_attention(self, host: nn.Module | None, on: bool) -> None:
        """GPT-2 gives its layers no cache under gradient checkpointing: while training on the
        stateless cache, hooks give ours back to each attention (off while generating: no cost)."""
        if on and not self._attention_hooks:
            self._attention_hooks = [CallHook(m, self._cache_for_attention)
                                     for m in self_attention_modules(host, strict=False)]
        elif not on:
            for hook in self._attention_hooks:
                hook.remove()
            self._attention_hooks = []

    def _cache_for_attention(self, attention: nn.Module, call: dict) -> dict | None:
        name = cache_parameter(attention)
        if self._training_cache is None or call.get(name) is not None:
            return None
        call[name] = self._training_cache
        return call

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
            call[self.cache_name] = self._training_cache = Cache(layers=[PrefixLayer(k, v) for k, v in key_values])
            self._hand_cache_to_attention(host, True)
            self._readonly_cache_layers = [m for m in host.modules() if isinstance(m, GradientCheckpointingLayer)]
            for layer in self._readonly_cache_layers:  # our cache only reads: safe to keep under checkpointing
                layer._can_checkpoint_with_cache = True
        else:
            self._hand_cache_to_attention(host, False)
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
