"""``report.html`` for ``deltatune compare``: one self-contained page, every figure a measurement.

The page holds the results table and four plots drawn with matplotlib as inline SVG (no script,
no network, nothing beside the file): the training loss of every method by step, the held-out
metric against the share of parameters trained, what one step holds in memory by kind, and the
time per step. Each plotted series carries an SVG id ``series-...`` so a test (or a person with
the browser's inspector) can find it.
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from deltatune.atomic import atomic_write_text

METRIC_ORDER = ("accuracy", "f1", "bleu", "rouge_l", "perplexity")
MEMORY_KINDS = ("parameters", "gradients", "optimizer_state", "activations")
KIND_COLOURS = {"parameters": "#4c72b0", "gradients": "#dd8452", "optimizer_state": "#55a868", "activations": "#c44e52"}


def write_report(path: str | Path, results: Sequence[Mapping[str, Any]], task: Mapping[str, Any]) -> Path:
    """Write the comparison page to ``path`` (through a temporary file and a rename)."""
    done = [result for result in results if result.get("status") == "ok"]
    base = next((result for result in results if result.get("status") == "reference"), None)
    sections = [
        ("Training loss", _loss_plot(done)),
        ("Held-out quality against trainable parameters", _quality_plot(done, base)),
        ("What one training step holds in memory", _memory_plot(done)),
        ("Time per training step", _time_plot(done)),
    ]
    body = [
        "<h1>deltatune compare</h1>",
        f"<p class=task>{_task_line(task)}</p>",
        _results_table(results),
        "<p class=note>Step memory is counted tensor by tensor (parameters, gradients, AdamW state and the "
        "activations autograd keeps for backward) on the run's first batch; it is the same on every machine. "
        "Peak RSS is the training process's resident memory at its highest, Python and libraries included. "
        "Times are wall-clock on this machine over the training steps only.</p>",
    ]
    for title, svg in sections:
        body.append(f"<section><h2>{html.escape(title)}</h2>{svg if svg else '<p>no completed run to plot</p>'}</section>")
    body.append(_samples(results))
    page = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>deltatune compare</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    atomic_write_text(path, page)
    return Path(path)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}td.reason{text-align:left;color:#a33}
.note,.task{color:#555;font-size:14px}td.text{text-align:left;max-width:800px}h3{font-size:15px}section svg{max-width:100%;height:auto}
"""


def _task_line(task: Mapping[str, Any]) -> str:
    parts = [f"{key}: <code>{html.escape(str(value))}</code>" for key, value in task.items() if key != "train"]
    train = task.get("train") or {}
    parts += [f"{key} {html.escape(str(value))}" for key, value in train.items()]
    return " · ".join(parts)


def _results_table(results: Sequence[Mapping[str, Any]]) -> str:
    from deltatune.compare import _size

    head = ("method", "trainable", "% of model", "step memory (MiB)", "peak RSS (MiB)", "s / step", "tokens / s",
            "held-out loss", "held-out metrics", "on disk", "learning rate")
    rows = ["<table id=results><tr>" + "".join(f"<th>{name}</th>" for name in head) + "</tr>"]
    for result in results:
        method = html.escape(str(result["method"]))
        metrics = result.get("metrics") or {}
        shown = [name for name in METRIC_ORDER if metrics.get(name) is not None]
        if result.get("status") == "reference":
            loss = "-" if result.get("eval_loss") is None else f"{result['eval_loss']:.3f}"
            rows.append(f"<tr data-method='{method}'><td>{method} (untrained)</td><td colspan=6></td>"
                        f"<td>{loss}</td><td>{html.escape(', '.join(f'{n} {metrics[n]:.4g}' for n in shown) or '-')}</td>"
                        f"<td colspan=2></td></tr>")
            continue
        if result.get("status") != "ok":
            reason = html.escape(f"{result.get('status')}: {result.get('reason', '')}")
            rows.append(f"<tr data-method='{method}'><td>{method}</td><td class=reason colspan={len(head) - 1}>"
                        f"{reason}</td></tr>")
            continue
        loss = (f"{result['eval_loss_start']:.3f} → {result['eval_loss']:.3f}"
                if result.get("eval_loss") is not None and result.get("eval_loss_start") is not None else "-")
        cells = (f"{result['trainable_parameters']:,}", f"{result['trainable_percent']:.3g}",
                 f"{result['step_memory_mib']['total']:.2f}",
                 "-" if result.get("peak_rss_mib") is None else f"{result['peak_rss_mib']:.0f}",
                 f"{result['seconds_per_step']:.3f}", f"{result['tokens_per_s']:,.0f}", loss,
                 ", ".join(f"{name} {metrics[name]:.4g}" for name in shown) or "-", _size(result["artifact_bytes"]),
                 f"{result.get('learning_rate', '-'):g}" if result.get("learning_rate") else "-")
        rows.append(f"<tr data-method='{method}'><td>{method}</td>"
                    + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    return "".join(rows) + "</table>"


# --- plots ---------------------------------------------------------------------------------
def _figure(width: float = 8, height: float = 4):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def _svg(figure) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "deltatune"}):
        figure.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG sits inside HTML


def _loss_plot(results: Sequence[Mapping[str, Any]]) -> str | None:
    curves = [(result["method"], result.get("loss_curve") or []) for result in results]
    curves = [(method, curve) for method, curve in curves if curve]
    if not curves:
        return None
    figure, axes = _figure()
    for method, curve in curves:
        steps, losses = zip(*curve)
        (line,) = axes.plot(steps, losses, label=method, linewidth=1.2)
        line.set_gid(f"series-loss-{method}")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.legend(fontsize=8, ncols=2)
    axes.grid(alpha=0.3)
    return _svg(figure)


def _quality_plot(results: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None = None) -> str | None:
    from deltatune.compare import headline_metric

    points = []
    for result in results:
        metric = headline_metric(result)
        if metric and math.isfinite(metric[1]) and result["trainable_percent"] > 0:
            points.append((result["method"], result["trainable_percent"], metric))
    if not points:
        return None
    figure, axes = _figure()
    names = sorted({metric[0] for _, _, metric in points})
    for method, percent, (name, value) in points:
        marker = axes.scatter([percent], [value], s=40)
        marker.set_gid(f"series-quality-{method}")
        axes.annotate(method, (percent, value), textcoords="offset points", xytext=(5, 4), fontsize=8)
    reference = headline_metric(base) if base else None
    if reference and reference[0] in names and math.isfinite(reference[1]):
        line = axes.axhline(reference[1], color="#888", linestyle="--", linewidth=1, label="untrained model")
        line.set_gid("series-quality-base")
        axes.legend(fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (% of the model, log scale)")
    lower_better = {"perplexity", "loss"}
    axes.set_ylabel(" / ".join(f"{name} ({'lower' if name in lower_better else 'higher'} is better)" for name in names))
    axes.grid(alpha=0.3)
    return _svg(figure)


def _memory_plot(results: Sequence[Mapping[str, Any]]) -> str | None:
    if not results:
        return None
    figure, axes = _figure(8, 0.5 + 0.45 * len(results))
    methods = [result["method"] for result in results]
    left = [0.0] * len(results)
    for kind in MEMORY_KINDS:
        values = [result["step_memory_mib"].get(kind, 0.0) for result in results]
        bars = axes.barh(methods, values, left=left, label=kind.replace("_", " "), color=KIND_COLOURS[kind])
        for method, bar in zip(methods, bars):
            bar.set_gid(f"series-memory-{kind}-{method}")
        left = [a + b for a, b in zip(left, values)]
    axes.invert_yaxis()
    axes.set_xlabel("MiB held by one training step (counted)")
    axes.legend(fontsize=8, loc="lower right")
    return _svg(figure)


def _time_plot(results: Sequence[Mapping[str, Any]]) -> str | None:
    if not results:
        return None
    figure, axes = _figure(8, 0.5 + 0.45 * len(results))
    methods = [result["method"] for result in results]
    bars = axes.barh(methods, [result["seconds_per_step"] for result in results], color="#8172b3")
    for method, bar in zip(methods, bars):
        bar.set_gid(f"series-time-{method}")
    axes.invert_yaxis()
    axes.set_xlabel("seconds per training step")
    return _svg(figure)


def _samples(results: Sequence[Mapping[str, Any]]) -> str:
    """The first held-out prompts, each with every method's greedy output and one reference."""
    runs = [result for result in results if result.get("samples")]
    if not runs:
        return ""
    parts = ["<section><h2>Held-out generations</h2>"]
    for index, sample in enumerate(runs[0]["samples"]):
        parts.append(f"<h3>{html.escape(sample['prompt'].strip())}</h3><table class=samples>"
                     f"<tr><td>reference</td><td class=text>{html.escape(sample['reference'])}</td></tr>")
        for result in runs:
            if index < len(result["samples"]):
                parts.append(f"<tr><td>{html.escape(str(result['method']))}</td>"
                             f"<td class=text>{html.escape(result['samples'][index]['output'])}</td></tr>")
        parts.append("</table>")
    return "".join(parts) + "</section>"
