"""One training run from a RunConfig: load, wrap, tokenize, train, save — for any method and task.

The task (``causal-lm``, ``classification``, ``seq2seq``; see ``deltatune.pretrained``) picks the
model class and the data format; a classification run also writes its label list
(``labels.json``, class ``i`` is ``labels[i]``) into the output, and names the classes in the
model's config (``id2label``).
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch

import deltatune as dt
from deltatune.atomic import atomic_write_text, check_output_folder, files_into, remove_own_files
from deltatune.config import RunConfig
from deltatune.errors import DeltatuneError
from deltatune.data import (batch_indices, check_packing, collate, load_examples, pack_examples, packed_attention,
                            split_examples, tokenize_examples)
from deltatune.pretrained import infer_task, load_model, load_tokenizer, pad_token_id, write_labels
from deltatune.task_data import TaskData, prepare_task_data
from deltatune.train import TrainResult, train

RUN_RECORD = "deltatune_run.yaml"


def tokenized_data(run: RunConfig, tokenizer: Any) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """The run's training and held-out examples as token ids and labels, laid out by its method."""
    examples = load_examples(run.data)
    if run.eval_data:
        train_examples, eval_examples = examples, load_examples(run.eval_data)
    else:
        train_examples, eval_examples = split_examples(examples, run.eval_fraction, run.train.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode = partial(run.method.encode_prompt, tokenizer)  # a P-tuning template places its own tokens
        train_tokens = tokenize_examples(train_examples, tokenizer, run.train.max_length, encode, run.truncate)
        eval_tokens = tokenize_examples(eval_examples, tokenizer, run.train.max_length, encode, run.truncate)
    for warning in caught:
        print(f"deltatune: warning: {warning.message}")
    if run.packing:  # held-out examples stay unpacked: their loss is the same either way
        packed = pack_examples(train_tokens, run.train.max_length)
        print(f"deltatune: packed {len(train_tokens)} training examples into {len(packed)} rows of at most "
              f"{run.train.max_length} tokens")
        train_tokens = packed
    return train_tokens, eval_tokens


def run_task(run: RunConfig) -> str:
    """The run's task: as set, or read from the model's config."""
    if run.task is not None:
        return run.task
    task = infer_task(run.model)
    if task == "causal-lm" and Path(run.data).suffix.lower() in (".tsv", ".csv"):
        raise DeltatuneError(f"{run.data} is a table, which causal-LM training does not read, and the model's config "
                             f"names no task; for a classifier pass task=classification.")
    return task


def run_data(run: RunConfig, tokenizer: Any, task: str | None = None) -> TaskData:
    """The run's examples for its task, how to batch them and (classification) the label list."""
    task = task or run_task(run)
    if task == "causal-lm":
        return TaskData(*tokenized_data(run, tokenizer), collate=collate)
    if run.packing or run.truncate != "right":
        raise DeltatuneError(f"packing and truncate apply to causal-LM data, not to a {task} run: leave them out")
    return prepare_task_data(task, run, tokenizer)


def run_batches(run: RunConfig, count: int = 1) -> list[dict[str, torch.Tensor]]:
    """The run's first ``count`` training micro-batches, exactly as the training loop builds them."""
    tokenizer = load_tokenizer(run.model, run.trust_remote_code)
    data = run_data(run, tokenizer)
    lengths = [len(example["input_ids"]) for example in data.train] if run.train.group_by_length else None
    order = batch_indices(len(data.train), run.train.batch_size, run.train.seed, lengths=lengths)
    return [data.collate([data.train[i] for i in next(order)], pad_token_id(tokenizer)) for _ in range(count)]


def run_training(run: RunConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train ``run``. An --output that holds files needs ``resume`` (its checkpoints continue) or
    ``overwrite`` (deltatune's files from an earlier run are cleared; other files are kept)."""
    output = check_output_folder(run.output, overwrite=overwrite or resume, reads=(run.model,))
    tokenizer = load_tokenizer(run.model, run.trust_remote_code)
    task = run_task(run)
    data = run_data(run, tokenizer, task)
    base = load_model(run.model, task, run.dtype, run.trust_remote_code, labels=data.labels,
                      pad_token_id=pad_token_id(tokenizer))
    torch.manual_seed(run.train.seed)  # the method's initial values come from the run's seed, not from chance
    model = dt.wrap(base, run.method)
    if run.packing:  # refuse before training if this model would let packed examples see each other
        check_packing(model, data.train, pad_token_id(tokenizer))
    if overwrite and not resume:  # only now that model and data loaded: a failed start loses nothing
        remove_own_files(output)
    output.mkdir(parents=True, exist_ok=True)
    resolved = dataclasses.replace(run, task=task, labels=None if data.labels is None else tuple(data.labels))
    atomic_write_text(output / RUN_RECORD, resolved.to_yaml())
    if data.labels is not None:  # before training: every checkpoint folder is complete too
        write_labels(output, data.labels)
    # a decoder classifier finds each row's last token by the config's pad id: pad batches with that one
    pad = base.config.pad_token_id if task == "classification" else pad_token_id(tokenizer)
    with packed_attention(model) if run.packing else nullcontext():  # packed rows: attention inside each example
        result = train(model, data.train, data.eval, run.train, output, pad_token_id=pad,
                       save_model=_saver(data.labels), resume=resume, progress=progress, collate_fn=data.collate)
    dt.save(model, output)
    with files_into(output) as staging:  # self-contained: `generate --model` works on a full fine-tuning folder
        tokenizer.save_pretrained(staging)
    result.model = model
    return result


def _saver(labels: list[Any] | None) -> Any:
    """``dt.save``, plus the label list in every checkpoint of a classification run."""
    if labels is None:
        return dt.save

    def save(model: torch.nn.Module, folder: Path) -> None:
        dt.save(model, folder)
        write_labels(folder, labels)
    return save
