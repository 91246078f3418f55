"""Text in, text out: encode prompts the way training did, generate greedily, decode the new tokens."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from deltatune.data import encode_prompt
from deltatune.pretrained import pad_token_id

__all__ = ["encode_prompt", "generate_text"]


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64,
                  do_sample: bool = False, temperature: float = 1.0) -> list[str]:
    """Continuations of ``prompts`` (left-padded into one batch); greedy unless ``do_sample``."""
    method = getattr(model, "methods", {}).get(getattr(model, "active_adapter", None))
    encode = method.encode_prompt if method is not None else encode_prompt  # a template places its own tokens
    encoded = [encode(tokenizer, p) for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            pad_token_id=pad, **sampling)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in output]
