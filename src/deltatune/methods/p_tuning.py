"""P-Tuning v1 (Liu et al., 2021, "GPT Understands, Too", arXiv 2103.10385): virtual tokens made by an encoder.

What trains is a prompt encoder; its output is the soft prompt fed to the model's input layer:

    V = head(E),   E: num_virtual_tokens × hidden (trainable table),   V: num_virtual_tokens × hidden
    head "mlp":  V = W3·relu(W2·relu(W1·E))                 (hidden → enc → enc → hidden)
    head "lstm": V = W5·relu(W4·BiLSTM(E))                  (hidden → 2·enc → 2·enc → hidden)

Where V goes is set by a ``template``. ``"{prompt:3} {text} {prompt:3} It was"`` puts virtual
tokens 0–2 before the text and 3–5 after it; ``{mask}`` is the masked LM's answer slot and any
other ``{name}`` is filled from ``render(tokenizer, name=...)``. Rendered ids carry virtual token k
as the negative id -(k+1); the forward hook looks those positions up as id 0 and overwrites
them with V[k], so the sequence keeps its length and generate()/padding work unchanged.
Without a template, or when the only slot leads it (``"{prompt:20} {text}"``), render() leaves
the slots out and the hook prepends V before every token (BOS included) exactly as peft does —
such an adapter also runs in peft.

Classification as cloze (PET): with a ``verbalizer`` {label: word},

    ids = torch.tensor([method.render(tokenizer, text=t) for t in texts])  # [batch, L], slots < 0
    words = method.label_token_ids(tokenizer)                              # one vocabulary id per label
    scores = label_scores(model(input_ids=ids).logits, ids, words, tokenizer.mask_token_id)  # [batch, labels]
    loss = label_loss(scores, labels)                                      # cross-entropy over the label words

A masked LM is scored at its ``{mask}`` position; a causal LM (mask_token_id=None) at the last
attended position, i.e. the next word after the template. Labels are numbered in verbalizer order.

Saved as peft's P_TUNING: one tensor ``prompt_embeddings`` = V. Loaded from that file the adapter
is a fixed table (V cannot be turned back into an encoder, as in peft); ``adapter_parameters``
(E and the head) are what the trainer checkpoints and the training-state file keeps, so training
resumes exactly. Templates that peft cannot express are marked in adapter_config.json by
``"deltatune_placement": "in_template"`` (with ``deltatune_template`` / ``deltatune_verbalizer``).
"""

from __future__ import annotations

import string
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from deltatune.errors import DeltatuneError
from deltatune.methods.protocol import Capabilities, Method, check_shapes
from deltatune.data import bos_ids
from deltatune.methods.trained_copy import inject_trained_copies, trained_modules
from deltatune.methods.virtual_tokens import (SequenceDelta, attached_module, check_context, check_not_encoder_decoder,
                                              prepend_virtual_tokens)
from deltatune.validation import require_choice, require_names, require_optional_text, require_size

ENCODERS = {"mlp": "MLP", "lstm": "LSTM"}  # ours → peft's encoder_reparameterization_type
PEFT_KEYS = {"peft_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
             "num_layers", "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
             "encoder_dropout", "task_type", "base_model_name_or_path", "inference_mode", "revision", "auto_mapping",
             "peft_version", "modules_to_save", "deltatune_method", "deltatune_template", "deltatune_verbalizer", "deltatune_peft_incompatible",
             "deltatune_placement"}


@dataclass(frozen=True)
class PTuning(Method):
    """A prompt encoder whose output fills the template's ``{prompt:N}`` slots (or is prepended)."""

    num_virtual_tokens: int | None = None  # default: the template's total N, or 20 without a template
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None  # default: the model's hidden size
    encoder_num_layers: int = 2  # LSTM layers ("lstm" only)
    template: str | None = None
    verbalizer: Mapping[str, str] | None = None  # label → word
    modules_to_save: tuple[str, ...] = ()  # trained in full; empty means a classifier's head

    peft_type: ClassVar[str] = "P_TUNING"
    peft_module_root: ClassVar[str] = "base_model."  # peft wraps prompt-learning models one level less
    cli_name: ClassVar[str] = "ptuning"
    training_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 3e-3}  # see README: learning rates

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules_to_save", require_names("modules_to_save", self.modules_to_save or ()))
        count = self.num_virtual_tokens
        if require_optional_text("template", self.template) is not None:
            total = sum(value for kind, value in template_parts(self.template) if kind == "prompt")
            if total == 0:
                raise DeltatuneError(f"Template {self.template!r} has no {{prompt:N}} slot; add one where the virtual "
                                     "tokens go, e.g. '{prompt:3} {text}'.")
            if count is not None and count != total:
                raise DeltatuneError(f"num_virtual_tokens={count} but the template's {{prompt:N}} slots hold {total}; "
                                     "leave num_virtual_tokens unset or make them agree.")
            count = total
        object.__setattr__(self, "num_virtual_tokens", 20 if count is None else count)
        require_size("num_virtual_tokens", self.num_virtual_tokens)
        require_choice("encoder", self.encoder, ENCODERS)
        for name in ("encoder_hidden_size", "encoder_num_layers"):
            if getattr(self, name) is not None:
                require_size(name, getattr(self, name))
        if self.verbalizer is not None:
            if not isinstance(self.verbalizer, Mapping) or len(self.verbalizer) < 2 or not all(
                    isinstance(word, str) and word.strip() for word in self.verbalizer.values()):
                raise DeltatuneError("verbalizer must map at least two labels to non-empty words, "
                                     "e.g. {'negative': 'bad', 'positive': 'great'}.")
            object.__setattr__(self, "verbalizer", {str(k): v for k, v in self.verbalizer.items()})

    @property
    def placement(self) -> str:
        """"prefix" (prepended before every token, as peft) or "in_template" (at the rendered slots)."""
        parts = [(kind, v) for kind, v in self.parts() if kind != "text" or v.strip()]  # spaces do not count
        slots = [i for i, (kind, _) in enumerate(parts) if kind == "prompt"]
        return "prefix" if slots == [0] else "in_template"

    def parts(self) -> list[tuple[str, Any]]:
        return template_parts(self.template or f"{{prompt:{self.num_virtual_tokens}}}{{text}}")

    def capabilities(self) -> Capabilities:
        return Capabilities(equals_base_at_init=False, rewrites_call=True)

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        check_not_encoder_decoder(model, "P-tuning")
        check_context(model, self.num_virtual_tokens)
        module = attached_module(model, PromptEncoderDelta)
        table = model.get_input_embeddings().weight
        encoder = PromptEncoder(torch.randn(self.num_virtual_tokens, table.shape[1]), self.encoder,
                                self.encoder_hidden_size or table.shape[1], self.encoder_num_layers)
        module.add_adapter(adapter_name, encoder.to(table.device), self.placement == "in_template")
        heads = trained_modules(model, self.modules_to_save)
        return [PromptEncoderDelta.attribute] + inject_trained_copies(model, heads, adapter_name)

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        config = getattr(model, "config", None)
        hidden = model.get_input_embeddings().weight.shape[1]
        saved = {
            "peft_type": self.peft_type, "num_virtual_tokens": self.num_virtual_tokens, "token_dim": hidden,
            "num_transformer_submodules": 1, "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_layers": getattr(config, "num_hidden_layers", None),
            "encoder_reparameterization_type": ENCODERS[self.encoder],
            "encoder_hidden_size": self.encoder_hidden_size or hidden, "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": 0.0,
            "modules_to_save": list(trained_modules(model, self.modules_to_save)) or None,
        }
        if self.template is not None or self.verbalizer is not None:  # plain adapters stay pristine for peft
            saved.update(deltatune_template=self.template, deltatune_verbalizer=self.verbalizer,
                         deltatune_placement=self.placement)
            if self.placement == "in_template":
                saved["deltatune_peft_incompatible"] = ("its virtual tokens sit inside a template, "
                                                        "and peft can only prepend them")
        return saved

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "PTuning":
        if config.get("num_transformer_submodules", 1) not in (1, None):
            raise DeltatuneError("This P-tuning adapter is for an encoder–decoder model; "
                                 "deltatune's P-tuning supports decoder-only and encoder models.")
        ignored = sorted(k for k, v in config.items() if k not in PEFT_KEYS and v not in (None, False, [], {}))
        if ignored:
            warnings.warn(f"adapter_config.json keys not used by deltatune were ignored: {', '.join(ignored)}",
                          stacklevel=2)
        kind = str(config.get("encoder_reparameterization_type") or "MLP").lower()
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]), encoder=kind,
                   encoder_hidden_size=config.get("encoder_hidden_size"),
                   encoder_num_layers=int(config.get("encoder_num_layers") or 2),
                   template=config.get("deltatune_template"), verbalizer=config.get("deltatune_verbalizer"),
                   modules_to_save=tuple(config.get("modules_to_save") or ()))

    # --- data side: templates and label words ------------------------------------------------
    def encode_prompt(self, tokenizer: Any, text: str) -> list[int]:
        """[BOS] + one example's prompt rendered as the template's {text} — what training data and
        ``deltatune generate`` use, so virtual tokens sit where the template puts them."""
        bos = bos_ids(tokenizer)
        if self.template is None:
            return bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        return bos + self.render(tokenizer, add_special_tokens=False, text=text)

    def render(self, tokenizer: Any, add_special_tokens: bool = True, **fields: Any) -> list[int]:
        """Token ids of one example; virtual token k is -(k+1). Prefix placement leaves them to the hook.

        Text between slots is tokenized as written (whitespace-only stretches are dropped);
        ``add_special_tokens`` wraps the result as the tokenizer would ([CLS] … [SEP], BOS …).
        """
        prefix = self.placement == "prefix"  # then the hook puts V before everything, as peft does
        parts = [(kind, v) for kind, v in self.parts() if not (prefix and kind == "prompt")]
        ids: list[int] = []
        run, virtual = "", 0
        for kind, value in [*parts, ("end", None)]:
            if kind in ("text", "field"):
                if kind == "field" and value not in fields:
                    raise DeltatuneError(f"The template needs a value for {{{value}}}; "
                                         f"pass render(tokenizer, {value}=...).")
                run += value if kind == "text" else str(fields[value])
                continue
            if run.strip():  # a prefix template's leading space only separated it from {prompt:N}
                ids += tokenizer(run.lstrip() if prefix and not ids else run, add_special_tokens=False)["input_ids"]
            run = ""
            if kind == "prompt":  # [-(virtual+1), …, -(virtual+N)]
                ids += [-(k + 1) for k in range(virtual, virtual + value)]
                virtual += value
            elif kind == "mask":
                if getattr(tokenizer, "mask_token_id", None) is None:
                    raise DeltatuneError("The template has {mask} but the tokenizer has no mask token; "
                                         "use a masked LM's tokenizer or end the template where the answer goes.")
                ids.append(tokenizer.mask_token_id)
        before, after = special_tokens(tokenizer) if add_special_tokens else ([], [])
        return before + ids + after

    def label_token_ids(self, tokenizer: Any) -> list[int]:
        """The vocabulary id of each label's word, in verbalizer order."""
        if not self.verbalizer:
            raise DeltatuneError("Label scoring needs a verbalizer, "
                                 "e.g. PTuning(verbalizer={'neg': 'bad', 'pos': 'great'}).")
        ids = []
        for label, word in self.verbalizer.items():
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise DeltatuneError(f"Verbalizer word {word!r} for label {label!r} is {len(pieces)} tokens; "
                                     "pick a word the tokenizer keeps whole.")
            ids += pieces
        return ids


def template_parts(template: str) -> list[tuple[str, Any]]:
    """("text", str) | ("field", name) | ("prompt", N) | ("mask", None), in order."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise DeltatuneError(f"Template {template!r} is malformed ({error}); "
                             "write slots as {prompt:3}, {text}, {mask}.") from None
    parts: list[tuple[str, Any]] = []
    for literal, name, spec, _ in parsed:
        if literal and parts and parts[-1][0] == "text":  # "{{" comes as a literal of its own
            parts[-1] = ("text", parts[-1][1] + literal)
        elif literal:
            parts.append(("text", literal))
        if name is None:
            continue
        if name == "prompt":
            if not (spec or "").isdigit() or int(spec) == 0:
                raise DeltatuneError(f"Template slot {{prompt:{spec}}} needs a positive count, e.g. {{prompt:3}}.")
            parts.append(("prompt", int(spec)))
        elif name == "mask" and not spec:
            parts.append(("mask", None))
        elif name.isidentifier() and not spec:
            parts.append(("field", name))
        else:
            raise DeltatuneError(f"Template slot {{{name}{':' + spec if spec else ''}}} is not understood; "
                                 "use {prompt:N}, {mask} or a field name like {text}.")
    if sum(kind == "mask" for kind, _ in parts) > 1:
        raise DeltatuneError(f"Template {template!r} has more than one {{mask}}; cloze scoring needs exactly one.")
    return parts


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (e.g. [CLS] / [SEP], or BOS / nothing)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def label_scores(logits: torch.Tensor, input_ids: torch.Tensor, label_token_ids: list[int],
                 mask_token_id: int | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, labels]: the label words' logits at the mask token, or else at the last attended position."""
    batch, length = input_ids.shape
    if mask_token_id is not None:
        is_mask = input_ids == mask_token_id  # [batch, length]
        if not bool((is_mask.sum(dim=1) == 1).all()):
            raise DeltatuneError("Cloze scoring needs exactly one mask token per example; "
                                 "render with a {mask} template.")
        where = is_mask.int().argmax(dim=1)
    elif attention_mask is not None:  # the last attended position, with left or right padding
        where = (attention_mask.long() * torch.arange(length, device=input_ids.device)).argmax(dim=1)
    else:
        where = torch.full((batch,), length - 1, device=input_ids.device)
    rows = logits[torch.arange(batch, device=logits.device), where.to(logits.device)]  # [batch, vocab]
    return rows[:, label_token_ids]


def label_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the label words only (PET's classification loss); labels index the verbalizer."""
    return F.cross_entropy(scores.float(), labels)


# --- the modules -----------------------------------------------------------------------------
class PromptEncoder(nn.Module):
    """E → head(E), peft's PromptEncoder layout; with ``kind=None`` a fixed table (a loaded adapter)."""

    def __init__(self, table: torch.Tensor, kind: str | None, hidden_size: int = 0, lstm_layers: int = 2) -> None:
        super().__init__()
        token_dim = table.shape[1]
        self.embedding = nn.Parameter(table)  # [P, token_dim]; peft: N(0, 1) init
        self.lstm_head = (nn.LSTM(token_dim, hidden_size, num_layers=lstm_layers, bidirectional=True, batch_first=True)
                          if kind == "lstm" else None)
        if kind == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden_size), nn.ReLU(),
                                          nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                          nn.Linear(hidden_size, token_dim))
        elif kind == "lstm":
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden_size, 2 * hidden_size), nn.ReLU(),
                                          nn.Linear(2 * hidden_size, token_dim))
        else:
            self.mlp_head = None

    def forward(self) -> torch.Tensor:
        out = self.embedding  # [P, token_dim]
        if self.lstm_head is not None:
            out = self.lstm_head(out.unsqueeze(0))[0][0]  # [1, P, token_dim] → [P, 2·hidden]
        return out if self.mlp_head is None else self.mlp_head(out)  # [P, token_dim]


class PromptEncoderDelta(SequenceDelta):
    """Holds one prompt encoder per adapter; puts the active one's output into the input embeddings."""

    attribute = "deltatune_p_tuning"
    peft_key_prefix = ""  # peft saves prompt tensors at the root of the file
    slots_in_input_ids = True

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.in_template: dict[str, bool] = {}

    def add_adapter(self, name: str, encoder: PromptEncoder, in_template: bool) -> None:
        self.encoders[name] = encoder
        self.in_template[name] = in_template
        self.active_adapters = self.active_adapters or (name,)

    def adapter_names(self) -> list[str]:
        return list(self.encoders.keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {f"encoders.{name}.{local}": p for local, p in self.encoders[name].named_parameters()}

    def peft_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own = {local: tensors[f"encoders.{name}.{local}"] for local, _ in self.encoders[name].named_parameters()}
        with torch.no_grad():  # as inference computes it (the LSTM's no-grad kernel differs by ~1 ulp)
            return {"prompt_embeddings": functional_call(self.encoders[name], own, ())}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        """peft's file holds the encoder's output only: the adapter becomes that fixed table."""
        old = self.encoders[name].embedding
        check_shapes(where, {"prompt_embeddings": old.shape}, state)
        table = state["prompt_embeddings"].detach().to(device=old.device, dtype=old.dtype).clone()
        self.encoders[name] = PromptEncoder(table, kind=None)

    def delete_adapter(self, name: str) -> None:
        del self.encoders[name]
        del self.in_template[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def rewrite_call(self, host: nn.Module, name: str, call: dict) -> dict:
        if self.in_template[name]:
            return self._fill_slots(host, name, call)
        return self._prepend(host, name, call)

    def _prepend(self, host: nn.Module, name: str, call: dict) -> dict:
        encoder = self.encoders[name]
        self._strip = prepend_virtual_tokens(host, call, encoder.embedding.shape[0], encoder, self.cache_name)
        return call

    def _fill_slots(self, host: nn.Module, name: str, call: dict) -> dict:
        ids = call.get("input_ids")  # [B, L]; virtual token k sits at id -(k+1)
        if ids is None:
            raise DeltatuneError("P-tuning with a template finds its slots in input_ids (negative ids from render()); "
                                 "pass input_ids instead of inputs_embeds.")
        slots = ids < 0
        if not bool(slots.any()):  # a later generation step, or text without slots
            return call
        virtual = self.encoders[name]()  # [P, hidden]
        index = -ids - 1
        if int(index.max()) >= virtual.shape[0]:
            raise DeltatuneError(f"input_ids hold virtual token id {int(ids.min())} but the adapter has only "
                                 f"{virtual.shape[0]} virtual tokens; render the data with this adapter's template.")
        embeds = host.get_input_embeddings()(ids.clamp(min=0))  # [B, L, hidden]
        filled = virtual.to(embeds.dtype)[index.clamp(min=0)]  # [B, L, hidden]
        call["inputs_embeds"] = torch.where(slots.unsqueeze(-1), filled, embeds)
        del call["input_ids"]
        labels = call.get("labels")
        if labels is not None and labels.shape == ids.shape:
            call["labels"] = labels.masked_fill(slots, -100)
        return call
