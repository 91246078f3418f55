"""One training loop for every method: it trains whatever parameters require grad.

The loop never asks which method made the model. LoRA, prompt tuning and full fine-tuning
differ only in which parameters have ``requires_grad=True``; the optimizer sees those and
nothing else. A step is ``gradient_accumulation_steps`` micro-batches of ``batch_size``
examples; each micro-batch's mean loss is weighted by its share of the step's predicted
tokens, so accumulating 2 x 4 computes the same update as one batch of 8.

Checkpoints (``output_dir/checkpoint-{step}/``, newest two kept) hold everything needed to
continue bit-exactly: trainable weights, optimizer and schedule state, and the RNG state.
The batch order is a function of the step number (see ``deltatune.data.batch_indices``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from deltatune.atomic import atomic_directory, atomic_write_text
from deltatune.data import IGNORE_INDEX, batch_indices, collate
from deltatune.errors import DeltatuneError
from deltatune.memory import PeakMemory
from deltatune.runtime import Runtime
from deltatune.validation import require_bool, require_choice, require_int, require_number, require_positive_int

LR_SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINTS_KEPT = 2
# Settings that change which batches are seen or how weights move; resume needs them unchanged.
TRAJECTORY_SETTINGS = (
    "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
    "warmup_steps", "lr_schedule", "max_grad_norm", "seed", "bf16", "group_by_length",
)


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
    log_every: int = 10
    max_length: int = 512

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "max_length"):
            require_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "seed"):
            require_int(name, getattr(self, name), minimum=0)
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            require_number(name, getattr(self, name), minimum=0)
        if self.learning_rate == 0:
            raise DeltatuneError("learning_rate is 0, so nothing would be learned: set it above 0, e.g. 2e-4")
        if self.warmup_steps > self.max_steps:
            raise DeltatuneError(
                f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps}): lower warmup_steps"
            )
        require_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("bf16", "gradient_checkpointing", "group_by_length"):
            require_bool(name, getattr(self, name))


@dataclass
class TrainResult:
    step: int
    train_loss: float  # loss of the last step run (nan when resuming a finished run)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean eval loss per token)
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0  # wall time of the steps this call ran (evaluations before its last step included)
    checkpoint: Path | None = None  # the final checkpoint folder
    model: nn.Module | None = None  # the trained model (set by the runner)


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
) -> TrainResult:
    """Train the ``requires_grad`` parameters of ``model`` on tokenized examples.

    ``collate_fn(examples, pad_token_id)`` makes a batch of tensors (default: token labels,
    ``deltatune.data.collate``; a classifier's labels are one per example, [batch]).

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
    device = runtime.place(model)
    torch.manual_seed(config.seed)
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

    start_step = 0
    if resume:
        start_step = _load_checkpoint(_latest_checkpoint(output_dir), trainable, optimizer, scheduler, config)
    elif _checkpoints(output_dir):
        raise DeltatuneError(f"{output_dir} already holds checkpoints: pass --resume or pick a new output folder")
    metrics_path = output_dir / "metrics.jsonl"
    if runtime.is_main:
        _keep_metrics_up_to(metrics_path, start_step)
    peak_memory = PeakMemory(device) if device.type in ("cpu", "cuda") else None

    accumulation = config.gradient_accumulation_steps
    lengths = [len(example["input_ids"]) for example in train_examples] if config.group_by_length else None
    batches = batch_indices(len(train_examples), config.batch_size, config.seed,
                            start_batch=start_step * accumulation, lengths=lengths)
    result = TrainResult(step=start_step, train_loss=math.nan)
    if start_step == 0 and eval_examples:  # the starting point, so every run's log shows its gain
        result.eval_losses.append((0, evaluate(model, eval_examples, config, pad_token_id, collate_fn)))
        if runtime.is_main:
            with metrics_path.open("a", encoding="utf-8") as metrics:
                metrics.write(json.dumps({"step": 0, "eval_loss": result.eval_losses[0][1]}) + "\n")
    tokens_seen, started = 0, time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=start_step, disable=not (progress and runtime.is_main), desc="training")
    model.train()
    for step in range(start_step + 1, config.max_steps + 1):
        micro_batches = [collate_fn([train_examples[i] for i in runtime.shard(next(batches))], pad_token_id)
                         for _ in range(accumulation)]
        learning_rate = optimizer.param_groups[0]["lr"]
        loss = _accumulate_gradients(model, micro_batches, device, config.bf16, runtime)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable.values(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        tokens_seen += int(runtime.all_sum(sum(int(batch["attention_mask"].sum()) for batch in micro_batches)))
        elapsed = time.perf_counter() - started
        tokens_per_s = tokens_seen / elapsed
        result.step, result.train_loss, result.tokens_per_s, result.train_seconds = step, loss, tokens_per_s, elapsed
        record: dict[str, Any] = {"step": step, "loss": loss, "lr": learning_rate, "tokens_per_s": tokens_per_s}
        final = step == config.max_steps
        if eval_examples and (final or (config.eval_every and step % config.eval_every == 0)):
            record["eval_loss"] = evaluate(model, eval_examples, config, pad_token_id, collate_fn)
            result.eval_losses.append((step, record["eval_loss"]))
        if runtime.is_main and (final or "eval_loss" in record or step % config.log_every == 0):
            if peak_memory is not None:
                record.update(peak_memory.as_mib())
            with metrics_path.open("a", encoding="utf-8") as metrics:
                metrics.write(json.dumps(record) + "\n")
        if final or (config.save_every and step % config.save_every == 0):
            result.checkpoint = _save_checkpoint(
                model, trainable, optimizer, scheduler, config, step, output_dir, save_model, runtime)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{tokens_per_s:.0f}")
    bar.close()
    if result.checkpoint is None:  # resumed a run that had already finished
        result.checkpoint = _latest_checkpoint(output_dir)
    return result


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
                loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
            (loss * (count / total * runtime.gradient_divisor)).backward()
        loss_sum += loss.item() * count
    return runtime.all_sum(loss_sum) / total


@torch.no_grad()
def evaluate(
    model: nn.Module, eval_examples: Sequence[dict[str, list[int]]], config: TrainConfig, pad_token_id: int,
    collate_fn: Callable[[Sequence[dict[str, Any]], int], dict[str, torch.Tensor]] = collate,
) -> float:
    """Mean loss per predicted token over the first ``eval_batches`` batches (all when 0)."""
    device = next(model.parameters()).device
    starts = range(0, len(eval_examples), config.batch_size)
    if config.eval_batches:
        starts = starts[: config.eval_batches]
    model.eval()
    loss_sum, token_count = 0.0, 0
    for start in starts:
        batch = collate_fn(eval_examples[start : start + config.batch_size], pad_token_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
        count = _predicted_tokens(batch["labels"], model)
        loss_sum, token_count = loss_sum + loss.item() * count, token_count + count
    model.train()
    return loss_sum / max(1, token_count)


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


def _save_checkpoint(model, trainable, optimizer, scheduler, config, step, output_dir, save_model,
                     runtime: Runtime) -> Path:
    target = output_dir / f"checkpoint-{step}"
    weights = runtime.gather(trainable)  # every process takes part; the main one writes
    if not runtime.is_main:
        runtime.barrier()
        return target
    with atomic_directory(target) as staging:
        save_model(model, staging)
        save_file(weights, str(staging / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, staging / "optimizer.pt")
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        torch.save({"cpu": torch.get_rng_state(), "cuda": cuda_rng}, staging / "rng.pt")
        state = {"step": step, "config": asdict(config)}
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    for old in _checkpoints(output_dir)[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old)
    runtime.barrier()
    return target


def _load_checkpoint(checkpoint: Path, trainable, optimizer, scheduler, config: TrainConfig) -> int:
    """Restore weights, optimizer, schedule and RNG from ``checkpoint``; return its step."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    defaults = asdict(TrainConfig())  # a checkpoint from before a setting existed ran with its default
    for name in TRAJECTORY_SETTINGS:
        if state["config"].get(name, defaults[name]) != getattr(config, name):
            raise DeltatuneError(
                f"{checkpoint} was trained with {name}={state['config'].get(name, defaults[name])!r} but this run has "
                f"{getattr(config, name)!r}: resume with the same setting or start a new output folder"
            )
    weights = load_file(str(checkpoint / "trainable.safetensors"))
    fix = "resume with the same method settings"
    missing, extra = sorted(trainable.keys() - weights.keys()), sorted(weights.keys() - trainable.keys())
    if missing:
        raise DeltatuneError(f"{checkpoint} has no weights for trainable parameter {missing[0]}: {fix}")
    if extra:
        raise DeltatuneError(f"{checkpoint} holds {extra[0]}, which is not trainable in this model: {fix}")
    with torch.no_grad():
        for name, parameter in trainable.items():
            if weights[name].shape != parameter.shape:
                raise DeltatuneError(
                    f"{checkpoint} holds {name} with shape {tuple(weights[name].shape)} but the model has "
                    f"{tuple(parameter.shape)}: {fix}"
                )
            parameter.copy_(weights[name])
    states = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rng = torch.load(checkpoint / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]


def _keep_metrics_up_to(metrics_path: Path, step: int) -> None:
    """Start metrics afresh, or on resume drop lines logged after the checkpoint's step."""
    kept = []
    if step and metrics_path.is_file():
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [line + "\n" for line in lines if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(metrics_path, "".join(kept))
