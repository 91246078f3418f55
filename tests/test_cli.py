"""The CLI end to end on the bundled stories260K: train → merge → generate, info, and clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.config import build_run, merge_settings, read_yaml
from deltatune.generation import encode_prompt
from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer

from conftest import tiny_llama

MODEL = str(bundled("stories260K"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_train_writes_a_peft_folder_with_run_record_and_metrics(trained):
    assert {"adapter_config.json", "adapter_model.safetensors", "deltatune_run.yaml", "metrics.jsonl"} <= {
        p.name for p in trained.iterdir()}
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    steps = [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps[-1] == 4


def test_merge_then_generate_round_trip(trained, tmp_path, capsys):
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", MODEL, "--adapter", str(trained), "--output", str(merged_dir)]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapted = dt.load_adapter(load_causal_lm(MODEL), trained)
    ids = torch.tensor([encode_prompt(load_tokenizer(MODEL), "name : The Eagle | food : French\n")])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(input_ids=ids).logits, atol=1e-4)
    capsys.readouterr()
    prompt = "name : The Eagle"
    assert main(["generate", "--model", str(merged_dir), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    from_merged = capsys.readouterr().out
    assert main(["generate", "--model", MODEL, "--adapter", str(trained), "--prompt", prompt,
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == from_merged and from_merged.startswith(prompt)


def test_trained_folder_loads_in_peft_with_the_merged_logits(trained, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test extra")
    theirs = peft.PeftModel.from_pretrained(load_causal_lm(MODEL), str(trained)).eval()
    merged = dt.merge(dt.load_adapter(load_causal_lm(MODEL), trained))
    ids = torch.tensor([encode_prompt(load_tokenizer(MODEL), "name : Alimentum | area : city centre\n")])
    with torch.no_grad():
        # merged weights round differently from the bypass: fp32 noise only
        assert torch.allclose(theirs(input_ids=ids).logits, merged(ids).logits, atol=1e-4)


def test_info_describes_the_adapter(trained, capsys):
    assert main(["info", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "LORA" in out and "rank" in out and "q_proj" in out and "stories260K" in out


def test_yaml_config_and_overrides(tmp_path, capsys):
    rows = [{"text": "Once upon a time there was a cat."}] * 8
    data = write_jsonl(tmp_path / "text.jsonl", rows)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {MODEL}\ndata: {data}\nrank: 2\nmax_steps: 2\nbatch_size: 2\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "out"), "--quiet", "rank=3"]) == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 3


def test_sectioned_config_with_dotted_overrides_writes_a_record_that_reads_back(tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "Once upon a time there was a cat."}] * 8)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {MODEL}\ndata: {data}\nmethod: {{name: lora, rank: 2, targets: [q_proj]}}\n"
                      "train: {max_steps: 1, batch_size: 2, learning_rate: 1e-3}\n")
    output = tmp_path / "out"
    assert main(["train", "--config", str(config), "--output", str(output), "--quiet",
                 "method.rank=3", "train.max_steps=2"]) == 0
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 3
    record = output / "deltatune_run.yaml"
    run = build_run(merge_settings(read_yaml(record)))  # as `deltatune train --config record` reads it
    assert (run.method.rank, run.train.max_steps, run.output) == (3, 2, str(output))
    assert run.to_yaml() == record.read_text(encoding="utf-8")


# --- errors: one line, exit 1, no traceback ------------------------------------------------
def run_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("deltatune: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_model_folder(tmp_path, capsys):
    err = run_error(["train", "--model", str(tmp_path / "nope"), "--data", "x.jsonl", "--output", str(tmp_path)], capsys)
    assert "does not exist" in err


def test_missing_data_file(tmp_path, capsys):
    err = run_error(["train", "--model", MODEL, "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o")],
                    capsys)
    assert "none.jsonl" in err


def test_malformed_jsonl_line_names_the_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "broken\n')
    err = run_error(["train", "--model", MODEL, "--data", str(data), "--output", str(tmp_path / "o")], capsys)
    assert "line 2" in err


def test_target_that_matches_nothing(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b c d"}] * 4)
    err = run_error(["train", "--model", MODEL, "--data", str(data), "--output", str(tmp_path / "o"),
                     "targets=[query]"], capsys)
    assert "match no module" in err and "q_proj" in err


def test_unknown_setting_lists_valid_keys(tmp_path, capsys):
    err = run_error(["train", "--model", MODEL, "--data", "d", "--output", str(tmp_path), "rnak=4"], capsys)
    assert "rnak" in err and "rank" in err


def test_config_listing_several_methods_is_refused_by_train(tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text("methods: [{name: lora, rank: 8}, {name: prefix, num_virtual_tokens: 20}]\n")
    err = run_error(["train", "--config", str(config), "--model", MODEL, "--data", "d", "--output", str(tmp_path)],
                    capsys)
    assert "2 methods (lora, prefix)" in err


def test_adapter_for_another_model(tmp_path, capsys):
    other = dt.wrap(tiny_llama(), dt.LoRA(rank=2, targets=["q_proj"]))
    dt.save_adapter(other, tmp_path / "other")
    err = run_error(["generate", "--model", MODEL, "--adapter", str(tmp_path / "other"), "--prompt", "hi"], capsys)
    assert "shape" in err and "(2, 32)" in err and "(2, 64)" in err


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deltatune.cli", "info", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("deltatune: error:") and "Traceback" not in result.stderr


@pytest.mark.parametrize("method,extra", [("prompt", ["num_virtual_tokens=4", "init=vocab"]),
                                          ("prefix", ["num_virtual_tokens=4", "projection_hidden_size=16"]),
                                          ("ptuning-v2", ["num_virtual_tokens=8"]),
                                          ("ptuning", ["template={prompt:2} {text} {prompt:2} Description:",
                                                       "encoder_hidden_size=16"])])
def test_prompt_learning_methods_train_from_the_cli(method, extra, tmp_path, capsys):
    rows = [json.loads(line) for line in bundled("e2e/train.jsonl").read_text().splitlines()[:16]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    output = tmp_path / method
    assert main(["train", "--model", MODEL, "--data", str(data), "--method", method, "--output", str(output),
                 "--max-steps", "2", "--quiet", "batch_size=4", *extra]) == 0
    capsys.readouterr()
    assert main(["info", str(output)]) == 0
    info = capsys.readouterr().out
    assert f"({method})" in info and "virtual tokens" in info
    in_template = method == "ptuning"  # virtual tokens inside the text: peft can only prepend
    assert re.search(r"loads in peft\s+no" if in_template else r"loads in peft\s+yes", info)
    assert main(["generate", "--model", MODEL, "--adapter", str(output), "--prompt", "name : Aromi",
                 "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize("method", ["full"])  # freeze writes its trained layers: tests/test_full_freeze.py
def test_full_and_freeze_write_a_model_folder_that_generate_and_info_read(method, tmp_path, capsys):
    rows = [json.loads(line) for line in bundled("e2e/train.jsonl").read_text().splitlines()[:16]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    output = tmp_path / method
    assert main(["train", "--model", MODEL, "--data", str(data), "--output", str(output), "--method", method,
                 "--max-steps", "2", "--quiet", "batch_size=4"]) == 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(output)  # a plain transformers folder
    assert not (output / "adapter_config.json").exists()
    capsys.readouterr()
    assert main(["info", str(output)]) == 0
    shown = capsys.readouterr().out
    assert f"{method} (a whole model folder" in shown and "260,032" in shown
    assert main(["generate", "--model", str(output), "--prompt", "name : Aromi |", "--max-new-tokens", "3"]) == 0


def test_resuming_a_finished_run_prints_valid_json(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a b", "completion": " c d"}] * 4)
    argv = ["train", "--quiet", "--model", MODEL, "--data", str(data), "--output", str(tmp_path / "out"),
            "--max-steps", "1", "batch_size=2", "eval_fraction=0"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON: {line}"))
    assert summary["steps"] == 1 and summary["train_loss"] is None


def test_generating_past_the_model_context_is_one_sentence(capsys):
    error = run_error(["generate", "--model", MODEL, "--prompt", "Once upon a time", "--max-new-tokens", "100000"],
                      capsys)
    assert "plus max_new_tokens=100000 runs past the model's context of 512 positions: lower max_new_tokens to " \
           "at most" in error


def test_data_warnings_go_to_stderr(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b c d e f g h i j k l m n o p"}] * 4)
    assert main(["train", "--quiet", "--model", MODEL, "--data", str(data), "--output", str(tmp_path / "out"),
                 "--max-steps", "1", "batch_size=2", "eval_fraction=0", "max_length=8"]) == 0
    captured = capsys.readouterr()
    assert "deltatune: warning:" in captured.err and "truncated 4 of 4 examples" in captured.err
    assert "deltatune: warning" not in captured.out
    json.loads(captured.out.strip().splitlines()[-1])  # stdout stays the machine-readable summary


def test_the_same_seed_gives_bit_identical_adapters_whatever_the_hash_seed(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"item {k}", "completion": f" answer {k}"} for k in range(8)])
    outputs = []
    for hash_seed in ("1", "2"):
        output = tmp_path / f"out-{hash_seed}"
        done = subprocess.run([sys.executable, "-m", "deltatune", "train", "--quiet", "--model", MODEL, "--data",
                               str(data), "--output", str(output), "--max-steps", "3", "targets=all-linear", "seed=5",
                               "batch_size=2", "eval_fraction=0", "dropout=0.1"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed},
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append((output / "adapter_model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]
