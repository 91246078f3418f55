"""Use a trained model on a file of records: class probabilities per record, or a generation per prompt.

    model, tokenizer, task, labels = load_trained("base/", "run/")     # deltatune.pretrained
    rows = predict_labels(model, tokenizer, records, labels)           # one dict per record
    rows = predict_texts(model, tokenizer, load_prompts("p.jsonl"))    # a decoder: one generation per prompt
    rows = predict_seq2seq(model, tokenizer, records)                  # BART, T5: one per source
    texts = generate_seq2seq(model, tokenizer, ["translate: hello"])   # BART, T5
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from deltatune.atomic import atomic_file
from deltatune.data import Example, prompt_ids, shown_prompt
from deltatune.errors import DeltatuneError
from deltatune.generation import generate_ids, prompt_encoder
from deltatune.pretrained import pad_token_id
from deltatune.task_data import (ClassificationRecord, Label, Seq2SeqRecord, collate_classification,
                                 encode_classification)


@torch.no_grad()
def predict_labels(model: nn.Module, tokenizer: Any, records: Sequence[ClassificationRecord], labels: Sequence[Label],
                   batch_size: int = 32, max_length: int = 512) -> list[dict[str, Any]]:
    """For each record: its text, the predicted label, every label's probability (softmax of the
    logits) and, when the record has one, its own label."""
    model.eval()
    device = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", None)  # a decoder finds each row's last token by it
    pad = pad_token_id(tokenizer) if pad is None else pad
    rows = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = collate_classification(encode_classification(chunk, tokenizer, max_length), pad)
        logits = model(**{key: value.to(device) for key, value in batch.items()}).logits  # [batch, labels]
        probabilities = logits.float().softmax(dim=-1).cpu()
        for record, probs in zip(chunk, probabilities):
            row: dict[str, Any] = {"text": record.text}
            if record.text_pair is not None:
                row["text_pair"] = record.text_pair
            row["label"] = labels[int(probs.argmax())]
            row["probabilities"] = {str(label): round(float(p), 6) for label, p in zip(labels, probs)}
            if record.label is not None:
                row["true_label"] = record.label
            rows.append(row)
    return rows


@torch.no_grad()
def predict_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[tuple[Example, str | None]], *,
                  max_new_tokens: int = 64, batch_size: int = 16, do_sample: bool = False,
                  temperature: float = 1.0) -> list[dict[str, Any]]:
    """For each (example, answer) of ``data.load_prompts``: its prompt as the record showed it, the
    model's continuation (``generate_ids``: left-padded batches, cut at the end token) and, when the
    record has one, its answer as ``reference``. The rows keep the records' order."""
    model.eval()
    encode = prompt_encoder(model, tokenizer)
    new_ids = generate_ids(model, [prompt_ids(example, tokenizer, encode) for example, _ in prompts],
                           pad_token_id=pad_token_id(tokenizer), eos_token_id=tokenizer.eos_token_id,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
                           temperature=temperature)
    return [_generation_row(shown_prompt(example), tokenizer.decode(ids, skip_special_tokens=True), answer)
            for (example, answer), ids in zip(prompts, new_ids)]


def predict_seq2seq(model: nn.Module, tokenizer: Any, records: Sequence[Seq2SeqRecord], *, max_new_tokens: int = 64,
                    batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0) -> list[dict[str, Any]]:
    """For each record: its source, the decoder's output and, when the record has one, its target
    as ``reference``."""
    texts = generate_seq2seq(model, tokenizer, [record.source for record in records], max_new_tokens=max_new_tokens,
                             do_sample=do_sample, temperature=temperature, batch_size=batch_size)
    return [_generation_row({"source": record.source}, text, record.target) for record, text in zip(records, texts)]


def _generation_row(prompt: dict[str, Any], generated: str, reference: str | None) -> dict[str, Any]:
    row = {**prompt, "prediction": generated.strip()}
    if reference is not None:
        row["reference"] = reference
    return row


def trained_settings(folder: str | os.PathLike | None) -> dict[str, Any]:
    """The settings a run's output was trained with (its ``deltatune_run.yaml``), or {} when it has none:
    ``predict`` reads the same columns and cuts texts at the same ``max_length`` by default."""
    import yaml

    record = Path(folder, "deltatune_run.yaml") if folder is not None else None
    if record is None or not record.is_file():
        return {}
    try:
        settings = yaml.safe_load(record.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    return settings if isinstance(settings, dict) else {}


def accuracy(rows: Sequence[dict[str, Any]]) -> float | None:
    """The share of rows whose predicted label equals their own label (None when no row has one)."""
    labelled = [row for row in rows if "true_label" in row]
    if not labelled:
        return None
    return sum(str(row["label"]) == str(row["true_label"]) for row in labelled) / len(labelled)


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """One JSON object a line, written through a temporary file and a rename."""
    if Path(path).is_dir():
        raise DeltatuneError(f"--output {str(path)!r} is a folder; name a .jsonl file to write.")
    with atomic_file(path) as staging:
        staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


@torch.no_grad()
def generate_seq2seq(model: nn.Module, tokenizer: Any, sources: Sequence[str], max_new_tokens: int = 64,
                     do_sample: bool = False, temperature: float = 1.0, batch_size: int = 16) -> list[str]:
    """The decoder's output for each source, ``batch_size`` sources at a time (encoder inputs
    right-padded within a batch)."""
    model.eval()
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    texts = []
    for start in range(0, len(sources), batch_size):
        records = [ClassificationRecord(text=source, label=None) for source in sources[start:start + batch_size]]
        batch = collate_classification(encode_classification(records, tokenizer, max_length=10**9), pad)
        output = model.generate(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device),
                                max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
        texts += [tokenizer.decode(row, skip_special_tokens=True) for row in output]
    return texts
