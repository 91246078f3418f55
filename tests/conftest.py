"""Tiny models built in code (fixed seeds) and the path to ../shared, for every test."""

from __future__ import annotations

from pathlib import Path

import json

import pytest
import torch
from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification, T5Config, T5ForConditionalGeneration)

from deltatune.cli import main as cli_main
from deltatune.pretrained import bundled

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


def tiny_llama_classifier(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def tiny_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)).eval()


def tiny_bart(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0)).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)).eval()
    model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 0  # T5's convention
    return model


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
# every architecture family the contract suite runs each method on
TINY_ARCHITECTURES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gpt_neox": tiny_neox, "bert_cls": tiny_bert,
                      "llama_cls": tiny_llama_classifier, "bart": tiny_bart, "t5": tiny_t5}


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A LoRA adapter trained for a few steps by the CLI on 40 bundled E2E examples."""
    folder = tmp_path_factory.mktemp("cli")
    rows = [json.loads(line) for line in bundled("e2e/train.jsonl").read_text().splitlines()[:40]]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    output = folder / "adapter"
    code = cli_main(["train", "--model", str(bundled("stories260K")), "--data", str(data), "--output", str(output),
                     "--max-steps", "4", "--quiet", "rank=4", "targets=[q_proj,v_proj,down_proj]", "learning_rate=1e-2",
                     "batch_size=4"])
    assert code == 0
    return output
