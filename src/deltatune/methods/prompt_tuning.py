"""Prompt Tuning (Lester et al., 2021, arXiv 2104.08691): a soft prompt at the input layer only.

    inputs_embeds = [P; E(x)],   P: num_virtual_tokens × hidden, trained; everything else frozen.

Init: random (N(0, 1)·0.02... as peft: the embedding's default N(0,1)), sampled from the rows
of the vocabulary's embedding table, or the embeddings of a text ("Classify the sentiment:")
repeated to length. The virtual positions are dropped from the returned logits, so outputs
keep the base model's shape; the loss ignores them. Saved as peft's PROMPT_TUNING:
one tensor ``prompt_embeddings`` [num_virtual_tokens, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.protocol import Capabilities, Method, check_shapes
from deltatune.methods.trained_copy import inject_trained_copies, trained_modules
from deltatune.methods.virtual_tokens import (SequenceDelta, attached_module, check_context, check_not_encoder_decoder,
                                              prepend_virtual_tokens)
from deltatune.validation import require_choice, require_names, require_optional_text, require_size

INITS = ("random", "vocab", "text")


@dataclass(frozen=True)
class PromptTuning(Method):
    """``num_virtual_tokens`` trainable input embeddings; ``init_text`` is used when init="text"."""

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer_path: str | None = None  # where init="text" finds its tokenizer (default: the model's folder)
    modules_to_save: tuple[str, ...] = ()  # trained in full; empty means a classifier's head

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    peft_module_root: ClassVar[str] = "base_model."  # peft wraps prompt-learning models one level less
    cli_name: ClassVar[str] = "prompt"
    training_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 3e-2}  # peft's examples; see README

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules_to_save", require_names("modules_to_save", self.modules_to_save or ()))
        require_size("num_virtual_tokens", self.num_virtual_tokens)
        require_choice("init", self.init, INITS)
        require_optional_text("init_text", self.init_text)
        require_optional_text("tokenizer_path", self.tokenizer_path)
        if self.init == "text" and not self.init_text:
            raise DeltatuneError('init="text" needs init_text, e.g. init_text="Classify the sentiment:".')

    def capabilities(self) -> Capabilities:
        return Capabilities(equals_base_at_init=False, rewrites_call=True)

    def inject(self, model: nn.Module, adapter_name: str) -> list[str]:
        check_not_encoder_decoder(model, "Prompt tuning")
        check_context(model, self.num_virtual_tokens)
        module = attached_module(model, SoftPrompt)
        hidden = model.get_input_embeddings().weight.shape[1]
        module.add_adapter(adapter_name, self.initial_prompt(model, hidden))
        heads = trained_modules(model, self.modules_to_save)
        return [SoftPrompt.attribute] + inject_trained_copies(model, heads, adapter_name)

    def initial_prompt(self, model: nn.Module, hidden: int) -> torch.Tensor:
        table = model.get_input_embeddings().weight.detach()
        count = self.num_virtual_tokens
        if self.init == "vocab":
            rows = torch.randint(0, table.shape[0], (count,))
            return table[rows].clone().float()
        if self.init == "text":
            ids = text_ids(model, self.init_text, self.tokenizer_path)
            ids = (ids * (count // len(ids) + 1))[:count]
            return table[torch.tensor(ids)].clone().float()
        return torch.randn(count, hidden) * table.float().std()

    def peft_config(self, model: nn.Module) -> dict[str, Any]:
        config = getattr(model, "config", None)
        return {
            "peft_type": self.peft_type, "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": model.get_input_embeddings().weight.shape[1], "num_transformer_submodules": 1,
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_layers": getattr(config, "num_hidden_layers", None),
            "prompt_tuning_init": {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[self.init],
            "prompt_tuning_init_text": self.init_text, "tokenizer_name_or_path": self.tokenizer_path,
            "modules_to_save": list(trained_modules(model, self.modules_to_save)) or None,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> "PromptTuning":
        if config.get("num_transformer_submodules", 1) not in (1, None):
            raise DeltatuneError("This prompt-tuning adapter is for an encoder–decoder model; "
                                 "deltatune's prompt tuning supports decoder-only and encoder models.")
        # the weights are loaded from the file, so the init does not matter: keep it cheap
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]),
                   modules_to_save=tuple(config.get("modules_to_save") or ()))


def text_ids(model: nn.Module, text: str, tokenizer_path: str | None) -> list[int]:
    from transformers import AutoTokenizer

    path = tokenizer_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise DeltatuneError('init="text" needs a tokenizer: pass tokenizer_path="path/to/model".')
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise DeltatuneError(f"init=\"text\" could not load a tokenizer from {path!r} ({str(error).strip().splitlines()[0]}); "
                             "pass tokenizer_path=\"path/to/model\", a local folder with the tokenizer.") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DeltatuneError(f"init_text {text!r} gives no tokens; use a non-empty text.")
    return ids


class SoftPrompt(SequenceDelta):
    """Holds one soft prompt per adapter and prepends the active one to the input embeddings."""

    attribute = "deltatune_soft_prompt"

    def __init__(self) -> None:
        super().__init__()
        self.prompts = nn.ParameterDict()

    def add_adapter(self, name: str, prompt: torch.Tensor) -> None:
        self.prompts[name] = nn.Parameter(prompt)
        self.active_adapters = self.active_adapters or (name,)

    def adapter_names(self) -> list[str]:
        return list(self.prompts.keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {f"prompts.{name}": self.prompts[name]}

    def peft_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": tensors[f"prompts.{name}"]}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        check_shapes(where, {"prompt_embeddings": self.prompts[name].shape}, state)
        with torch.no_grad():
            self.prompts[name].copy_(state["prompt_embeddings"])

    def delete_adapter(self, name: str) -> None:
        del self.prompts[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    peft_key_prefix = ""  # peft saves prompt tensors at the root of the file

    def rewrite_call(self, host: nn.Module, name: str, call: dict) -> dict:
        prompt = self.prompts[name]
        self._strip = prepend_virtual_tokens(host, call, prompt.shape[0], lambda: prompt, self.cache_name)
        return call
