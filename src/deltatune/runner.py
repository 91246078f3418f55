"""One training run from a RunConfig: load, wrap, tokenize, train, save — for any method."""

from __future__ import annotations

import warnings
from functools import partial

import torch

import deltatune as dt
from deltatune.atomic import atomic_write_text, check_output_folder, files_into, remove_own_files
from deltatune.config import RunConfig
from deltatune.data import load_examples, split_examples, tokenize_examples
from deltatune.pretrained import load_causal_lm, load_tokenizer, pad_token_id
from deltatune.train import TrainResult, train

RUN_RECORD = "deltatune_run.yaml"


def run_training(run: RunConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train ``run``. An --output that holds files needs ``resume`` (its checkpoints continue) or
    ``overwrite`` (deltatune's files from an earlier run are cleared; other files are kept)."""
    output = check_output_folder(run.output, overwrite=overwrite or resume, reads=(run.model,))
    tokenizer = load_tokenizer(run.model, run.trust_remote_code)
    examples = load_examples(run.data)
    if run.eval_data:
        train_examples, eval_examples = examples, load_examples(run.eval_data)
    else:
        train_examples, eval_examples = split_examples(examples, run.eval_fraction, run.train.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode = partial(run.method.encode_prompt, tokenizer)  # a P-tuning template places its own tokens
        train_tokens = tokenize_examples(train_examples, tokenizer, run.train.max_length, encode)
        eval_tokens = tokenize_examples(eval_examples, tokenizer, run.train.max_length, encode)
    for warning in caught:
        print(f"deltatune: warning: {warning.message}")
    base = load_causal_lm(run.model, run.dtype, run.trust_remote_code)
    torch.manual_seed(run.train.seed)  # the method's initial values come from the run's seed, not from chance
    model = dt.wrap(base, run.method)
    if overwrite and not resume:  # only now that model and data loaded: a failed start loses nothing
        remove_own_files(output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / RUN_RECORD, run.to_yaml())
    result = train(model, train_tokens, eval_tokens, run.train, output, pad_token_id=pad_token_id(tokenizer),
                   save_model=dt.save, resume=resume, progress=progress)
    dt.save(model, output)
    with files_into(output) as staging:  # self-contained: `deltatune generate --model` works on a model folder
        tokenizer.save_pretrained(staging)
    return result
