"""`deltatune compare`: every method trained on one task, one row and one plotted series each."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from deltatune import compare as compare_module
from deltatune.compare import COMPARED_METHODS, parse_methods, split_method_options
from deltatune.errors import DeltatuneError
from deltatune.methods import METHODS

FAST = ["--eval-examples", "3", "--max-new-tokens", "8", "max_length=64", "batch_size=2", "eval_batches=1"]


def run_cli(*args: str) -> tuple[int, str, str]:
    """The command as a user runs it: its own process, its exit status, stdout and stderr."""
    done = subprocess.run([sys.executable, "-m", "deltatune.cli", *args], capture_output=True, text=True, timeout=1800)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def cli():
    return run_cli


class Page(HTMLParser):
    """The report's table rows (by data-method) and SVG element ids."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.ids: list[str] = []
        self.svgs = 0
        self.external: list[str] = []
        self._row: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-method" in attrs:
            self._row = attrs["data-method"]
            self.rows[self._row] = []
        if tag == "svg":
            self.svgs += 1
        if "id" in attrs:
            self.ids.append(attrs["id"])
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith("#"):
                self.external.append(attrs[key])

    def handle_data(self, data):
        if self._row is not None and data.strip():
            self.rows[self._row].append(data.strip())

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Every method for 2 steps on the bundled model and data; lora told to target a module that
    does not exist, so its row must carry the refusal instead of a result."""
    output = tmp_path_factory.mktemp("compare") / "out"
    code, out, err = run_cli("compare", "--output", str(output), "--max-steps", "2", "--quiet", *FAST,
                         "lora.targets=[no_such_module]", "prefix.num_virtual_tokens=3")
    assert code == 0, err
    return output, out, json.loads((output / "results.json").read_text())


def test_every_method_has_a_result_and_a_table_line(compared):
    output, out, document = compared
    results = {result["method"]: result for result in document["results"]}
    assert list(results) == ["base", *COMPARED_METHODS]  # the untrained model first, as the reference
    for method, result in results.items():
        assert re.search(rf"^{re.escape(method)}\s", out, re.MULTILINE), f"no table line for {method}"
        if method not in METHODS and method != "base":
            assert result["status"] == "unavailable"
    assert results["lora"]["status"] == "refused"
    assert "no_such_module" in results["lora"]["reason"]
    done = [result for result in results.values() if result["status"] == "ok"]
    assert {"full", "freeze", "prefix", "prompt", "ptuning", "ptuning-v2"} <= {result["method"] for result in done}


def test_each_completed_run_measured_what_the_table_promises(compared):
    _, _, document = compared
    for result in document["results"]:
        if result["status"] != "ok":
            continue
        assert 0 < result["trainable_parameters"] <= result["total_parameters"]
        assert result["trainable_percent"] == pytest.approx(100 * result["trainable_parameters"] / result["total_parameters"])
        memory = result["step_memory_mib"]
        assert memory["total"] == pytest.approx(sum(memory[kind] for kind in
                                                    ("parameters", "gradients", "optimizer_state", "activations")))
        # AdamW keeps two moments per trainable value (fp32 here), plus one 0-d step per tensor.
        assert memory["optimizer_state"] >= 2 * 4 * result["trainable_parameters"] / 2**20
        assert result["steps"] == 2 and len(result["loss_curve"]) == 2
        assert result["seconds_per_step"] > 0 and result["tokens_per_s"] > 0
        assert result["eval_loss"] > 0 and result["metrics"]["perplexity"] == pytest.approx(2.718281828 ** result["eval_loss"])
        assert result["artifact_bytes"] > 0
    full = next(result for result in document["results"] if result["method"] == "full")
    assert full["trainable_percent"] == 100.0
    assert full["learning_rate"] == METHODS["full"].training_defaults["learning_rate"]


def test_the_same_seed_and_data_order_for_every_method(compared):
    output, _, document = compared
    orders = set()
    for result in document["results"]:
        if result["status"] == "ok":
            run = (output / result["method"] / "deltatune_run.yaml").read_text()
            orders.add(tuple(re.findall(r"^\s+(seed|batch_size|max_steps|max_length): (\S+)", run, re.MULTILINE)))
    assert len(orders) == 1


def test_the_report_has_every_method_and_a_series_in_every_plot(compared):
    output, _, document = compared
    page = Page()
    page.feed((output / "report.html").read_text())
    assert set(page.rows) == {result["method"] for result in document["results"]}
    assert any("no_such_module" in cell for cell in page.rows["lora"])
    assert page.svgs == 4 and not page.external  # self-contained: nothing fetched
    done = [result["method"] for result in document["results"] if result["status"] == "ok"]
    for plot in ("loss", "quality", "memory-activations", "time"):
        for method in done:
            assert f"series-{plot}-{method}" in page.ids, f"{plot} plot has no series for {method}"


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no headless chromium installed (Debian: apt-get install chromium)")
def test_a_real_browser_renders_the_report(compared, tmp_path):
    output, _, document = compared
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "report.png"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", (output / "report.html").resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    page = Page()
    page.feed(dom)
    assert set(page.rows) == {result["method"] for result in document["results"]}
    assert page.svgs == 4
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,2400",
                    (output / "report.html").resolve().as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_an_existing_output_needs_overwrite_and_keeps_foreign_files(compared, cli):
    output, _, _ = compared
    (output / "notes.txt").write_text("mine")
    code, _, err = cli("compare", "--output", str(output), "--methods", "prompt", "--max-steps", "1", "--quiet", *FAST)
    assert code == 1 and "--overwrite" in err
    code, _, err = cli("compare", "--output", str(output), "--methods", "prompt", "--max-steps", "1", "--quiet",
                       "--overwrite", *FAST)
    assert code == 0, err
    assert (output / "notes.txt").read_text() == "mine"
    assert [r["method"] for r in json.loads((output / "results.json").read_text())["results"]] == ["base", "prompt"]


def test_a_crashing_run_is_a_failed_row_not_the_end(tmp_path, monkeypatch):
    def crash(spec):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(compare_module, "measure_run", crash)
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"method": "lora", "settings": {}}))
    assert compare_module._worker(str(spec), str(result)) == 0
    assert json.loads(result.read_text()) == {"method": "lora", "status": "failed", "reason": "RuntimeError: out of luck"}


def test_method_options_go_to_their_method_only():
    shared, per_method = split_method_options({"lora.rank": 16, "batch_size": 4, "train.seed": 3}, ["lora", "prompt"])
    assert shared == {"batch_size": 4, "train.seed": 3}
    assert per_method == {"lora": {"rank": 16}, "prompt": {}}
    with pytest.raises(DeltatuneError, match="does not run"):
        split_method_options({"prefix.num_virtual_tokens": 4}, ["lora"])


def test_methods_are_checked_before_anything_trains():
    assert parse_methods(None) == list(COMPARED_METHODS)
    assert parse_methods("lora, prompt") == ["lora", "prompt"]
    for bad in ("lora,nope", "lora,lora", ","):
        with pytest.raises(DeltatuneError):
            parse_methods(bad)


def test_a_bad_method_setting_stops_before_training(tmp_path, cli):
    code, _, err = cli("compare", "--output", str(tmp_path / "out"), "--methods", "lora,prompt", "lora.rnak=4")
    assert code == 1 and "rnak" in err
    assert not (tmp_path / "out").exists()


def test_the_untrained_model_is_the_reference_row(compared):
    """Its held-out loss is the one every run starts from (methods that equal the base at init),
    and its generations sit beside each method's in results.json and the report."""
    output, out, document = compared
    base, *runs = document["results"]
    assert base["method"] == "base" and base["status"] == "reference"
    assert re.search(r"^base\s+\(untrained\)", out, re.MULTILINE)
    for result in runs:
        if result["status"] == "ok" and result["method"] in ("full", "freeze", "adapter"):
            assert result["eval_loss_start"] == pytest.approx(base["eval_loss"], rel=1e-6)
    assert base["metrics"]["bleu"] >= 0 and len(base["samples"]) == compare_module.SAMPLES
    for result in runs:
        if result["status"] == "ok":
            assert [sample["prompt"] for sample in result["samples"]] == [sample["prompt"] for sample in base["samples"]]
    page = (output / "report.html").read_text()
    assert "Held-out generations" in page and "series-quality-base" in page


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_ends_when_the_comparison_is_killed(tmp_path):
    """A SIGKILLed `deltatune compare` (a CI timeout, the OOM killer) leaves no training run behind."""
    import os
    import time

    script = ("import os, subprocess, sys, time\n"
              "env = {**os.environ, 'DELTATUNE_COMPARE_PARENT': str(os.getpid())}\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time, deltatune.compare as c; "
              "c._die_with_parent(); print(flush=True); time.sleep(120)'], env=env, stdout=subprocess.PIPE, text=True)\n"
              "child.stdout.readline()\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, 9)
    pytest.fail("the worker outlived the comparison that started it")
