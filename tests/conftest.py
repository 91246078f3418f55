"""Tiny models built in code (fixed seeds) and the path to ../shared, for every test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, **overrides)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def stories_dir():
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"{STORIES} is not present: the shared stories260K model is needed for this test")
    return STORIES
