"""DDP and FSDP2 on two CPU processes (gloo) reach what one process reaches, step for step.

Invariants, with a global micro-batch of 4 examples (2 per process) against one process with
batch 4: the same loss at every step and the same saved weights (fp32; 1e-5, because the two
processes sum the same gradients in another order); a checkpoint written at world size 2 continues
at world size 1 (and one written at world size 1 at world size 2) to the weights of a run that never
stopped; a process that dies or hangs makes the other stop with one sentence; ``--nproc 2`` runs.

Every two-process scenario runs in one ``mp.spawn`` (module fixture ``parallel``): starting
processes is the cost here, not the tiny models.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import deltatune as dt
from deltatune.cli import main as cli_main
from deltatune.distributed import FSDPRuntime, shard_units, start_runtime, without_nproc
from deltatune.errors import DeltatuneError
from deltatune.pretrained import bundled
from deltatune.train import TrainConfig, train

from conftest import tiny_llama
from test_train import tiny_examples

LORA = dict(rank=4, targets=["q_proj", "v_proj"])


def lora_model():
    return dt.wrap(tiny_llama(), dt.LoRA(**LORA))


def prefix_model():
    return dt.wrap(tiny_llama(), dt.PrefixTuning(num_virtual_tokens=3, projection_hidden_size=16))


def qlora_model():
    return dt.wrap(tiny_llama(), dt.QLoRA(**LORA))


def full_model():
    return dt.wrap(tiny_llama(), dt.FullFineTuning())


def settings(**overrides) -> TrainConfig:
    base = dict(max_steps=4, batch_size=4, learning_rate=1e-2, eval_every=0, log_every=1, seed=1, save_every=2)
    return TrainConfig(**{**base, **overrides})


# name: (strategy, model, training settings, resume from a copied checkpoint)
SCENARIOS = {
    "ddp-lora": ("ddp", lora_model, settings(gradient_accumulation_steps=2), False),
    "ddp-prefix": ("ddp", prefix_model, settings(), False),
    "ddp-qlora": ("ddp", qlora_model, settings(), False),
    "fsdp-lora": ("fsdp", lora_model, settings(gradient_accumulation_steps=2), False),
    "fsdp-full": ("fsdp", full_model, settings(learning_rate=1e-3), False),
    "fsdp-full-resumed": ("fsdp", full_model, settings(learning_rate=1e-3), True),  # from a 1-process checkpoint
}


def run_once(name: str, folder: Path, runtime=None, resume: bool = False) -> None:
    _, build, config, _ = SCENARIOS[name]
    model = build()
    train(model, tiny_examples(12), [], config, folder, pad_token_id=0, save_model=dt.save, progress=False,
          runtime=runtime, resume=resume)


def replica(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    for name, (strategy, build, _, resume) in SCENARIOS.items():
        torch.manual_seed(0)
        model = build()
        runtime = start_runtime(strategy, model)
        _, _, config, _ = SCENARIOS[name]
        train(model, tiny_examples(12), [], config, Path(root) / name, pad_token_id=0, save_model=dt.save,
              progress=False, runtime=runtime, resume=resume)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """Each scenario on one process with the whole batch of 4."""
    root = tmp_path_factory.mktemp("single")
    torch.manual_seed(0)
    for name, (_, _, _, resume) in SCENARIOS.items():
        if not resume:
            run_once(name, root / name)
    return root


@pytest.fixture(scope="module")
def parallel(single, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parallel")
    (root / "fsdp-full-resumed").mkdir()
    shutil.copytree(single / "fsdp-full" / "checkpoint-2", root / "fsdp-full-resumed" / "checkpoint-2")
    mp.spawn(replica, args=(free_port(), str(root)), nprocs=2, join=True)
    return root


def losses(folder: Path) -> list[float]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def saved_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a checkpoint: the method's artifact and the trainer's weights."""
    found = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        found.update({f"{path.name}:{key}": value for key, value in load_file(str(path)).items()})
    return found


def assert_same_weights(expected: Path, got: Path) -> None:
    want, have = saved_tensors(expected), saved_tensors(got)
    assert want and want.keys() == have.keys()
    for key, tensor in want.items():
        assert have[key].abs().sum() > 0 or tensor.abs().sum() == 0, f"{key} was saved empty"
        # the same gradients summed in another order: equal up to float rounding
        assert torch.allclose(have[key], tensor, atol=1e-5, rtol=0), key


@pytest.mark.parametrize("name", ["ddp-lora", "ddp-prefix", "ddp-qlora", "fsdp-lora", "fsdp-full"])
def test_two_processes_match_one_step_for_step(name, single, parallel):
    want, got = losses(single / name), losses(parallel / name)
    assert len(got) == len(want) == 4  # logged once, by rank 0
    assert got == pytest.approx(want, abs=1e-5)
    assert_same_weights(single / name / "checkpoint-4", parallel / name / "checkpoint-4")


def test_fsdp_saves_a_loadable_model_folder(parallel):
    config = json.loads((parallel / "fsdp-full" / "checkpoint-4" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # not FSDP's dynamic class


@pytest.mark.parametrize("name", ["ddp-lora", "fsdp-full"])
def test_saved_at_world_size_2_resumes_at_world_size_1(name, single, parallel, tmp_path):
    shutil.copytree(parallel / name / "checkpoint-2", tmp_path / "checkpoint-2")
    run_once(name, tmp_path, resume=True)
    assert_same_weights(single / name / "checkpoint-4", tmp_path / "checkpoint-4")


def test_saved_at_world_size_1_resumes_at_world_size_2(single, parallel):
    assert_same_weights(single / "fsdp-full" / "checkpoint-4", parallel / "fsdp-full-resumed" / "checkpoint-4")


# --- a lost process -----------------------------------------------------------------------------


def doomed(rank: int, port: int, root: str, how: str) -> None:
    """Rank 1 dies (or hangs) before its second step; rank 0 writes what it raised."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DELTATUNE_DISTRIBUTED_TIMEOUT="8")
    torch.set_num_threads(1)
    from deltatune.data import collate

    calls = []

    def collate_or_fail(examples, pad):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            if how == "dies":
                os._exit(3)
            time.sleep(120)
        return collate(examples, pad)

    model = lora_model()
    try:
        train(model, tiny_examples(12), [], settings(save_every=0), Path(root) / "run", pad_token_id=0,
              save_model=dt.save, progress=False, runtime=start_runtime("ddp", model), collate_fn=collate_or_fail)
    except DeltatuneError as error:
        (Path(root) / f"rank{rank}.txt").write_text(str(error))
    os._exit(0)  # without waiting for the lost process


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_lost_process_stops_the_other_with_one_sentence(how, tmp_path):
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=doomed, args=(rank, port, str(tmp_path), how)) for rank in range(2)]
    started = time.monotonic()
    for process in processes:
        process.start()
    processes[0].join(timeout=90)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert processes[0].exitcode == 0, "rank 0 did not stop in time"
    message = (tmp_path / "rank0.txt").read_text()
    assert "process 0 of 2 lost the others" in message and "\n" not in message
    assert time.monotonic() - started < 90


# --- without a process group ----------------------------------------------------------------------


def test_units_split_where_dtypes_mix():
    model = dt.wrap(tiny_llama().to(torch.bfloat16), dt.LoRA(**LORA))
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 factors on a bf16 base
    units = shard_units(model)
    for unit in units:
        own = {id(p): p for p in unit.parameters()}
        inner = {id(p) for u in units if u is not unit and any(u is m for m in unit.modules()) for p in u.parameters()}
        assert len({p.dtype for key, p in own.items() if key not in inner}) <= 1
    assert units[-1] is model


def test_fsdp_refuses_a_quantised_base_with_one_sentence():
    with pytest.raises(DeltatuneError, match="strategy=fsdp cannot shard .* use strategy=ddp"):
        FSDPRuntime(rank=0, world_size=2).place(qlora_model())


def test_nproc_is_taken_out_of_the_relaunched_command():
    assert without_nproc(["train", "--nproc", "2", "--quiet", "--nproc=3", "rank=4"]) == ["train", "--quiet", "rank=4"]


def test_an_unknown_strategy_is_one_sentence(tmp_path):
    with pytest.raises(DeltatuneError, match="strategy 'zero3' is unknown"):
        dt_config = __import__("deltatune.config", fromlist=["build_run"])
        dt_config.build_run({"model": "m", "data": "d", "output": str(tmp_path), "strategy": "zero3"})


def test_nproc_2_trains_from_the_command_line(tmp_path):
    rows = bundled("e2e/train.jsonl").read_text().splitlines()[:24]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    output = tmp_path / "run"
    code = cli_main(["train", "--nproc", "2", "--model", str(bundled("stories260K")), "--data", str(data),
                     "--output", str(output), "--max-steps", "2", "--quiet", "rank=4", "batch_size=4",
                     "eval_fraction=0.1"])
    assert code == 0
    assert load_file(str(output / "adapter_model.safetensors"))
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer
