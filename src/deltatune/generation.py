"""Text in, text out: encode prompts the way training did, generate in left-padded batches, decode the new tokens.

Batches are left-padded (the new tokens of every row start at the same column) and the
attention mask hides the padding, so each prompt continues as it would alone: greedy
outputs equal one-prompt-at-a-time outputs (``tests/test_eval.py`` checks this).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from deltatune.data import encode_prompt
from deltatune.errors import DeltatuneError
from deltatune.pretrained import pad_token_id

__all__ = ["encode_prompt", "generate_ids", "generate_text", "prompt_encoder"]


def prompt_encoder(model: nn.Module, tokenizer: Any) -> Callable[[str], list[int]]:
    """How ``model`` lays out a prompt as ids: its active method's ``encode_prompt`` (a P-tuning
    template places its own virtual tokens), else [BOS] + the prompt's tokens."""
    method = getattr(model, "active_method", None)  # a composition's: the part that places its tokens
    encode = method.encode_prompt if method is not None else encode_prompt
    return lambda text: encode(tokenizer, text)


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], *, pad_token_id: int,
                 eos_token_id: int | None = None, max_new_tokens: int = 64, batch_size: int = 16,
                 do_sample: bool = False, temperature: float = 1.0) -> list[list[int]]:
    """The new token ids after each prompt (cut after the first end token), in the order of ``prompts``.

    Prompts run ``batch_size`` at a time, grouped by length so batches pad little; each batch
    is left-padded with its attention mask. Generation stops at ``eos_token_id`` or at any end
    token of the model's generation config. Greedy unless ``do_sample`` (then ``temperature``).
    """
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    stops += [] if eos_token_id is None or eos_token_id in stops else [eos_token_id]
    ends = {"eos_token_id": stops} if stops else {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    _require_context(model, max(len(prompts[i]) for i in order[-1:]) if prompts else 0, max_new_tokens)
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        encoded = [list(prompts[i]) for i in rows]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_token_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                pad_token_id=pad_token_id, **ends, **sampling)
        for row, new in zip(rows, output[:, width:].tolist()):
            end = next((k for k, token in enumerate(new) if token in stops), None)
            results[row] = new if end is None else new[:end + 1]
    return results


def context_length(model: nn.Module) -> int | None:
    """The positions the model was trained on (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _require_context(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    context = context_length(model)
    if context is not None and prompt_tokens + max_new_tokens > context:
        room = context - prompt_tokens
        fix = (f"lower max_new_tokens to at most {room}" if room > 0
               else "shorten the prompt")
        raise DeltatuneError(f"a prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} runs past the "
                             f"model's context of {context} positions: {fix}")


def generate_text(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64,
                  do_sample: bool = False, temperature: float = 1.0, batch_size: int = 16) -> list[str]:
    """Continuations of ``prompts`` (left-padded batches, see ``generate_ids``); greedy unless ``do_sample``."""
    encode = prompt_encoder(model, tokenizer)
    new_ids = generate_ids(model, [encode(p) for p in prompts], pad_token_id=pad_token_id(tokenizer),
                           eos_token_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, do_sample=do_sample, temperature=temperature)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
