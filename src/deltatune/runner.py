"""One training run from a RunConfig: load, wrap, tokenize, train, save — for any method and task.

The task (``causal-lm``, ``classification``, ``seq2seq``; see ``deltatune.pretrained``) picks the
model class and the data format; a classification run also writes its label list
(``labels.json``, class ``i`` is ``labels[i]``) into the output, and names the classes in the
model's config (``id2label``).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch

import deltatune as dt
from deltatune.atomic import atomic_write_text, check_output_folder, files_into, remove_own_files
from deltatune.config import RunConfig
from deltatune.distributed import finish_runtime, start_runtime
from deltatune.errors import DeltatuneError
from deltatune.data import batch_indices, check_packing, collate, iter_examples, iter_packed_rows, iter_tokenized, packed_attention
from deltatune.pretrained import infer_task, load_model, load_tokenizer, pad_token_id, write_labels
from deltatune.task_data import TaskData, prepare_task_data
from deltatune.token_store import TokenStore
from deltatune.train import TrainResult, file_fingerprint, resume_checkpoint, train, write_failure_as_error

RUN_RECORD = "deltatune_run.yaml"


def tokenized_data(run: RunConfig, tokenizer: Any) -> tuple[TokenStore, TokenStore]:
    """The run's training and held-out examples as token ids and labels, laid out by its method.

    The data files are read one record at a time into ``TokenStore``s (temporary files): memory
    does not grow with the files' size. Without ``eval_data`` the held-out records are the seeded
    ``eval_fraction`` of ``data`` that ``split_examples`` picks."""
    encode = partial(run.method.encode_prompt, tokenizer)  # a P-tuning template places its own tokens

    def stored(path: str) -> TokenStore:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            store = TokenStore.from_items(
                iter_tokenized(iter_examples(path), tokenizer, run.train.max_length, encode, run.truncate))
        for warning in caught:
            print(f"deltatune: warning: {path}: {warning.message}", file=sys.stderr)
        if store.records == 0:
            raise DeltatuneError(f"data file {path} holds no examples: add at least one record")
        return store

    if run.eval_data:
        train_tokens, eval_tokens = stored(run.data), stored(run.eval_data)
    else:
        train_tokens, eval_tokens = stored(run.data).split_by_record(run.eval_fraction, run.train.seed)
    if run.packing:  # held-out examples stay unpacked: their loss is the same either way
        packed = TokenStore.from_items(iter_packed_rows(train_tokens, run.train.max_length, train_tokens.lengths()))
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
    runtime = start_runtime(run.strategy, model)  # under torchrun: DDP or FSDP2 over every process; else this one
    if overwrite and not resume and runtime.is_main:  # only now that model and data loaded: a failed start loses nothing
        remove_own_files(output)
    output.mkdir(parents=True, exist_ok=True)
    resolved = dataclasses.replace(run, task=task, labels=None if data.labels is None else tuple(data.labels))
    identity = _resume_identity(resolved)
    if resume:  # a changed setting is refused before the run record or the labels are rewritten
        resume_checkpoint(output, run.train, identity)
    if runtime.is_main:
        atomic_write_text(output / RUN_RECORD, resolved.to_yaml())
    if data.labels is not None and runtime.is_main:  # before training: every checkpoint folder is complete too
        write_labels(output, data.labels)
    runtime.barrier()  # the output folder is ready before any process looks into it
    # a decoder classifier finds each row's last token by the config's pad id: pad batches with that one
    pad = base.config.pad_token_id if task == "classification" else pad_token_id(tokenizer)
    with packed_attention(model) if run.packing else nullcontext():  # packed rows: attention inside each example
        result = train(model, data.train, data.eval, run.train, output, pad_token_id=pad,
                       save_model=_saver(data.labels), resume=resume, progress=progress, collate_fn=data.collate,
                       runtime=runtime, run_settings=identity)
    with runtime.whole(model):  # FSDP2: every process gathers the weights that the main one writes
        if runtime.is_main:
            with write_failure_as_error(output, output):  # a full disk: one sentence, the checkpoints are kept
                dt.save(model, output)
                with files_into(output) as staging:  # self-contained: `generate --model` works on a full FT folder
                    tokenizer.save_pretrained(staging)
    finish_runtime(runtime)
    result.model = model
    return result


def _resume_identity(run: RunConfig) -> dict[str, Any]:
    """The run's settings that change its result besides the trainer's own (which ``train`` checks):
    the model, the method's settings, the data files (path, size, content hash), the split, the task.
    Every checkpoint records them and --resume refuses a change (train.resume_checkpoint)."""
    settings = run.as_settings()
    for key in ("output", "trust_remote_code", "strategy", "train"):  # where and how, not what, is trained
        settings.pop(key, None)
    settings["model"] = str(Path(run.model).resolve())
    for key in ("data", "eval_data"):
        settings[key] = None if settings[key] is None else file_fingerprint(settings[key])
    return settings


def _saver(labels: list[Any] | None) -> Any:
    """``dt.save``, plus the label list in every checkpoint of a classification run."""
    if labels is None:
        return dt.save

    def save(model: torch.nn.Module, folder: Path) -> None:
        dt.save(model, folder)
        write_labels(folder, labels)
    return save
