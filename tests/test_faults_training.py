"""Training survives faults (docs/faults.md): SIGKILL at any moment, SIGINT/SIGTERM, NaN losses, a full
disk, damaged checkpoints and changed settings on --resume; nothing half-written is ever visible.

The crash tests run `deltatune train` in real child processes. Starting Python and importing torch
and transformers takes seconds, so a helper process does it once (``Forks``) and forks a fresh
child for every run: each child is a whole `deltatune train` process that can be killed for real.
A child is told where to stop by event number: the trainer's steps (backward, optimizer step) and
every file operation of a save (a tensor file written, an fsync, a rename) are counted, and the
child kills itself (SIGKILL), or signals itself, at the chosen event. A file write chosen as the
kill point is cut to half its size first, as if the process died while writing it.

Run this file as a script (`python tests/test_faults_training.py serve`) only through ``Forks``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deltatune.atomic import STAGING_NAME, atomic_directory, atomic_file, remove_stale_staging
from deltatune.cli import main
from deltatune.config import build_run
from deltatune.errors import DeltatuneError
from deltatune.pretrained import bundled
from deltatune.train import TrainConfig, TrainingInterrupted, train

from test_train import TRAINABLE, config, read_metrics, save_trainable, tiny_examples, tiny_model

MODEL = str(bundled("stories260K"))
MAX_STEPS = 8
CHECKPOINT_FILES = {"adapter_config.json", "adapter_model.safetensors", "deltatune_method.json", "optimizer.pt",
                    "rng.pt", "trainable.safetensors", "trainer_state.json"}
# The issue asks for 10 kill points; each costs two forked runs of about a second.
KILL_POINTS = 10
KILL_SEED = 12


def train_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """A LoRA run with dropout (so the RNG matters), a checkpoint every step and an evaluation mid-way."""
    return ["train", "--model", str(model), "--data", str(data), "--output", str(output), "--max-steps",
            str(MAX_STEPS), "--quiet", "batch_size=4", "max_length=160", "rank=4", "dropout=0.1", "targets=all-linear",
            "learning_rate=1e-2", "save_every=1", "eval_every=4", *extra]


def write_tiny_model(folder: Path) -> Path:
    """A 2-layer Llama with stories260K's tokenizer: a whole `deltatune train` takes about a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(bundled("stories260K") / name, folder / name)
    return folder


def write_data(folder: Path, rows: int = 40) -> Path:
    lines = bundled("e2e/train.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    path = folder / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def losses(folder: Path) -> list[tuple[Any, Any, Any]]:
    return [(line["step"], line.get("loss"), line.get("eval_loss")) for line in read_metrics(folder)]


def staging_left(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if STAGING_NAME.fullmatch(p.name))


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def assert_checkpoints_complete(folder: Path) -> list[str]:
    """Every visible checkpoint holds every file, and each one loads."""
    names = sorted(p.name for p in folder.glob("checkpoint-*"))
    for name in names:
        checkpoint = folder / name
        assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES, name
        load_file(str(checkpoint / "trainable.safetensors"))
        torch.load(checkpoint / "optimizer.pt", weights_only=True)
        torch.load(checkpoint / "rng.pt", weights_only=True)
        assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == int(name.split("-")[1])
    return names


# --- the fork helper ----------------------------------------------------------------------------


@dataclass
class Outcome:
    exit_code: int  # negative: killed by that signal
    output: str  # the child's stdout and stderr


class Forks:
    """A Python process that imported everything once and forks one child per run."""

    def __init__(self) -> None:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen([sys.executable, __file__, "serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent, env=env)

    def run(self, job: str, **arguments: Any) -> Outcome:
        self.process.stdin.write(json.dumps({"job": job, "arguments": arguments}) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        assert reply, "the fork helper stopped"
        return Outcome(**json.loads(reply))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def forks():
    if not hasattr(os, "fork"):
        pytest.skip("the crash tests fork child processes (POSIX only)")
    helper = Forks()
    yield helper
    helper.close()


class Events:
    """Counts the trainer's steps and file operations in a child and acts at chosen ones: SIGKILL at
    event number ``kill_at``; each of ``signals`` ([kind, n, signal]) at the n-th event of that kind
    after the previous signal (the first: from the start)."""

    def __init__(self, kill_at: int | None, signals: list[list[Any]]) -> None:
        self.count, self.kinds, self.kill_at, self.signals = 0, [], kill_at, list(signals)
        self.since: dict[str, int] = {}

    def tick(self, kind: str, written: Any = None) -> None:
        self.count += 1
        self.kinds.append(kind)
        self.since[kind] = self.since.get(kind, 0) + 1
        if self.signals and self.signals[0][:2] == [kind, self.since[kind]]:
            signum = self.signals.pop(0)[2]
            self.since.clear()
            os.kill(os.getpid(), signum)  # the trainer's handler runs before this call returns
        if self.count == self.kill_at:
            if written is not None:  # died while writing it: half the file is there
                _cut_in_half(written)
            os.kill(os.getpid(), signal.SIGKILL)


def _cut_in_half(written: Any) -> None:
    if hasattr(written, "flush"):
        written.flush()
        written.truncate(written.tell() // 2)
        written.flush()
        os.fsync(written.fileno())
    else:
        path = Path(written)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _install_events(events: Events) -> None:
    """Patch the few places every step and every save goes through (this child only)."""
    import deltatune.peft_format
    import deltatune.train

    backward, adamw_step, torch_save = torch.Tensor.backward, torch.optim.AdamW.step, torch.save
    replace, fsync = os.replace, os.fsync

    def counted_backward(self, *args, **kwargs):
        events.tick("backward")
        return backward(self, *args, **kwargs)

    def counted_step(self, *args, **kwargs):
        events.tick("optimizer step")
        return adamw_step(self, *args, **kwargs)

    def counted_torch_save(obj, file, *args, **kwargs):
        torch_save(obj, file, *args, **kwargs)
        events.tick("write", file)

    def counted_save_file(original):
        def save(tensors, filename, *args, **kwargs):
            original(tensors, filename, *args, **kwargs)
            events.tick("write", filename)
        return save

    def counted_replace(source, target, *args, **kwargs):
        events.tick("rename")
        return replace(source, target, *args, **kwargs)

    def counted_fsync(descriptor):
        events.tick("fsync")
        return fsync(descriptor)

    torch.Tensor.backward, torch.optim.AdamW.step, torch.save = counted_backward, counted_step, counted_torch_save
    os.replace, os.fsync = counted_replace, counted_fsync
    for module in (deltatune.train, deltatune.peft_format):
        module.save_file = counted_save_file(module.save_file)


def job_train(argv: list[str], kill_at: int | None = None, signals: list[list[Any]] = (),
              events_to: str | None = None, file_size_limit_at_save: int | None = None) -> int:
    """`deltatune train ARGV` in this child, killed or signalled at the given events."""
    import resource

    import deltatune.train

    torch.set_num_threads(1)  # on a busy machine two threads per child are many times slower, not faster
    events = Events(kill_at, signals)
    _install_events(events)
    if file_size_limit_at_save is not None:  # a full disk from the Nth checkpoint on: writes fail with EFBIG
        save_checkpoint, saves = deltatune.train._save_checkpoint, []

        def save_on_a_full_disk(*args, **kwargs):
            saves.append(1)
            if len(saves) == file_size_limit_at_save:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (256, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            return save_checkpoint(*args, **kwargs)
        deltatune.train._save_checkpoint = save_on_a_full_disk
    code = main(argv)
    if events_to:
        Path(events_to).write_text(json.dumps(events.kinds))
    return code


JOBS = {"train": job_train}


def serve() -> None:
    """The fork helper: one request per line on stdin, one reply per line on stdout. A child's output
    comes through a pipe, which no file-size limit or full disk can cut."""
    import select

    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.close(read_end)
                os.dup2(write_end, 1)
                os.dup2(write_end, 2)
                # a shell starts background jobs with SIGINT ignored (CI may run the suite so); a user at a
                # terminal has it, and these runs stand for that user
                signal.signal(signal.SIGINT, signal.default_int_handler)
                code = JOBS[request["job"]](**request["arguments"])
            except SystemExit as error:
                code = error.code if isinstance(error.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        output, deadline = [], time.monotonic() + 300
        while True:
            if select.select([read_end], [], [], 1.0)[0]:
                piece = os.read(read_end, 1 << 16)
                if not piece:
                    break
                output.append(piece)
            elif time.monotonic() > deadline:  # a hung child fails its test instead of the whole session
                os.kill(pid, signal.SIGKILL)
        os.close(read_end)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        reply = {"exit_code": status, "output": b"".join(output).decode(errors="replace")}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


# --- SIGKILL at any moment: resume is bit-identical --------------------------------------------


@dataclass
class Reference:
    model: Path
    data: Path
    folder: Path
    kinds: list[str]  # every event of the uninterrupted run, in order

    def args(self, output: Path, *extra: str) -> list[str]:
        return train_args(self.model, self.data, output, *extra)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def reference(forks, model_folder, tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    model, data = model_folder, write_data(root)
    folder, events = root / "run", root / "events.json"
    outcome = forks.run("train", argv=train_args(model, data, folder), events_to=str(events))
    assert outcome.exit_code == 0, outcome.output
    return Reference(model, data, folder, json.loads(events.read_text()))


# How many of the KILL_POINTS fall on each kind of event: inside a step, or inside a save (a file
# written, then cut in half; the flush of a file or folder; a rename).
KILLS_BY_KIND = {("backward", "optimizer step"): 3, ("write",): 3, ("fsync",): 2, ("rename",): 2}


def kill_points(kinds: list[str]) -> list[int]:
    """KILL_POINTS seeded event numbers, from the first backward on, spread over the kinds of event."""
    first, chooser, points = kinds.index("backward"), random.Random(KILL_SEED), []
    for wanted, count in KILLS_BY_KIND.items():
        points += chooser.sample([n + 1 for n, kind in enumerate(kinds) if n >= first and kind in wanted], count)
    assert len(points) == KILL_POINTS
    return sorted(points)


@pytest.mark.parametrize("point", range(KILL_POINTS))
def test_sigkill_at_a_seeded_moment_then_resume_is_bit_identical(point, forks, reference, tmp_path):
    event = kill_points(reference.kinds)[point]
    output = tmp_path / "run"
    killed = forks.run("train", argv=reference.args(output), kill_at=event)
    assert killed.exit_code == -signal.SIGKILL, (reference.kinds[event - 1], killed.output)
    assert_checkpoints_complete(output)  # nothing half-written is visible
    resumed = forks.run("train", argv=reference.args(output, "--resume"))
    assert resumed.exit_code == 0, (event, reference.kinds[event - 1], resumed.output)
    assert "Traceback" not in resumed.output
    assert_same_tensors(adapter(output), adapter(reference.folder))
    assert losses(output) == losses(reference.folder)
    assert staging_left(output) == []  # what the killed run left behind is cleared
    assert assert_checkpoints_complete(output) == [f"checkpoint-{MAX_STEPS - 1}", f"checkpoint-{MAX_STEPS}"]


def test_sigkill_while_the_final_adapter_is_written_then_resume_finishes_it(forks, reference, tmp_path):
    last_write = max(n + 1 for n, kind in enumerate(reference.kinds) if kind == "write")  # the output's adapter
    output = tmp_path / "run"
    killed = forks.run("train", argv=reference.args(output), kill_at=last_write)
    assert killed.exit_code == -signal.SIGKILL
    assert not (output / "adapter_model.safetensors").exists() and staging_left(output) != []
    resumed = forks.run("train", argv=reference.args(output, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert_same_tensors(adapter(output), adapter(reference.folder))
    assert staging_left(output) == []


# --- SIGINT and SIGTERM: finish the step, save, say how to resume --------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_current_step_and_resume_is_exact(signum, forks, reference, tmp_path):
    output = tmp_path / "run"
    args = reference.args(output, "save_every=5")  # no checkpoint at step 3 but the signal's
    stopped = forks.run("train", argv=args, signals=[["backward", 3, signum]])  # during step 3
    assert stopped.exit_code == 128 + signum, stopped.output
    assert "Traceback" not in stopped.output
    assert f"training stopped by {signal.Signals(signum).name} after step 3 of {MAX_STEPS}" in stopped.output
    assert "--resume" in stopped.output
    assert assert_checkpoints_complete(output) == ["checkpoint-3"]
    resumed = forks.run("train", argv=args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_tensors(adapter(output), adapter(reference.folder))
    assert losses(output) == losses(reference.folder)


def test_a_second_ctrl_c_aborts_at_once_without_a_half_written_checkpoint(forks, reference, tmp_path):
    output = tmp_path / "run"
    args = reference.args(output, "save_every=2")
    # Ctrl-C during step 3, whose checkpoint is then written; again while its second file is written
    stopped = forks.run("train", argv=args, signals=[["backward", 3, signal.SIGINT], ["write", 2, signal.SIGINT]])
    assert stopped.exit_code == 130, stopped.output
    assert "deltatune: interrupted" in stopped.output and "Traceback" not in stopped.output
    assert assert_checkpoints_complete(output) == ["checkpoint-2"] and staging_left(output) == []
    resumed = forks.run("train", argv=args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_tensors(adapter(output), adapter(reference.folder))


class NoHandler(Exception):
    pass


def test_signals_in_process_raise_training_interrupted_and_restore_the_handlers(tmp_path):
    def outside_training(signum, frame):  # were the trainer's handler missing, the test fails (not the session)
        raise NoHandler()

    previous = signal.signal(signal.SIGINT, outside_training)
    calls = []

    def interrupt_in_step_two(module, args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    model = tiny_model()
    model.register_forward_pre_hook(interrupt_in_step_two)
    try:
        with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 2 of 6") as caught:
            train(model, tiny_examples(8), [], config(max_steps=6), tmp_path, pad_token_id=0,
                  save_model=save_trainable, progress=False)
        assert signal.getsignal(signal.SIGINT) is outside_training
    finally:
        signal.signal(signal.SIGINT, previous)
    assert caught.value.exit_code == 130 and len(calls) == 2
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]


# --- a full disk or a permission error while saving -----------------------------------------------


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(forks, reference, tmp_path):
    output = tmp_path / "run"
    args = reference.args(output)
    full = forks.run("train", argv=args, file_size_limit_at_save=3)  # a real EFBIG from the kernel
    assert full.exit_code == 1, full.output
    message = full.output.strip().splitlines()[-1]
    assert message.startswith(f"deltatune: error: could not write {output / 'checkpoint-3'} (")
    assert f"and {output / 'checkpoint-2'} is kept" in message and "--resume" in message
    assert "Traceback" not in full.output
    assert assert_checkpoints_complete(output) == ["checkpoint-1", "checkpoint-2"] and staging_left(output) == []
    resumed = forks.run("train", argv=args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_tensors(adapter(output), adapter(reference.folder))


def test_a_permission_error_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # Tests run as root here, where chmod cannot make a folder read-only: the error is injected.
    import tempfile

    make_folder = tempfile.mkdtemp

    def refused(*args, prefix="", **kwargs):
        if prefix.startswith(".checkpoint-3."):
            raise PermissionError(13, "Permission denied", str(tmp_path))
        return make_folder(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with pytest.raises(DeltatuneError) as caught:
        train(tiny_model(), tiny_examples(8), [], config(save_every=1), tmp_path, pad_token_id=0,
              save_model=save_trainable, progress=False)
    assert type(caught.value) is DeltatuneError
    assert str(caught.value) == (f"could not write {tmp_path / 'checkpoint-3'} (Permission denied) and "
                                 f"{tmp_path / 'checkpoint-2'} is kept: free disk space or allow writing to "
                                 f"{tmp_path}, then run again with --resume")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# --- no partial file is ever visible ---------------------------------------------------------------


def test_atomic_writes_flush_the_file_then_rename_then_flush_the_folder(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("names a file descriptor's path through /proc (Linux)")
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("rename", str(b))) or replace(a, b))
    with atomic_file(tmp_path / "a.bin") as staging:
        staging.write_bytes(b"x")
        assert staging.name.startswith(f".a.bin.tmp-{os.getpid()}-")
    assert [kind for kind, _ in calls] == ["fsync", "rename", "fsync"]
    assert calls[1:] == [("rename", str(tmp_path / "a.bin")), ("fsync", str(tmp_path))]
    calls.clear()
    with atomic_directory(tmp_path / "folder") as staging:
        (staging / "inside").mkdir()
        (staging / "inside" / "b.bin").write_bytes(b"y")
    flushed = [Path(path).name for kind, path in calls if kind == "fsync"]
    assert flushed[0] == "b.bin" and calls[-2:] == [("rename", str(tmp_path / "folder")), ("fsync", str(tmp_path))]


def test_stale_staging_is_cleared_and_only_deltatune_staging(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # a process that has ended
    left = {f".checkpoint-5.tmp-{dead}-abcd_123": "dir", f".metrics.jsonl.tmp-{dead}-zz9yy8xx": "file",
            f".staging-{dead}-q1w2e3r4": "dir", f".checkpoint-2.del-{dead}": "dir", f".checkpoint-4.old-{dead}": "dir"}
    kept = {f".checkpoint-6.tmp-{os.getpid()}-abcdefgh": "dir",  # a writer that is still running
            ".my-notes.tmp": "file", ".git": "dir", "checkpoint-3": "dir", ".staging-mine": "file"}
    for name, kind in {**left, **kept}.items():
        (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("x")
    (tmp_path / f".checkpoint-4.old-{dead}" / "trainer_state.json").write_text("{}")
    cleared = remove_stale_staging(tmp_path)
    assert sorted(cleared) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "checkpoint-4"])
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()  # set aside mid-replace: put back


def test_a_killed_write_leaves_nothing_visible_and_the_next_run_clears_it(tmp_path):
    (tmp_path / f".checkpoint-1.tmp-{2**22 + 7}-abcdefgh").mkdir()  # pid above Linux's largest: not running
    train(tiny_model(), tiny_examples(8), [], config(max_steps=2, save_every=1), tmp_path, pad_token_id=0,
          save_model=save_trainable, progress=False)
    assert staging_left(tmp_path) == []


# --- save_total_limit -------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3])
def test_save_total_limit_keeps_the_newest_complete_checkpoints(limit, tmp_path):
    train(tiny_model(), tiny_examples(8), [], config(max_steps=6, save_every=1, save_total_limit=limit), tmp_path,
          pad_token_id=0, save_model=save_trainable, progress=False)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(7 - limit, 7)]
    assert staging_left(tmp_path) == []


def test_save_total_limit_keeps_the_newest_complete_checkpoint_when_the_next_save_fails(tmp_path):
    saves = []

    def fail_the_fourth(model, folder):
        saves.append(folder)
        if len(saves) == 4:
            raise OSError(28, "No space left on device")
        save_trainable(model, folder)

    with pytest.raises(DeltatuneError, match=r"\(No space left on device\) and .*checkpoint-3 is kept"):
        train(tiny_model(), tiny_examples(8), [], config(max_steps=6, save_every=1, save_total_limit=1), tmp_path,
              pad_token_id=0, save_model=fail_the_fourth, progress=False)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-3"] and staging_left(tmp_path) == []


# --- NaN or inf loss ---------------------------------------------------------------------------------

POISON = 127  # a token whose (frozen) embedding is NaN: any batch holding it has a NaN loss


def poisoned_model():
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = float("nan")
    return model


def poisoned_examples() -> list[dict[str, list[int]]]:
    examples = [{"input_ids": [t % 100 + 3 for t in e["input_ids"]], "labels": e["labels"]} for e in tiny_examples(12)]
    examples[5] = {"input_ids": [POISON] + examples[5]["input_ids"][1:], "labels": examples[5]["labels"]}
    return examples


def poisoned_steps(settings: TrainConfig) -> list[tuple[int, list[int]]]:
    """(step, its examples) for the steps whose batch holds example 5."""
    from deltatune.data import batch_indices

    order = batch_indices(12, settings.batch_size, settings.seed)
    steps = [(step, sorted(next(order))) for step in range(1, settings.max_steps + 1)]
    return [(step, batch) for step, batch in steps if 5 in batch]


def test_a_nan_loss_stops_naming_the_step_and_its_examples_and_keeps_the_last_checkpoint(tmp_path):
    settings = config(max_steps=6, save_every=1, save_total_limit=10)
    (step, batch), *_ = poisoned_steps(settings)
    assert step > 1
    with pytest.raises(DeltatuneError) as caught:
        train(poisoned_model(), poisoned_examples(), [], settings, tmp_path, pad_token_id=0,
              save_model=save_trainable, progress=False)
    assert str(caught.value) == (
        f"the loss at step {step} is nan (training examples {', '.join(map(str, batch))}, numbered from 0 in the "
        f"training set) and {tmp_path / f'checkpoint-{step - 1}'} is the last good checkpoint: check those examples "
        "and the learning rate, or set nan_policy=skip and run again with --resume to skip such steps")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, step)]
    weights = load_file(str(tmp_path / f"checkpoint-{step - 1}" / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # as the message says: skip such steps and resume
    skip = config(max_steps=6, save_every=1, save_total_limit=10, nan_policy="skip")
    result = train(poisoned_model(), poisoned_examples(), [], skip, tmp_path, pad_token_id=0,
                   save_model=save_trainable, resume=True, progress=False)
    assert result.step == 6 and result.skipped_steps == len(poisoned_steps(skip))


def test_nan_policy_skip_drops_exactly_that_steps_update_and_counts_it(tmp_path):
    settings = config(max_steps=6, save_every=1, save_total_limit=10, nan_policy="skip")
    poisoned = [step for step, _ in poisoned_steps(settings)]
    result = train(poisoned_model(), poisoned_examples(), [], settings, tmp_path, pad_token_id=0,
                   save_model=save_trainable, progress=False)
    assert result.skipped_steps == len(poisoned) >= 1
    for step in range(1, 7):
        before = load_file(str(tmp_path / f"checkpoint-{step - 1}" / "trainable.safetensors")) if step > 1 else None
        after = load_file(str(tmp_path / f"checkpoint-{step}" / "trainable.safetensors"))
        assert all(torch.isfinite(w).all() for w in after.values())
        if before is not None:
            unchanged = all(torch.equal(before[k], after[k]) for k in TRAINABLE)
            assert unchanged == (step in poisoned), step  # a skipped step changes nothing; the others do
    adam = torch.load(tmp_path / "checkpoint-6" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert {float(state["step"]) for state in adam.values()} == {6.0 - len(poisoned)}  # no optimizer step taken
    metrics = {line["step"]: line for line in read_metrics(tmp_path)}
    for step in poisoned:
        assert metrics[step]["loss"] is None
    assert metrics[6]["skipped_steps"] == len(poisoned)
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == len(poisoned)


# --- damaged checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoints") / "run"
    train(tiny_model(), tiny_examples(8), [], config(max_steps=3, save_every=1, save_total_limit=3), folder,
          pad_token_id=0, save_model=save_trainable, progress=False)
    return folder


def _torch_file(path: Path, value: Any) -> None:
    torch.save(value, path)


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign_optimizer(path: Path) -> None:
    states = torch.load(path, weights_only=True)
    states["optimizer"]["param_groups"][0]["params"] = [0]  # one parameter fewer than the run trains
    torch.save(states, path)


def _wrong_moment_shape(path: Path) -> None:
    states = torch.load(path, weights_only=True)
    states["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(states, path)


CORRUPTIONS = {
    "optimizer.pt truncated": ("optimizer.pt", _cut, "is truncated or damaged"),
    "optimizer.pt empty": ("optimizer.pt", lambda p: p.write_bytes(b""), "is truncated or damaged"),
    "optimizer.pt garbage": ("optimizer.pt", lambda p: p.write_bytes(b"\x80garbage" * 9), "is truncated or damaged"),
    "optimizer.pt a list": ("optimizer.pt", lambda p: _torch_file(p, [1, 2]), "does not hold the optimizer"),
    "optimizer.pt without scheduler": ("optimizer.pt", lambda p: _torch_file(p, {"optimizer": {}}),
                                       "does not hold the optimizer"),
    "optimizer.pt of other parameters": ("optimizer.pt", _foreign_optimizer, "does not fit this run's trainable"),
    "optimizer.pt moments of the wrong shape": ("optimizer.pt", _wrong_moment_shape, "does not hold the state of step"),
    "optimizer.pt of another step": ("optimizer.pt",
                                     lambda p: shutil.copy(p.parent.parent / "checkpoint-2" / p.name, p),
                                     "does not hold the state of step 3"),
    "optimizer.pt missing": ("optimizer.pt", lambda p: p.unlink(), "is missing"),
    "rng.pt missing": ("rng.pt", lambda p: p.unlink(), "is missing"),
    "rng.pt truncated": ("rng.pt", _cut, "is truncated or damaged"),
    "rng.pt without cpu state": ("rng.pt", lambda p: _torch_file(p, {"cuda": []}),
                                 "does not hold the random generators' state"),
    "rng.pt of the wrong size": ("rng.pt", lambda p: _torch_file(p, {"cpu": torch.zeros(3, dtype=torch.uint8)}),
                                 "does not hold the random generators' state"),
    "trainer_state.json garbage": ("trainer_state.json", lambda p: p.write_text("{not json"), "is not readable JSON"),
    "trainer_state.json empty": ("trainer_state.json", lambda p: p.write_text(""), "is not readable JSON"),
    "trainer_state.json not UTF-8": ("trainer_state.json", lambda p: p.write_bytes(b"\xff\xfe{"),
                                     "is not readable JSON"),
    "trainer_state.json deeply nested": ("trainer_state.json", lambda p: p.write_text("[" * 100000),
                                         "is not readable JSON"),
    "trainer_state.json a list": ("trainer_state.json", lambda p: p.write_text("[1, 2]"), "is not the trainer state"),
    "trainer_state.json without keys": ("trainer_state.json", lambda p: p.write_text("{}"), "is not the trainer state"),
    "trainer_state.json without config": ("trainer_state.json", lambda p: p.write_text('{"step": 3}'),
                                          "is not the trainer state"),
    "trainer_state.json of another step": ("trainer_state.json", lambda p: p.write_text('{"step": 2, "config": {}}'),
                                           "is not the trainer state"),
    "trainer_state.json step as text": ("trainer_state.json", lambda p: p.write_text('{"step": "3", "config": {}}'),
                                        "is not the trainer state"),
    "trainable.safetensors truncated": ("trainable.safetensors", _cut, "is truncated or damaged"),
    "trainable.safetensors empty": ("trainable.safetensors", lambda p: p.write_bytes(b""), "is truncated or damaged"),
    "trainable.safetensors missing": ("trainable.safetensors", lambda p: p.unlink(), "is missing"),
    "trainable.safetensors huge header": ("trainable.safetensors",
                                          lambda p: p.write_bytes((2**62).to_bytes(8, "little") + b"{}"),
                                          "is truncated or damaged"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_damaged_checkpoint_is_one_sentence_naming_the_file_and_the_earlier_checkpoint(case, three_checkpoints,
                                                                                         tmp_path):
    name, damage, problem = CORRUPTIONS[case]
    folder = tmp_path / "run"
    shutil.copytree(three_checkpoints, folder)
    damage(folder / "checkpoint-3" / name)
    model = tiny_model()
    with pytest.raises(DeltatuneError) as caught:
        train(model, tiny_examples(8), [], config(max_steps=3, save_every=1, save_total_limit=3), folder,
              pad_token_id=0, save_model=save_trainable, resume=True, progress=False)
    assert type(caught.value) is DeltatuneError
    assert str(caught.value).startswith(f"{folder / 'checkpoint-3' / name} {problem}")
    assert str(caught.value).endswith(f": move checkpoint-3 out of {folder} and run again with --resume to continue "
                                      "from checkpoint-2")
    assert "\n" not in str(caught.value)


def test_the_advice_works_and_without_an_earlier_checkpoint_it_says_start_over(three_checkpoints, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(three_checkpoints, folder)
    _cut(folder / "checkpoint-3" / "optimizer.pt")
    shutil.move(folder / "checkpoint-3", tmp_path / "checkpoint-3")  # as the message says
    result = train(tiny_model(), tiny_examples(8), [], config(max_steps=3, save_every=1, save_total_limit=3), folder,
                   pad_token_id=0, save_model=save_trainable, resume=True, progress=False)
    assert result.step == 3
    weights = load_file(str(folder / "checkpoint-3" / "trainable.safetensors"))
    assert_same_tensors(weights, load_file(str(three_checkpoints / "checkpoint-3" / "trainable.safetensors")))
    for older in ("checkpoint-1", "checkpoint-2"):
        shutil.rmtree(folder / older)
    (folder / "checkpoint-3" / "rng.pt").unlink()
    with pytest.raises(DeltatuneError, match=r"rng.pt is missing: no earlier checkpoint is left, so start over in a "
                                             r"new output folder \(or with --overwrite\)$"):
        train(tiny_model(), tiny_examples(8), [], config(max_steps=3), folder, pad_token_id=0,
              save_model=save_trainable, resume=True, progress=False)


def test_a_metrics_line_cut_by_a_crash_is_dropped_on_resume(tmp_path):
    settings = config(max_steps=4, save_every=2)
    train(tiny_model(), tiny_examples(8), [], settings, tmp_path, pad_token_id=0, save_model=save_trainable,
          progress=False)
    whole = [line["loss"] for line in read_metrics(tmp_path)]
    shutil.rmtree(tmp_path / "checkpoint-4")  # as if killed during step 4's save...
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 4, "lo')  # ...while a line was being appended
    train(tiny_model(), tiny_examples(8), [], settings, tmp_path, pad_token_id=0, save_model=save_trainable,
          resume=True, progress=False)
    assert [line["loss"] for line in read_metrics(tmp_path)] == whole


def test_resume_where_no_checkpoint_was_written_yet_starts_from_step_zero(tmp_path, capsys):
    class Crash(Exception):
        pass

    def crash(model, folder):
        raise Crash()

    with pytest.raises(Crash):
        train(tiny_model(), tiny_examples(8), [], config(max_steps=3), tmp_path / "split", pad_token_id=0,
              save_model=crash, progress=False)
    assert (tmp_path / "split" / "metrics.jsonl").is_file() and not list((tmp_path / "split").glob("checkpoint-*"))
    resumed, whole = tiny_model(), tiny_model()
    train(resumed, tiny_examples(8), [], config(max_steps=3), tmp_path / "split", pad_token_id=0,
          save_model=save_trainable, resume=True, progress=False)
    assert "holds no checkpoint yet: training starts from step 0" in capsys.readouterr().err
    train(whole, tiny_examples(8), [], config(max_steps=3), tmp_path / "whole", pad_token_id=0,
          save_model=save_trainable, progress=False)
    for name, parameter in whole.named_parameters():
        assert torch.equal(parameter, dict(resumed.named_parameters())[name]), name


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "interrupted"])
def test_resume_with_a_larger_max_steps_reaches_the_weights_of_a_run_that_never_stopped(finished, tmp_path, capsys):
    """A constant schedule does not depend on max_steps: 3 steps then 3 more are 6 steps, to the bit."""
    constant = dict(lr_schedule="constant", save_every=1 if not finished else 0)
    train(tiny_model(), tiny_examples(8), [], config(max_steps=3, **constant), tmp_path / "split", pad_token_id=0,
          save_model=save_trainable, progress=False)
    if not finished:  # as if stopped after step 2 of a 3-step run
        shutil.rmtree(tmp_path / "split" / "checkpoint-3")
    resumed, whole = tiny_model(), tiny_model()
    result = train(resumed, tiny_examples(8), [], config(max_steps=6, **constant), tmp_path / "split",
                   pad_token_id=0, save_model=save_trainable, resume=True, progress=False)
    assert result.step == 6 and "schedule" not in capsys.readouterr().err
    train(whole, tiny_examples(8), [], config(max_steps=6, **constant), tmp_path / "whole", pad_token_id=0,
          save_model=save_trainable, progress=False)
    for name, parameter in whole.named_parameters():
        assert torch.equal(parameter, dict(resumed.named_parameters())[name]), name
    logged = [[(line["step"], line["loss"], line["lr"]) for line in read_metrics(tmp_path / folder)]
              for folder in ("split", "whole")]
    assert logged[0] == logged[1]


def test_resume_with_a_larger_max_steps_stretches_a_decaying_schedule_and_says_so(tmp_path, capsys):
    train(tiny_model(), tiny_examples(8), [], config(max_steps=3, lr_schedule="linear"), tmp_path, pad_token_id=0,
          save_model=save_trainable, progress=False)
    train(tiny_model(), tiny_examples(8), [], config(max_steps=6, lr_schedule="linear"), tmp_path, pad_token_id=0,
          save_model=save_trainable, resume=True, progress=False)
    err = capsys.readouterr().err
    assert ("checkpoint-3 was trained towards max_steps=3 and this run goes to 6: the linear schedule continues as "
            "if laid out over 6 steps (step 4 at 0.5× the learning rate)") in err
    rates = {line["step"]: line["lr"] for line in read_metrics(tmp_path) if "lr" in line}
    base = config().learning_rate
    # steps 1-3 decayed over 3 steps; from step 4 on, 1 - (step - 1) / 6
    assert rates == pytest.approx({1: base, 2: base * 2 / 3, 3: base / 3, 4: base / 2, 5: base / 3, 6: base / 6})


def test_resume_with_a_max_steps_below_the_checkpoint_is_one_sentence(cli_run, capsys):
    before = snapshot(cli_run.folder)
    code = main(cli_run.args(cli_run.data, cli_run.folder, "--resume", "--max-steps", "1"))
    err = capsys.readouterr().err
    assert code == 1 and err.rstrip().endswith(
        "checkpoint-2 is at step 2, past this run's max_steps=1: set max_steps to at least 2 to continue it"), err
    assert snapshot(cli_run.folder) == before


# --- --resume refuses a changed setting that changes the result ------------------------------------


@dataclass
class CliRun:
    model: Path
    data: Path
    folder: Path

    def args(self, data: Path, output: Path, *extra: str) -> list[str]:
        return ["train", "--model", str(self.model), "--data", str(data), "--output", str(output), "--max-steps", "2",
                "--quiet", "batch_size=4", "rank=4", "targets=[q_proj,v_proj]", "save_every=1", *extra]


@pytest.fixture(scope="module")
def cli_run(model_folder, tmp_path_factory) -> CliRun:
    root = tmp_path_factory.mktemp("cli-run")
    run = CliRun(model_folder, write_data(root, rows=24), root / "run")
    assert main(run.args(run.data, run.folder)) == 0
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CHANGES = {  # the change, and what the refusal names
    "alpha": (["alpha=32"], "method.alpha=16.0 but this run has 32.0"),
    "dropout": (["dropout=0.1"], "method.dropout=0.0 but this run has 0.1"),
    "rslora": (["rslora=true"], "method.rslora=False but this run has True"),
    "rank": (["rank=8"], "method.rank=4 but this run has 8"),
    "targets": (["targets=[q_proj]"], "method.targets=['q_proj', 'v_proj'] but this run has ['q_proj']"),
    "eval_fraction": (["eval_fraction=0.2"], "eval_fraction=0.05 but this run has 0.2"),
    "max_length": (["max_length=64"], "max_length=512 but this run has 64"),
    "truncate": (["truncate=left"], "truncate='right' but this run has 'left'"),
    "packing": (["packing=true"], "packing=False but this run has True"),
    "learning_rate": (["learning_rate=5e-3"], "learning_rate=0.001 but this run has 0.005"),
    "seed": (["seed=3"], "seed=0 but this run has 3"),
    "eval_data": (["--eval-data", "{data}"], "eval_data=None but this run has '"),
    "dtype": (["dtype=bfloat16"], "dtype='auto' but this run has 'bfloat16'"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_resume_refuses_a_changed_setting_and_keeps_the_run_record(change, cli_run, capsys):
    extra, named = CHANGES[change]
    before = snapshot(cli_run.folder)
    code = main(cli_run.args(cli_run.data, cli_run.folder, *[e.format(data=cli_run.data) for e in extra], "--resume"))
    err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                  if not line.startswith("deltatune: warning:"))  # the data's own warnings come first
    assert code == 1, err
    assert err.startswith(f"deltatune: error: {cli_run.folder / 'checkpoint-2'} was trained with {named}"), err
    assert err.rstrip().endswith("resume with the same setting, or train in a new output folder")
    assert snapshot(cli_run.folder) == before  # deltatune_run.yaml and the checkpoints are untouched


@pytest.mark.parametrize("how", ["edited", "moved"])
def test_resume_refuses_a_changed_data_file(how, cli_run, tmp_path, capsys):
    before = snapshot(cli_run.folder)
    original = cli_run.data.read_bytes()
    data = cli_run.data if how == "edited" else tmp_path / "data.jsonl"
    data.write_bytes(original.replace(b"name", b"nam", 1) if how == "edited" else original)
    try:
        code = main(cli_run.args(data, cli_run.folder, "--resume"))
    finally:
        cli_run.data.write_bytes(original)
    err = capsys.readouterr().err
    assert code == 1 and f"checkpoint-2 was trained with data='{cli_run.data.resolve()} (" in err, err
    assert f"but this run has '{data.resolve()} (" in err and snapshot(cli_run.folder) == before


def test_resume_takes_changes_that_do_not_change_the_result(cli_run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(cli_run.folder, folder)
    changed = ["save_every=2", "eval_every=1", "log_every=1", "save_total_limit=5", "nan_policy=skip"]
    assert main(cli_run.args(cli_run.data, folder, *changed, "--resume")) == 0, capsys.readouterr().err
    assert "save_total_limit: 5" in (folder / "deltatune_run.yaml").read_text()
    assert_same_tensors(adapter(folder), adapter(cli_run.folder))


def test_a_damaged_checkpoint_through_the_cli_is_one_line_and_exit_1(cli_run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(cli_run.folder, folder)
    (folder / "checkpoint-2" / "trainer_state.json").write_text("[]")
    code = main(cli_run.args(cli_run.data, folder, "--resume"))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{folder / 'checkpoint-2' / 'trainer_state.json'} is not the trainer state" in err


# --- absurd numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, value", [
    ("seed", 1e30), ("seed", "1e30"), ("seed", 2**32), ("seed", -1), ("seed", "1e999"), ("max_steps", 1e30),
    ("batch_size", 10**12), ("gradient_accumulation_steps", 2**40), ("max_length", 1e30), ("eval_every", 2**63),
    ("save_every", -5), ("save_total_limit", 0), ("save_total_limit", 1e30), ("nan_policy", "ignore"),
    ("warmup_steps", 1e30), ("log_every", 0),
])
def test_absurd_training_numbers_are_one_sentence(setting, value):
    with pytest.raises(DeltatuneError, match=f"^{setting} ") as caught:
        build_run({"model": "m", "data": "d", "output": "o", setting: value})
    assert "\n" not in str(caught.value)


def test_an_absurd_seed_on_the_command_line_is_one_line_and_exit_1(tmp_path, capsys):
    code = main(["train", "--model", MODEL, "--data", str(write_data(tmp_path)), "--output", str(tmp_path / "o"),
                 "seed=1e30"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("deltatune: error: seed must be a whole number from 0 to 4294967295")
    assert not (tmp_path / "o").exists()


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
