"""``deltatune compare``: every method on one task, with the same step budget, seed and data order.

For each method the comparison trains a run exactly as ``deltatune train`` would (the method's own
training defaults apply, e.g. full fine-tuning's lower learning rate), each in a fresh Python
process, so that one method's crash, its memory high-water mark or its leftovers cannot touch
the next. A run that fails is recorded with its error and the comparison goes on; a method that
refuses the model (prompt tuning on T5, say) is listed with its one-sentence reason. When LoRA and
QLoRA are both compared and neither is given ``targets``, LoRA takes QLoRA's (every linear layer),
so that the pair differs only in the quantised base.

What is measured for each method (``results.json`` holds all of it, ``report.html`` plots it):

- trainable parameters, and their share of the wrapped model's parameters (the base plus what the method adds);
- step memory: the bytes one training step holds — parameters, gradients, AdamW state and the
  activations autograd saved — counted tensor by tensor (``deltatune.memory``), so the figure is
  the same on every run and machine; and the process's peak resident memory, which on CPU
  includes Python and its libraries;
- seconds per step and tokens per second over the training steps;
- the held-out loss before and after training, perplexity, and whatever task metrics apply;
- the size on disk of what the method saves (adapter files, or a whole model folder).

The parent process only launches, collects and writes: ``python -m deltatune.compare SPEC RESULT``
is the per-method worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

from deltatune.atomic import atomic_write_text, check_output_folder
from deltatune.errors import DeltatuneError

# The methods compared by default, in the order of the seed's table: the references first.
COMPARED_METHODS = ("full", "freeze", "lora", "qlora", "adapter", "prefix", "prompt", "ptuning", "ptuning-v2")
RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"
# The shared budget on bundled defaults: all nine methods in well under 5 minutes on 2 CPU cores.
BUNDLED_TRAIN = {"max_steps": 80, "batch_size": 16, "max_length": 384, "seed": 0}
# Settings every compared run gets: the log keeps every step's loss (the report's curves) and the
# held-out loss is taken before and after training only, so no evaluation falls inside the timing.
COMPARE_TRAIN = {"log_every": 1, "eval_every": 0, "save_every": 0}
EVAL_EXAMPLES = 64  # held-out examples scored with the task's metric (generation is the slow part)
MAX_NEW_TOKENS = 64
PARENT_VARIABLE = "DELTATUNE_COMPARE_PARENT"  # the worker ends if this process is not its parent any more
SAMPLES = 3  # held-out generations kept per method (results.json, report.html)


def bundled_settings() -> dict[str, Any]:
    from deltatune.pretrained import bundled

    return {"model": str(bundled("stories260K")), "data": str(bundled("e2e/train.jsonl")),
            "eval_data": str(bundled("e2e/eval.jsonl")), "output": "runs/compare", "train": dict(BUNDLED_TRAIN)}


def split_method_options(overrides: Mapping[str, Any], methods: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict]]:
    """``lora.rank=16`` goes to the lora run only; every other ``key=value`` is shared by every run."""
    shared: dict[str, Any] = {}
    per_method: dict[str, dict] = {name: {} for name in methods}
    for key, value in overrides.items():
        prefix, dot, rest = key.partition(".")
        if dot and prefix in per_method:
            per_method[prefix][rest] = value
        elif dot and prefix not in ("method", "train"):
            raise DeltatuneError(f"{key!r} names method {prefix!r}, which this comparison does not run; "
                                 f"compare runs {', '.join(methods)}.")
        else:
            shared[key] = value
    return shared, per_method


def parse_methods(text: str | None) -> list[str]:
    from deltatune.methods import METHODS

    if not text:
        return list(COMPARED_METHODS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS and name not in COMPARED_METHODS]
    if unknown or not names:
        raise DeltatuneError(f"--methods names {unknown[0] if unknown else 'nothing'!r}; choose from "
                             f"{', '.join(dict.fromkeys([*COMPARED_METHODS, *METHODS]))} (comma-separated).")
    if len(set(names)) < len(names):
        raise DeltatuneError(f"--methods names a method twice ({text}); list each once.")
    return names


def run_specs(settings: Mapping[str, Any], methods: Sequence[str], per_method: Mapping[str, Mapping[str, Any]],
              output: Path) -> list[dict[str, Any]]:
    """One settings mapping per method, each as ``deltatune train`` would read it; validated here,
    so a typo stops the comparison before anything trains."""
    from deltatune.config import build_run, merge_settings
    from deltatune.methods import METHODS

    per_method = {name: dict(per_method.get(name, {})) for name in methods}
    if {"lora", "qlora"} <= set(methods) and not ({"targets"} & (per_method["lora"].keys() | per_method["qlora"].keys())):
        # QLoRA's default (the paper's) adapts every linear layer; LoRA's, the architecture's
        # attention layers. Side by side, the pair should differ only in the quantised base.
        from deltatune.methods import METHODS as registry

        per_method["lora"]["targets"] = registry["qlora"]().targets
    specs = []
    for name in methods:
        if name not in METHODS:
            specs.append({"method": name, "unavailable": f"this deltatune has no {name!r} method yet"})
            continue
        merged = merge_settings(settings, {"method": {"name": name, **per_method.get(name, {})}},
                                {"train": COMPARE_TRAIN, "output": str(output / name)})
        build_run(merged)  # refuses bad settings now, with the method's name in view
        specs.append({"method": name, "settings": merged})
    return specs


def compare(settings: Mapping[str, Any], methods: Sequence[str], per_method: Mapping[str, Mapping[str, Any]],
            *, overwrite: bool = False, progress: bool = True, eval_examples: int = EVAL_EXAMPLES,
            max_new_tokens: int = MAX_NEW_TOKENS, log=print) -> list[dict[str, Any]]:
    """Train every method in ``methods`` on ``settings`` one after another; write ``results.json``
    and ``report.html`` into ``settings['output']``; return one result per method."""
    output = Path(str(settings.get("output") or "runs/compare"))
    check_output_folder(output, overwrite=overwrite, reads=tuple(str(settings[key]) for key in ("model", "data")
                                                                  if settings.get(key)))
    specs = run_specs({**settings, "output": str(output)}, methods, per_method, output)
    output.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    header_shown = False
    trainable_specs = [spec for spec in specs if "settings" in spec]
    if eval_examples > 0 and trainable_specs:  # the untrained model first: what every row is read against
        specs = [{"method": "base", "settings": trainable_specs[0]["settings"], "base_only": True}, *specs]
    for number, spec in enumerate(specs, 1):
        log(f"[{number}/{len(specs)}] {spec['method']}")
        if "unavailable" in spec:
            result = {"method": spec["method"], "status": "unavailable", "reason": spec["unavailable"]}
        else:
            result = _run_in_child({**spec, "eval_examples": eval_examples, "max_new_tokens": max_new_tokens},
                                   overwrite=overwrite, progress=progress)
        results.append(result)
        if not header_shown:
            log(table_header())
            header_shown = True
        log(table_row(result))
        _write_results(output, settings, results)
    from deltatune.report import write_report

    write_report(output / REPORT_NAME, results, _describe_task(settings))
    log(f"\n{output / RESULTS_NAME}\n{output / REPORT_NAME}")
    return results


def _describe_task(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {key: settings.get(key) for key in ("model", "data", "eval_data", "task") if settings.get(key) is not None} | {
        "train": dict(settings.get("train", {}))}


def _write_results(output: Path, settings: Mapping[str, Any], results: list[dict[str, Any]]) -> None:
    document = {"task": _describe_task(settings), "results": results}
    atomic_write_text(output / RESULTS_NAME, json.dumps(document, indent=2, default=str) + "\n")


def _run_in_child(spec: dict[str, Any], *, overwrite: bool, progress: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="deltatune-compare-") as scratch:
        spec_path, result_path = Path(scratch) / "spec.json", Path(scratch) / "result.json"
        spec_path.write_text(json.dumps({**spec, "overwrite": overwrite, "progress": progress}), encoding="utf-8")
        started = time.perf_counter()
        finished = subprocess.run([sys.executable, "-m", "deltatune.compare", str(spec_path), str(result_path)],
                                  env={**os.environ, PARENT_VARIABLE: str(os.getpid())})
        if result_path.is_file():
            result = json.loads(result_path.read_text(encoding="utf-8"))
        else:
            result = {"method": spec["method"], "status": "failed",
                      "reason": f"the run's process ended with exit status {finished.returncode} and no result"}
        result["wall_seconds"] = time.perf_counter() - started
        return result


# --- the table ----------------------------------------------------------------------------
COLUMNS = (("method", 11), ("trainable", 10), ("%", 7), ("step MiB", 9), ("peak RSS", 9), ("s/step", 7),
           ("tok/s", 7), ("eval loss", 14), ("metric", 16), ("on disk", 9))


def table_header() -> str:
    return "  ".join(f"{name:>{width}}" if index else f"{name:<{width}}"
                     for index, (name, width) in enumerate(COLUMNS))


def table_row(result: Mapping[str, Any]) -> str:
    if result.get("status") == "reference":
        metric = headline_metric(result)
        loss = f"{result['eval_loss']:.3f}" if result.get("eval_loss") is not None else "-"
        return (f"{'base':<11}  {'(untrained)':>10}  {'':>7}  {'':>9}  {'':>9}  {'':>7}  {'':>7}  {loss:>14}  "
                f"{(f'{metric[0]} {metric[1]:.4g}' if metric else '-'):>16}")
    if result.get("status") != "ok":
        return f"{result['method']:<11}  {result.get('status')}: {result.get('reason', '')}"
    metric = headline_metric(result)
    cells = [
        result["method"], f"{result['trainable_parameters']:,}", f"{result['trainable_percent']:.3g}",
        f"{result['step_memory_mib']['total']:.1f}", _mib(result.get("peak_rss_mib")),
        f"{result['seconds_per_step']:.3f}", f"{result['tokens_per_s']:,.0f}",
        f"{result['eval_loss_start']:.3f}→{result['eval_loss']:.3f}" if result.get("eval_loss") is not None else "-",
        f"{metric[0]} {metric[1]:.4g}" if metric else "-", _size(result["artifact_bytes"]),
    ]
    return "  ".join(f"{cell:>{width}}" if index else f"{cell:<{width}}"
                     for index, (cell, (_, width)) in enumerate(zip(cells, COLUMNS)))


METRIC_PREFERENCE = ("accuracy", "bleu", "rouge_l", "f1", "perplexity")


def headline_metric(result: Mapping[str, Any]) -> tuple[str, float] | None:
    """The validation metric the table shows: the task's own first, perplexity otherwise."""
    metrics = result.get("metrics") or {}
    for name in METRIC_PREFERENCE:
        if metrics.get(name) is not None:
            return name, float(metrics[name])
    return None


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


# --- the per-method worker ------------------------------------------------------------------
def measure_run(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Train one method as ``deltatune train`` would and measure it (runs in the worker process)."""
    import torch

    import deltatune as dt
    from deltatune.config import build_run
    from deltatune.memory import PeakMemory
    from deltatune.runner import run_batches, run_training

    run = build_run(spec["settings"])
    result = run_training(run, progress=spec.get("progress", True), overwrite=spec.get("overwrite", False))
    model = result.model
    trainable, total = dt.trainable_parameters(model)
    with tempfile.TemporaryDirectory(prefix="deltatune-size-") as scratch:
        dt.save(model, scratch)
        artifact_bytes = sum(path.stat().st_size for path in Path(scratch).rglob("*") if path.is_file())
    peak_rss = PeakMemory("cpu").as_mib()["cpu_peak_rss_mib"]
    with contextlib.redirect_stdout(io.StringIO()):  # the data's warnings were shown once, by the run
        batch = run_batches(run, count=1)[0]
    step_memory = _count_step_memory(model, batch, run.train.bf16)
    eval_start = result.eval_losses[0][1] if result.eval_losses else None
    eval_end = result.eval_losses[-1][1] if result.eval_losses else None
    metrics = {"loss": eval_end, "perplexity": _perplexity(eval_end)} if eval_end is not None else {}
    with torch.no_grad():
        quality, samples = held_out_metrics(run, model, limit=spec.get("eval_examples", EVAL_EXAMPLES),
                                            max_new_tokens=spec.get("max_new_tokens", MAX_NEW_TOKENS))
    metrics.update(quality)
    losses = [json.loads(line) for line in (Path(run.output) / "metrics.jsonl").read_text().splitlines() if line]
    torch.set_grad_enabled(True)
    return {
        "method": run.method_name, "status": "ok", "settings": run.as_settings()["method"],
        "learning_rate": run.train.learning_rate,
        "trainable_parameters": trainable, "total_parameters": total, "trainable_percent": 100 * trainable / total,
        "step_memory_mib": step_memory, "peak_rss_mib": peak_rss,
        "steps": result.step, "seconds_per_step": result.train_seconds / max(1, result.step),
        "tokens_per_s": result.tokens_per_s,
        "eval_loss_start": eval_start, "eval_loss": eval_end, "metrics": metrics,
        "artifact_bytes": artifact_bytes, "output": run.output, "samples": samples,
        "loss_curve": [[record["step"], record["loss"]] for record in losses if "loss" in record],
    }


def held_out_metrics(run, model, *, limit: int, max_new_tokens: int) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The task's own metrics on (at most ``limit`` of) the held-out items, and a few samples.

    BLEU and ROUGE-L of greedy generations for prompt/completion data (the examples sharing a
    prompt are one item with several references; Chinese is scored by characters), accuracy and
    macro F1 for a classifier, BLEU and ROUGE-L for a seq2seq model."""
    from deltatune.data import load_examples, split_examples
    from deltatune.evaluation import classification_metrics, generate_for_examples, generation_metrics
    from deltatune.pretrained import load_tokenizer, pad_token_id
    from deltatune.runner import run_data, run_task

    if limit <= 0:
        return {}, []
    model.eval()
    tokenizer = load_tokenizer(run.model, run.trust_remote_code)
    task = run_task(run)
    if task == "causal-lm":
        examples = (load_examples(run.eval_data) if run.eval_data else
                    split_examples(load_examples(run.data), run.eval_fraction, run.train.seed)[1])
        if all(not example.prompt and example.messages is None for example in examples):
            return {}, []  # plain text: the held-out loss is the measure
        prompts = list(dict.fromkeys(example.prompt for example in examples))[:limit]  # E2E: an MR's texts are one item
        kept = set(prompts)
        hypotheses, references = generate_for_examples(
            model, tokenizer, [example for example in examples if example.prompt in kept],
            max_new_tokens=max_new_tokens, batch_size=run.train.batch_size)
        samples = [{"prompt": prompt, "output": output, "reference": refs[0]}
                   for prompt, output, refs in zip(prompts[:SAMPLES], hypotheses, references)]
        return generation_metrics(hypotheses, references) | {"scored_examples": len(hypotheses)}, samples
    if task == "classification":
        data = run_data(run, tokenizer, task)
        predicted, gold = [], []
        for start in range(0, min(limit, len(data.eval)), run.train.batch_size):
            batch = data.collate(data.eval[start:min(limit, start + run.train.batch_size)], pad_token_id(tokenizer))
            device = next(model.parameters()).device
            logits = model(**{key: value.to(device) for key, value in batch.items() if key != "labels"}).logits
            predicted += logits.argmax(-1).tolist()
            gold += batch["labels"].tolist()
        return classification_metrics(predicted, gold) | {"scored_examples": len(gold)}, []
    if task == "seq2seq":
        from deltatune.evaluation import evaluate_seq2seq
        from deltatune.task_data import load_seq2seq_records

        records = (load_seq2seq_records(run.eval_data, run.columns) if run.eval_data else
                   split_examples(load_seq2seq_records(run.data, run.columns), run.eval_fraction, run.train.seed)[1])
        scored = evaluate_seq2seq(model, tokenizer, records[:limit], max_new_tokens=max_new_tokens,
                                  batch_size=run.train.batch_size, max_length=run.train.max_length)
        return {key: scored[key] for key in ("bleu", "rouge_l")} | {"scored_examples": scored["examples"]}, []
    return {}, []


def measure_base(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The untrained model on the same held-out data: the row every method is read against."""
    import torch

    from deltatune.config import build_run
    from deltatune.pretrained import load_model, load_tokenizer, pad_token_id
    from deltatune.runner import run_data, run_task
    from deltatune.train import evaluate

    run = build_run(spec["settings"])
    tokenizer = load_tokenizer(run.model, run.trust_remote_code)
    task = run_task(run)
    with contextlib.redirect_stdout(io.StringIO()):  # the data's warnings are shown by the runs
        data = run_data(run, tokenizer, task)
    torch.manual_seed(run.train.seed)  # a classifier's fresh head: the same one every run starts from
    model = load_model(run.model, task, run.dtype, run.trust_remote_code, labels=data.labels,
                       pad_token_id=pad_token_id(tokenizer))
    with torch.no_grad():
        loss = evaluate(model, data.eval, run.train, pad_token_id(tokenizer), collate_fn=data.collate) if data.eval else None
        quality, samples = held_out_metrics(run, model, limit=spec.get("eval_examples", EVAL_EXAMPLES),
                                            max_new_tokens=spec.get("max_new_tokens", MAX_NEW_TOKENS))
    metrics = ({"loss": loss, "perplexity": _perplexity(loss)} if loss is not None else {}) | quality
    return {"method": "base", "status": "reference", "reason": "the model before training, on the same held-out data",
            "total_parameters": sum(p.numel() for p in model.parameters()), "eval_loss": loss,
            "metrics": metrics, "samples": samples}


def _count_step_memory(model, batch: Mapping[str, Any], bf16: bool) -> dict[str, float]:
    """What one training step on ``batch`` holds, counted by kind (a throwaway AdamW step: the run's
    files are already written)."""
    import torch

    from deltatune.memory import measure_training_step

    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.0)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
        loss.backward()

    return measure_training_step(model, optimizer, step).as_mib()


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


def _die_with_parent() -> None:
    """On Linux, end this worker when the comparison that started it ends (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.environ.get(PARENT_VARIABLE, str(os.getppid())) != str(os.getppid()):  # gone before the call
        sys.exit(1)


def _worker(spec_path: str, result_path: str) -> int:
    _die_with_parent()
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if not spec.get("progress", True):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # e.g. "Converting and de-quantizing GGUF tensors"
    try:
        result = measure_base(spec) if spec.get("base_only") else measure_run(spec)
    except DeltatuneError as error:
        result = {"method": spec["method"], "status": "refused", "reason": str(error)}
    except Exception as error:  # noqa: BLE001 — one method's failure is a row in the table, not the end
        traceback.print_exc()
        result = {"method": spec["method"], "status": "failed", "reason": f"{type(error).__name__}: {error}"}
    atomic_write_text(result_path, json.dumps(result, default=str))  # e.g. a Path in the settings
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(_worker(*sys.argv[1:3]))
