"""One training loop for every method: it trains whatever parameters require grad.

The loop never asks which method made the model. LoRA, prompt tuning and full fine-tuning
differ only in which parameters have ``requires_grad=True``; the optimizer sees those and
nothing else. A step is ``gradient_accumulation_steps`` micro-batches of ``batch_size``
examples; each micro-batch's mean loss is weighted by its share of the step's predicted
tokens, so accumulating 2 x 4 computes the same update as one batch of 8.

Checkpoints (``output_dir/checkpoint-{step}/``, the newest ``save_total_limit`` kept) hold
everything needed to continue bit-exactly: trainable weights, optimizer and schedule state, and
every random generator's state (torch, CUDA, Python's, NumPy's). The batch order is a function of
the step number (see ``deltatune.data.batch_indices``). A checkpoint appears by one rename of a
finished, flushed folder (``deltatune.atomic``), so a process killed at any moment leaves the
previous checkpoints as they were, and ``resume`` continues from the newest one.

Faults (docs/faults.md): a step whose loss is NaN or inf stops the run, naming the step and its
examples, or is skipped (``nan_policy``); SIGINT or SIGTERM ends the current step, saves a
checkpoint and stops (``TrainingInterrupted``), a second one aborts at once; a full disk while
saving keeps the previous checkpoint; a damaged checkpoint or a changed setting is refused with
one sentence when resuming.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from deltatune.atomic import atomic_directory, atomic_write_text, is_own_file, remove_stale_staging, remove_tree
from deltatune.data import IGNORE_INDEX, batch_indices, collate
from deltatune.errors import DeltatuneError
from deltatune.losses import model_loss
from deltatune.memory import PeakMemory
from deltatune.runtime import Runtime
from deltatune.sharded_state import SHARDS
from deltatune.validation import require_bool, require_choice, require_int, require_number

LR_SCHEDULES = ("cosine", "linear", "constant")
NAN_POLICIES = ("stop", "skip")
# Settings that change which batches are seen or how weights move; resume needs them unchanged.
# max_length decides the tokens each example keeps. max_steps may grow on resume (more training);
# the schedule is then laid out over the new count from the next step on.
TRAJECTORY_SETTINGS = (
    "batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
    "warmup_steps", "lr_schedule", "max_grad_norm", "seed", "bf16", "group_by_length", "max_length",
)
LARGEST_COUNT = 2**31 - 1  # a step count, batch size or length beyond this is a typo, and overflows later
LARGEST_SEED = 2**32 - 1  # the range every generator takes (NumPy's too)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 8  # examples per micro-batch; a step sees batch_size * gradient_accumulation_steps
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    bf16: bool = False
    group_by_length: bool = False  # batches of similar length (less padding); the order stays seeded
    gradient_checkpointing: bool = False
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batches: int = 0  # 0: all eval data
    save_every: int = 0  # 0: checkpoint only at the end
    save_total_limit: int = 2  # complete checkpoints kept, the newest always among them
    log_every: int = 10
    max_length: int = 512
    nan_policy: str = "stop"  # a step whose loss is NaN or inf: stop, naming it; or skip its update

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "max_length",
                     "save_total_limit"):
            _require_count(name, getattr(self, name), minimum=1, largest=LARGEST_COUNT)
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every"):
            _require_count(name, getattr(self, name), minimum=0, largest=LARGEST_COUNT)
        _require_count("seed", self.seed, minimum=0, largest=LARGEST_SEED)
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            require_number(name, getattr(self, name), minimum=0)
        if self.learning_rate == 0:
            raise DeltatuneError("learning_rate is 0, so nothing would be learned: set it above 0, e.g. 2e-4")
        if self.warmup_steps > self.max_steps:
            raise DeltatuneError(
                f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps}): lower warmup_steps"
            )
        require_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        require_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        for name in ("bf16", "gradient_checkpointing", "group_by_length"):
            require_bool(name, getattr(self, name))


def _require_count(name: str, value: Any, minimum: int, largest: int) -> None:
    require_int(name, value, minimum=minimum)
    if value > largest:
        raise DeltatuneError(
            f"{name} must be a whole number from {minimum} to {largest}, got {value!r}: fix the config")


@dataclass
class TrainResult:
    step: int
    train_loss: float  # loss of the last step run (nan when resuming a finished run)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean eval loss per token)
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0  # wall time of the steps this call ran (evaluations before its last step included)
    checkpoint: Path | None = None  # the final checkpoint folder
    model: nn.Module | None = None  # the trained model (set by the runner)
    skipped_steps: int = 0  # steps whose loss was NaN or inf and whose update was dropped (nan_policy=skip)


class TrainingInterrupted(DeltatuneError):
    """SIGINT or SIGTERM stopped training after a step whose checkpoint is saved. ``exit_code`` is the
    shell's for that signal (130, 143); the message says how to continue."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def learning_rate_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Multiplier on the learning rate for the update after ``step`` updates (0-based).

    Warmup rises linearly to 1 at the last warmup step: (step + 1) / warmup_steps. Then,
    with progress p = (step - warmup_steps) / (max_steps - warmup_steps) in [0, 1):
    cosine 0.5 * (1 + cos(pi * p)), linear 1 - p, constant 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def train(
    model: nn.Module,
    train_examples: Sequence[dict[str, list[int]]],
    eval_examples: Sequence[dict[str, list[int]]],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    pad_token_id: int,
    save_model: Callable[[nn.Module, Path], None],
    resume: bool = False,
    progress: bool = True,
    runtime: Runtime | None = None,
    collate_fn: Callable[[Sequence[dict[str, Any]], int], dict[str, torch.Tensor]] = collate,
    run_settings: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train the ``requires_grad`` parameters of ``model`` on tokenized examples.

    ``collate_fn(examples, pad_token_id)`` makes a batch of tensors (default: token labels,
    ``deltatune.data.collate``; a classifier's labels are one per example, [batch]).

    ``run_settings``: whatever else decides the result (the method's settings, the data files'
    fingerprints, ...), JSON-ready; every checkpoint records it and ``resume`` refuses a change,
    as it does for the ``TRAJECTORY_SETTINGS`` of ``config``. ``resume`` in a folder whose run
    stopped before its first checkpoint starts from step 0.

    ``runtime`` says where this process runs and how it talks to the others (see
    ``deltatune.runtime``); the default, one process, changes nothing. Only the main process
    writes metrics, checkpoints and the progress bar.
    """
    runtime = runtime or Runtime()
    output_dir = Path(output_dir)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise DeltatuneError("the model has no trainable parameters: attach a tuning method before training")
    if not train_examples:
        raise DeltatuneError("there are no training examples left after tokenization: add data or raise max_length")
    device = runtime.place(model)  # DDP wraps the model, FSDP2 shards it: read its parameters again
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(config.seed + runtime.rank)  # dropout differs by process; init and data order do not
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(model)

    decay = [p for p in trainable.values() if p.ndim >= 2]  # no weight decay on biases and norms
    no_decay = [p for p in trainable.values() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    scheduler = LambdaLR(optimizer, lambda step: learning_rate_factor(
        step, warmup_steps=config.warmup_steps, max_steps=config.max_steps, schedule=config.lr_schedule))

    if runtime.is_main and remove_stale_staging(output_dir):
        print(f"deltatune: removed the unfinished files that an interrupted run left in {output_dir}", file=sys.stderr)
    state: dict[str, Any] = {}
    if resume:
        checkpoint = resume_checkpoint(output_dir, config, run_settings)
        if checkpoint is not None:
            state = _load_checkpoint(checkpoint, trainable, optimizer, scheduler, config, runtime)
            note = stretched_schedule_note(checkpoint.name, state, config)
            if note and runtime.is_main:
                print(note, file=sys.stderr)
        elif runtime.is_main:
            print(f"deltatune: {output_dir} holds no checkpoint yet: training starts from step 0", file=sys.stderr)
    elif _checkpoints(output_dir):
        raise DeltatuneError(f"{output_dir} already holds checkpoints: pass --resume or pick a new output folder")
    start_step, skipped = state.get("step", 0), state.get("skipped_steps", 0)
    extra_state = {"skipped_steps": skipped} | ({} if run_settings is None else {"run": _json_ready(run_settings)})
    metrics_path = output_dir / "metrics.jsonl"
    if runtime.is_main:
        with write_failure_as_error(metrics_path, output_dir):
            _keep_metrics_up_to(metrics_path, start_step)
    peak_memory = PeakMemory(device) if device.type in ("cpu", "cuda") else None

    accumulation = config.gradient_accumulation_steps
    lengths = [len(example["input_ids"]) for example in train_examples] if config.group_by_length else None
    batches = batch_indices(len(train_examples), config.batch_size, config.seed,
                            start_batch=start_step * accumulation, lengths=lengths)
    result = TrainResult(step=start_step, train_loss=math.nan)
    if start_step == 0 and eval_examples:  # the starting point, so every run's log shows its gain
        result.eval_losses.append((0, evaluate(model, eval_examples, config, pad_token_id, collate_fn, runtime)))
        if runtime.is_main:
            _append_metrics(metrics_path, {"step": 0, "eval_loss": result.eval_losses[0][1]}, output_dir)
    tokens_seen, started = 0, time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=start_step, disable=not (progress and runtime.is_main), desc="training")
    model.train()
    with bar, _StopRequests() as stop:
        for step in range(start_step + 1, config.max_steps + 1):
            indices = [next(batches) for _ in range(accumulation)]
            micro_batches = [collate_fn([train_examples[i] for i in runtime.shard(batch)], pad_token_id)
                             for batch in indices]
            learning_rate = optimizer.param_groups[0]["lr"]
            loss = _accumulate_gradients(model, micro_batches, device, config.bf16, runtime)
            finite = math.isfinite(loss)  # the same on every process: the loss is summed over them all
            if finite:
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable.values(), config.max_grad_norm)
                optimizer.step()
            elif config.nan_policy == "stop":
                raise _non_finite_loss(loss, step, indices, output_dir)
            else:  # skip: this step's gradients are dropped; the schedule still follows the step number
                skipped += 1
                if runtime.is_main:
                    bar.write(f"deltatune: warning: the loss at step {step} is {loss} (training examples "
                              f"{_numbers(indices)}): its update is skipped (nan_policy=skip)", file=sys.stderr)
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped first step steps the schedule before the optimizer
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()

            tokens_seen += int(runtime.all_sum(sum(int(batch["attention_mask"].sum()) for batch in micro_batches)))
            elapsed = time.perf_counter() - started
            tokens_per_s = tokens_seen / elapsed
            result.step, result.train_loss, result.tokens_per_s = step, loss, tokens_per_s
            result.train_seconds = elapsed
            result.skipped_steps = extra_state["skipped_steps"] = skipped
            record: dict[str, Any] = {"step": step, "loss": loss if finite else None, "lr": learning_rate,
                                      "tokens_per_s": tokens_per_s}
            if skipped:
                record["skipped_steps"] = skipped
            final = step == config.max_steps
            if eval_examples and (final or (config.eval_every and step % config.eval_every == 0)):
                record["eval_loss"] = evaluate(model, eval_examples, config, pad_token_id, collate_fn, runtime)
                result.eval_losses.append((step, record["eval_loss"]))
            if runtime.is_main and (final or not finite or "eval_loss" in record or step % config.log_every == 0):
                if peak_memory is not None:
                    record.update(peak_memory.as_mib())
                _append_metrics(metrics_path, record, output_dir)
            saved = final or (config.save_every and step % config.save_every == 0)
            if saved:
                result.checkpoint = _save_checkpoint(
                    model, trainable, optimizer, scheduler, config, step, output_dir, save_model, runtime, extra_state)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{tokens_per_s:.0f}")
            if not final and runtime.all_sum(float(stop.signal is not None)) > 0:  # every process stops here
                if not saved:
                    result.checkpoint = _save_checkpoint(
                        model, trainable, optimizer, scheduler, config, step, output_dir, save_model, runtime,
                        extra_state)
                raise _interrupted(stop.signal or signal.SIGTERM, step, config.max_steps, result.checkpoint)
    if result.checkpoint is None:  # resumed a run that had already finished
        result.checkpoint = _latest_checkpoint(output_dir)
    return result


class _StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before it kills a job) while training: the
    first asks the loop to stop after the current step, which then saves a checkpoint; a second
    aborts at once (KeyboardInterrupt). Python runs handlers in the main thread only: elsewhere, and
    for a signal the process ignores (``nohup``), nothing changes."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._received)
        return self

    def __exit__(self, *exception: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)

    def _received(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        # os.write, not print: a handler may run in the middle of another write to stderr
        os.write(2, f"\ndeltatune: {signal.Signals(signum).name} received: training stops after this step, once "
                    f"a checkpoint is saved ({signal.Signals(signum).name} or Ctrl-C again aborts at once)\n".encode())


def _interrupted(signum: int, step: int, max_steps: int, checkpoint: Path | None) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    return TrainingInterrupted(f"training stopped by {name} after step {step} of {max_steps}, saved in {checkpoint}: "
                               "run the same command again with --resume to continue", exit_code=128 + signum)


def _numbers(indices: list[list[int]]) -> str:
    return ", ".join(str(i) for i in sorted({i for batch in indices for i in batch}))


def _non_finite_loss(loss: float, step: int, indices: list[list[int]], output_dir: Path) -> DeltatuneError:
    checkpoints = _checkpoints(output_dir)
    kept = f"{checkpoints[-1]} is the last good checkpoint" if checkpoints else "no checkpoint was written before it"
    return DeltatuneError(
        f"the loss at step {step} is {loss} (training examples {_numbers(indices)}, numbered from 0 in the training "
        f"set) and {kept}: check those examples and the learning rate, or set nan_policy=skip and run again with "
        "--resume to skip such steps")


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    # transformers 5 renamed the switch to activation_checkpointing_enable; older models and
    # wrappers only have gradient_checkpointing_enable.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise DeltatuneError(f"{type(model).__name__} cannot checkpoint gradients: turn gradient_checkpointing off")
    # transformers 5 also makes the embeddings' output require grad, which only reentrant
    # checkpoints need; left on, the backward runs through (and recomputes) every frozen layer.
    if hasattr(model, "_require_grads_hook") and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def _predicted_tokens(labels: torch.Tensor, model: nn.Module) -> int:
    """Targets the loss scores. Labels of shape [batch] (a classifier's): one per labelled example.
    Token labels of a decoder-only model shift left by one, so position 0 never counts; an
    encoder-decoder's labels are the decoder's own targets, every position scored."""
    if labels.ndim == 1:
        return int((labels != IGNORE_INDEX).sum())
    shifted = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return int((labels[:, 1 if shifted else 0:] != IGNORE_INDEX).sum())


def _accumulate_gradients(
    model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], device: torch.device, bf16: bool,
    runtime: Runtime,
) -> float:
    """Backpropagate the step's token-mean loss (over every process) through its micro-batches;
    return that loss. Each micro-batch's mean loss weighs by its share of the step's predicted
    tokens, times the number of replicas a gradient is averaged over."""
    counts = [_predicted_tokens(batch["labels"], model) for batch in micro_batches]
    total = max(1.0, runtime.all_sum(float(sum(counts))))
    loss_sum = 0.0
    for index, (batch, count) in enumerate(zip(micro_batches, counts)):
        with runtime.accumulating(model, last=index == len(micro_batches) - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model_loss(runtime.replica(model), {key: value.to(device) for key, value in batch.items()})
            (loss * (count / total * runtime.gradient_divisor)).backward()
        loss_sum += loss.item() * count
    return runtime.all_sum(loss_sum) / total


@torch.no_grad()
def evaluate(
    model: nn.Module, eval_examples: Sequence[dict[str, list[int]]], config: TrainConfig, pad_token_id: int,
    collate_fn: Callable[[Sequence[dict[str, Any]], int], dict[str, torch.Tensor]] = collate,
    runtime: Runtime | None = None,
) -> float:
    """Mean loss per predicted token over the first ``eval_batches`` batches (all when 0).

    Under several processes each takes its share of every batch, as in training, and the sums meet:
    W processes evaluate each example once between them. A process left without an example of a
    batch (its last, short one) runs the batch's first with weight 0, because FSDP2's forward is a
    meeting of every process."""
    runtime = runtime or Runtime()
    device = runtime.device or next(model.parameters()).device
    starts = range(0, len(eval_examples), config.batch_size)
    if config.eval_batches:
        starts = starts[: config.eval_batches]
    model.eval()
    loss_sum, token_count = 0.0, 0
    for start in starts:
        end = min(start + config.batch_size, len(eval_examples))
        share = list(range(start, end))[runtime.rank :: runtime.world_size]
        batch = collate_fn([eval_examples[i] for i in share or [start]], pad_token_id)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss = model_loss(model, {key: value.to(device) for key, value in batch.items()})
        if share:
            count = _predicted_tokens(batch["labels"], model)
            loss_sum, token_count = loss_sum + loss.item() * count, token_count + count
    runtime.release(model)
    model.train()
    return runtime.all_sum(loss_sum) / max(1, runtime.all_sum(token_count))


def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (unfinished ones are hidden temp folders)."""
    found = [path for path in output_dir.glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", path.name) and (path / "trainer_state.json").is_file()]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def _latest_checkpoint(output_dir: Path) -> Path:
    checkpoints = _checkpoints(output_dir)
    if not checkpoints:
        raise DeltatuneError(f"no checkpoint to resume from in {output_dir}: drop --resume to start a new run")
    return checkpoints[-1]


def file_fingerprint(path: str | os.PathLike) -> str:
    """A data file as one line: absolute path, size and the SHA-256 of its content (read in 1 MiB
    pieces, about a second per GB), so ``resume`` notices a file that was edited or swapped."""
    path = Path(path).resolve()
    if not path.is_file():
        return str(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return f"{path} ({path.stat().st_size} bytes, sha256 {digest.hexdigest()[:16]})"


def resume_checkpoint(output_dir: str | Path, config: TrainConfig,
                      run_settings: Mapping[str, Any] | None = None) -> Path | None:
    """The checkpoint that ``resume`` continues from: the newest complete one, once its
    ``trainer_state.json`` reads and every setting that changes the result matches this run (the
    ``TRAJECTORY_SETTINGS`` of ``config``, and ``run_settings`` where the checkpoint recorded them).
    None when the folder holds a run that stopped before its first checkpoint: it starts over."""
    output_dir = Path(output_dir)
    checkpoints = _checkpoints(output_dir)
    if not checkpoints:
        if output_dir.is_dir() and any(is_own_file(path) for path in output_dir.iterdir()):
            return None
        raise DeltatuneError(f"no checkpoint to resume from in {output_dir}: drop --resume to start a new run")
    checkpoint = checkpoints[-1]
    state = _trainer_state(checkpoint)
    defaults = asdict(TrainConfig())  # a checkpoint from before a setting existed ran with its default
    trained = {name: state["config"].get(name, defaults[name]) for name in TRAJECTORY_SETTINGS}
    now = {name: getattr(config, name) for name in TRAJECTORY_SETTINGS}
    if run_settings is not None and "run" in state:  # a setting one side does not know is not compared
        trained.update(_flattened(state["run"]))
        now.update(_flattened(_json_ready(run_settings)))
    for name, value in trained.items():
        if name in now and now[name] != value:
            raise DeltatuneError(f"{checkpoint} was trained with {name}={value!r} but this run has {now[name]!r}: "
                                 "resume with the same setting, or train in a new output folder")
    if config.max_steps < state["step"]:
        raise DeltatuneError(f"{checkpoint} is at step {state['step']}, past this run's max_steps={config.max_steps}: "
                             f"set max_steps to at least {state['step']} to continue it")
    return checkpoint


def stretched_schedule_note(checkpoint: str, state: Mapping[str, Any], config: TrainConfig) -> str | None:
    """What a resume with another max_steps than the checkpoint's run (its trainer ``state``) changes,
    when it changes anything: the warmup or decay of the learning rate is laid out over the new count
    from the next step on."""
    trained = state["config"].get("max_steps", config.max_steps)
    if trained == config.max_steps or config.lr_schedule == "constant":
        return None
    step = state["step"]
    factor = learning_rate_factor(step, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                                  schedule=config.lr_schedule)
    return (f"deltatune: {checkpoint} was trained towards max_steps={trained} and this run goes to "
            f"{config.max_steps}: the {config.lr_schedule} schedule continues as if laid out over {config.max_steps} "
            f"steps (step {step + 1} at {factor:.3g}× the learning rate), so the result differs from a run of "
            f"{config.max_steps} steps from the start (lr_schedule=constant would not)")


def _json_ready(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as trainer_state.json gives them back (tuples become lists)."""
    return json.loads(json.dumps(settings, default=str))


def _flattened(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _damaged(path: Path, problem: str) -> DeltatuneError:
    """A checkpoint file that cannot be used: the sentence names it and the checkpoint to go back to."""
    checkpoint = path.parent
    earlier = [other for other in _checkpoints(checkpoint.parent) if other != checkpoint]
    if earlier:
        fix = (f"move {checkpoint.name} out of {checkpoint.parent} and run again with --resume to continue from "
               f"{earlier[-1].name}")
    else:
        fix = "no earlier checkpoint is left, so start over in a new output folder (or with --overwrite)"
    return DeltatuneError(f"{path} {problem}: {fix}")


def _trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON
        raise _damaged(path, "is not readable JSON") from None
    step = state.get("step") if isinstance(state, dict) else None
    if (not isinstance(state, dict) or not isinstance(step, int) or isinstance(step, bool)
            or f"checkpoint-{step}" != checkpoint.name or not isinstance(state.get("config"), dict)
            or not isinstance(state.get("run", {}), dict) or not isinstance(state.get("skipped_steps", 0), int)
            or not (isinstance(state.get("shards", []), list) and all(isinstance(name, str) and "/" not in name
                                                                    and name not in ("", ".", "..")
                                                                    for name in state.get("shards", [])))):
        raise _damaged(path, f"is not the trainer state of {checkpoint.name} (an object with its step and config)")
    return state


def _save_checkpoint(model, trainable, optimizer, scheduler, config, step, output_dir, save_model,
                     runtime: Runtime, extra_state: Mapping[str, Any] | None = None) -> Path:
    """Write ``checkpoint-{step}`` as one rename of a finished folder, then drop the oldest beyond
    ``save_total_limit``. A full disk or a permission error is one sentence: the earlier checkpoints
    are untouched. ``extra_state`` joins trainer_state.json (skipped steps, the run's settings).

    Every process takes part. The trained weights and the optimizer's state are whole tensors that the
    main process writes (``trainable.safetensors``, ``optimizer.pt``), or, where the runtime keeps them
    in shards (FSDP2), each process writes its own shards into ``shards/`` at once
    (``deltatune.sharded_state``) and ``optimizer.pt`` keeps the rest of the state."""
    target = output_dir / f"checkpoint-{step}"
    sharded = runtime.sharded_checkpoints
    weights = {} if sharded else runtime.gather(trainable)  # every process takes part; the main one writes
    optimizer_state = _without_moments(optimizer) if sharded else runtime.optimizer_state(optimizer)
    random_states = runtime.gather_objects(_random_state())  # dropout's stream differs by process
    with (write_failure_as_error(target, output_dir) if runtime.is_main else nullcontext(),
          atomic_directory(target) if runtime.is_main else nullcontext() as staging):
        if sharded:
            from deltatune.sharded_state import save_shards, shard_files

            staging = Path(runtime.broadcast(None if staging is None else str(staging)))  # one folder, every writer
            with runtime.meeting("writing the checkpoint's shards"):
                save_shards(staging, trainable, optimizer)
        with runtime.whole(model):  # FSDP2: every process gathers the weights that the main one writes
            if runtime.is_main:
                save_model(model, staging)
        if runtime.is_main:
            if not sharded:
                save_file(weights, str(staging / "trainable.safetensors"))
            with (staging / "optimizer.pt").open("wb") as file:  # through Python's file: a full disk is an OSError
                torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, file)
            with (staging / "rng.pt").open("wb") as file:  # process 0's at the top, as one process saves it
                torch.save({**random_states[0], "ranks": [_torch_random_state(state) for state in random_states]},
                           file)
            state = {"step": step, "config": asdict(config), **(extra_state or {})}
            if sharded:  # every process's file, so that one gone missing is noticed
                state["shards"] = shard_files(staging)
            (staging / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        runtime.barrier()  # every shard is written before the main process renames the folder
    if runtime.is_main:
        for old in _checkpoints(output_dir)[:-config.save_total_limit]:
            if old != target:  # the one just written always stays
                remove_tree(old)
    runtime.barrier()
    return target


def _without_moments(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state less its per-parameter tensors (saved in shards): its hyper-parameters."""
    state = optimizer.state_dict()
    return {"state": {}, "param_groups": state["param_groups"]}


@contextmanager
def write_failure_as_error(path: Path, output_dir: Path) -> Iterator[None]:
    """Turn a failed write of ``path`` (a full disk, a read-only folder) into one sentence that says
    which checkpoint of ``output_dir`` is kept; other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        if not _is_write_failure(error):
            raise
        checkpoints = [other for other in _checkpoints(output_dir) if other != path]
        kept = f"{checkpoints[-1]} is kept" if checkpoints else "no checkpoint was written yet"
        raise DeltatuneError(f"could not write {path} ({_write_failure(error)}) and {kept}: free disk space or "
                             f"allow writing to {output_dir}, then run again with --resume") from None


def _is_write_failure(error: BaseException) -> bool:
    """An OSError, or the same failure as safetensors or torch's zip writer report it."""
    text = str(error)
    return (isinstance(error, OSError) or (isinstance(error, SafetensorError) and "I/O error" in text)
            or (isinstance(error, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text)))


def _write_failure(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return re.sub(r" \(os error \d+\)$", "", str(error).splitlines()[0].split("I/O error: ")[-1])[:200]


def _append_metrics(metrics_path: Path, record: Mapping[str, Any], output_dir: Path) -> None:
    with write_failure_as_error(metrics_path, output_dir), metrics_path.open("a", encoding="utf-8") as metrics:
        metrics.write(json.dumps(record) + "\n")


def _random_state() -> dict[str, Any]:
    """Every random generator a step may draw from: torch's (dropout), CUDA's, Python's and NumPy's."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))}


def _torch_random_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The generators of ``state`` that differ by process: torch's on the CPU and on each GPU (dropout)."""
    return {"cpu": state["cpu"], "cuda": state["cuda"]}


def _set_random_state(state: Mapping[str, Any], rank: int = 0, reseed: int = 0) -> None:
    """Restore ``state`` (``_random_state``, plus the per-process generators under ``ranks``) in process
    ``rank``. A process the saving run did not have seeds torch's generator with ``reseed + rank``."""
    ranks = state.get("ranks") or [state]  # checkpoints from before processes kept their own hold one
    if rank < len(ranks):
        torch.set_rng_state(ranks[rank]["cpu"])
        if ranks[rank].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ranks[rank]["cuda"])
    else:
        torch.manual_seed(reseed + rank)
    if "python" in state:  # checkpoints from before these were saved hold torch's only
        random.setstate(state["python"])
    if "numpy" in state:
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))


def _load_checkpoint(checkpoint: Path, trainable, optimizer, scheduler, config: TrainConfig,
                     runtime: Runtime | None = None) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and RNG from ``checkpoint``; return its trainer state. The
    files hold whole tensors, or shards (``shards/``, written by the processes of an FSDP2 run); either
    is laid out as this process holds its parameters (a shard each under FSDP2), whatever the world
    size that wrote it. Every file is read and checked before anything is restored: a truncated,
    missing or foreign file is one sentence naming it and the earlier checkpoint to continue from."""
    runtime = runtime or Runtime()
    state = _trainer_state(checkpoint)

    def read(name: str, load: Callable[[Path], Any]) -> Any:
        path = checkpoint / name
        if not (path.is_dir() if name == SHARDS else path.is_file()):
            raise _damaged(path, "is missing")
        try:
            return load(path)
        except Exception:  # whatever the parser trips on, the file is not what a checkpoint holds
            raise _damaged(path, "is truncated or damaged") from None

    sharded = (checkpoint / SHARDS).is_dir()
    if sharded:
        from deltatune.sharded_state import DamagedShards, saved_shapes

        try:
            shapes = saved_shapes(checkpoint, state.get("shards"))
        except DamagedShards as damage:
            raise _damaged(damage.path, damage.problem) from None
    else:
        full = read("trainable.safetensors", lambda path: load_file(str(path)))
        shapes = {name: tuple(tensor.shape) for name, tensor in full.items()}
    states = read("optimizer.pt", lambda path: torch.load(path, weights_only=True))
    rng = read("rng.pt", lambda path: torch.load(path, weights_only=True))
    if not (isinstance(states, dict) and isinstance(states.get("optimizer"), dict)
            and isinstance(states.get("scheduler"), dict)):
        raise _damaged(checkpoint / "optimizer.pt", "does not hold the optimizer and schedule state")
    if not (isinstance(rng, dict) and isinstance(rng.get("cpu"), torch.Tensor)
            and all(isinstance(one, dict) and isinstance(one.get("cpu"), torch.Tensor)
                    for one in rng.get("ranks", []))):
        raise _damaged(checkpoint / "rng.pt", "does not hold the random generators' state")
    fix = "resume with the same method settings"
    missing, extra = sorted(trainable.keys() - shapes.keys()), sorted(shapes.keys() - trainable.keys())
    if missing:
        raise DeltatuneError(f"{checkpoint} has no weights for trainable parameter {missing[0]}: {fix}")
    if extra:
        raise DeltatuneError(f"{checkpoint} holds {extra[0]}, which is not trainable in this model: {fix}")
    for name, parameter in trainable.items():
        if tuple(shapes[name]) != tuple(parameter.shape):
            raise DeltatuneError(
                f"{checkpoint} holds {name} with shape {tuple(shapes[name])} but the model has "
                f"{tuple(parameter.shape)}: {fix}"
            )
    if sharded:
        from deltatune.sharded_state import load_shards

        with runtime.meeting("reading the checkpoint's shards"):
            weights, moments = read(SHARDS, lambda path: load_shards(checkpoint, trainable))
        optimizer_state = _with_moments(states["optimizer"], moments, optimizer, trainable)
    else:
        weights = runtime.distribute(trainable, full)
        optimizer_state = states["optimizer"]
    try:
        (optimizer.load_state_dict if sharded else partial(runtime.load_optimizer_state, optimizer))(optimizer_state)
        scheduler.load_state_dict(states["scheduler"])
    except Exception:
        raise _damaged(checkpoint / "optimizer.pt", "does not fit this run's trainable parameters") from None
    if scheduler.last_epoch != state["step"] or not _optimizer_state_fits(optimizer):
        raise _damaged(checkpoint / "optimizer.pt", f"does not hold the state of step {state['step']} of this run")
    # the learning rate of the next step, from this run's schedule (which a larger max_steps stretches)
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(weights[name])
    try:
        _set_random_state(rng, runtime.rank, reseed=config.seed + state["step"] * LARGEST_SEED)
    except Exception:
        raise _damaged(checkpoint / "rng.pt", "does not hold the random generators' state") from None
    return state


def _with_moments(optimizer_state: Mapping[str, Any], moments: Mapping[str, Mapping[str, torch.Tensor]],
                  optimizer: torch.optim.Optimizer, trainable: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """An optimizer state dict: the saved hyper-parameters with the moments read from shards, numbered
    as ``optimizer.state_dict`` numbers the parameters."""
    name_of = {id(param): name for name, param in trainable.items()}
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state = {index: dict(moments[name_of[id(param)]]) for index, param in enumerate(params)
             if name_of[id(param)] in moments}
    return {"state": state, "param_groups": optimizer_state["param_groups"]}


def _optimizer_state_fits(optimizer: torch.optim.Optimizer) -> bool:
    """Every per-parameter tensor of the optimizer's state (AdamW's moments) has its parameter's shape."""
    return all(not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape == parameter.shape
               for group in optimizer.param_groups for parameter in group["params"]
               for value in optimizer.state.get(parameter, {}).values())


def _keep_metrics_up_to(metrics_path: Path, step: int) -> None:
    """Start metrics afresh, or on resume drop lines logged after the checkpoint's step (and a last
    line cut short by a crash)."""
    kept = []
    if step and metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                logged = json.loads(line)["step"]
            except (ValueError, TypeError, KeyError):
                continue
            if isinstance(logged, int) and logged <= step:
                kept.append(line + "\n")
    atomic_write_text(metrics_path, "".join(kept))
