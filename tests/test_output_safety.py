"""Nothing a user wrote is lost: train, merge and demo refuse an --output that would destroy files,
and --overwrite replaces deltatune's own files only. Remote code runs only on a real `true`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.cli import main
from deltatune.config import build_run
from deltatune.demo import run_demo
from deltatune.errors import DeltatuneError
from deltatune.pretrained import bundled

from test_cli import MODEL, write_jsonl


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def data(folder: Path) -> Path:
    rows = [json.loads(line) for line in bundled("e2e/train.jsonl").read_text().splitlines()[:20]]
    return write_jsonl(folder / "data.jsonl", rows)


def train_into(output: Path, data_file: Path, *extra: str) -> int:
    return main(["train", "--model", MODEL, "--data", str(data_file), "--output", str(output), "--max-steps", "1",
                 "--quiet", "batch_size=4", *extra])


def test_merge_refuses_its_own_inputs_a_file_and_a_folder_with_files(trained, tmp_path, capsys):
    before = snapshot(trained)
    assert main(["merge", "--model", MODEL, "--adapter", str(trained), "--output", str(trained)]) == 1
    assert "is the folder this command reads" in capsys.readouterr().err
    assert snapshot(trained) == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["merge", "--model", MODEL, "--adapter", str(trained), "--output", str(a_file)]) == 1
    assert a_file.read_text() == "mine" and "is a file" in capsys.readouterr().err
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["merge", "--model", MODEL, "--adapter", str(trained), "--output", str(folder)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", "--model", MODEL, "--adapter", str(trained), "--output", str(folder), "--overwrite"]) == 0
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "model.safetensors").is_file()


def test_train_onto_an_earlier_run_needs_overwrite_which_keeps_other_files(tmp_path, capsys):
    data_file = data(tmp_path)
    output = tmp_path / "run"
    assert train_into(output, data_file, "init=pissa", "targets=[q_proj]") == 0
    assert (output / "adapter_training_state.safetensors").is_file()
    (output / "notes.txt").write_text("mine")
    before = snapshot(output)
    assert train_into(output, data_file) == 1
    assert "already holds files" in capsys.readouterr().err and snapshot(output) == before
    assert train_into(output, data_file, "--overwrite") == 0
    assert (output / "notes.txt").read_text() == "mine"
    assert not (output / "adapter_training_state.safetensors").exists()  # the earlier run's, cleared
    assert json.loads((output / "deltatune_method.json").read_text())["settings"]["init"] == "kaiming"


def test_demo_refuses_a_folder_with_files_it_did_not_write(tmp_path):
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "deltatune_run.yaml").write_text("model: x\n")
    (folder / "thesis.tex").write_text("mine")
    with pytest.raises(DeltatuneError, match="thesis.tex"):
        run_demo(output=str(folder), max_steps=30, progress=False)
    assert (folder / "thesis.tex").read_text() == "mine"


@pytest.mark.parametrize("value", ["false", "no", "yes", 0, 1])
def test_trust_remote_code_takes_only_a_real_boolean(value):
    with pytest.raises(DeltatuneError, match="trust_remote_code must be true or false"):
        build_run({"model": "m", "data": "d", "output": "o", "trust_remote_code": value})


def test_the_same_settings_give_the_same_adapter_bit_for_bit(tmp_path):
    import torch
    from safetensors.torch import load_file

    data_file = data(tmp_path)
    for run in ("first", "second"):
        torch.rand(int(torch.randint(1, 100, (1,))))  # whatever happened in the process before
        assert train_into(tmp_path / run, data_file, "targets=all-linear", "seed=5") == 0
    first, second = (load_file(str(tmp_path / run / "adapter_model.safetensors")) for run in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_written_files_get_the_usual_permissions(tmp_path):
    """Temporary names are created private (0600/0700); what lands must have the mode a plain
    open() or mkdir() gives under the user's umask, so teammates can read a shared run."""
    import os
    import stat

    from deltatune.atomic import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "folder") as staging:
            (staging / "inside.txt").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_overwrite_clears_an_earlier_compositions_parts_and_keeps_a_users_folder(tmp_path):
    data_file = data(tmp_path)
    output = tmp_path / "run"
    assert main(["train", "--model", MODEL, "--data", str(data_file), "--output", str(output), "--max-steps", "1",
                 "--quiet", "--method", "prefix+adapter", "batch_size=4", "prefix.num_virtual_tokens=4"]) == 0
    assert (output / "prefix" / "adapter_config.json").is_file() and (output / "adapter").is_dir()
    (output / "notes").mkdir()  # the user's own folder, never named by the manifest
    (output / "notes" / "todo.txt").write_text("mine")
    assert train_into(output, data_file, "--overwrite") == 0  # one LoRA adapter now
    assert not (output / "prefix").exists() and not (output / "adapter").exists()
    assert not (output / "deltatune_composition.json").exists()
    assert (output / "notes" / "todo.txt").read_text() == "mine" and (output / "adapter_config.json").is_file()
