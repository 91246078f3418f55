"""DDP and FSDP2 on two CPU processes (gloo) reach what one process reaches, step for step.

Invariants, with a global micro-batch of 4 examples (2 per process) against one process with
batch 4: the same loss at every step and the same saved weights (fp32; 1e-5, because the two
processes sum the same gradients in another order); a checkpoint written at world size 2 continues
at world size 1 (and one written at world size 1 at world size 2) to the weights of a run that never
stopped; a process that dies or hangs makes the other stop with one sentence; ``--nproc 2`` runs.

The processes take the backend the runtime picks: NCCL on a machine with two GPUs or more (the
same tests, on GPUs), gloo on the CPU otherwise. Every two-process scenario runs in one
``mp.spawn`` (module fixture ``parallel``): starting processes is the cost here, not the tiny
models.
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
from deltatune.methods import gated_mlp
from deltatune.pretrained import bundled
from deltatune.sharded_state import SHARDS, read_whole
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


def every_method() -> dict[str, object]:
    """The rest of the registry, each under the strategy it is checked with here."""
    return {
        "ddp-adapter": lambda: dt.wrap(tiny_llama(), dt.Adapter(bottleneck_size=8)),
        "fsdp-adapter": lambda: dt.wrap(tiny_llama(), dt.Adapter(bottleneck_size=8)),
        "ddp-prompt": lambda: dt.wrap(tiny_llama(), dt.PromptTuning(num_virtual_tokens=3)),
        "fsdp-prompt": lambda: dt.wrap(tiny_llama(), dt.PromptTuning(num_virtual_tokens=3)),
        "ddp-ptuning": lambda: dt.wrap(tiny_llama(), dt.PTuning(num_virtual_tokens=3, encoder_hidden_size=16)),
        "fsdp-ptuning": lambda: dt.wrap(tiny_llama(), dt.PTuning(num_virtual_tokens=3, encoder_hidden_size=16)),
        "ddp-ptuning-v2": lambda: dt.wrap(tiny_llama(), dt.PTuningV2(num_virtual_tokens=3)),
        "fsdp-ptuning-v2": lambda: dt.wrap(tiny_llama(), dt.PTuningV2(num_virtual_tokens=3)),
        "fsdp-prefix": prefix_model,
        "ddp-freeze": lambda: dt.wrap(tiny_llama(), dt.FreezeTuning(trainable_layers=1)),
        "fsdp-freeze": lambda: dt.wrap(tiny_llama(), dt.FreezeTuning(trainable_layers=1)),
        "ddp-full": full_model,
    }


def dropout_lora_model():
    return dt.wrap(tiny_llama(), dt.LoRA(**LORA, dropout=0.5))


# name: (strategy, model, training settings, where the run resumes from: None, or a checkpoint of another
# scenario, "single/<name>/checkpoint-N" or "parallel/<name>/checkpoint-N")
SCENARIOS = {
    "ddp-lora": ("ddp", lora_model, settings(gradient_accumulation_steps=2), None),
    "ddp-prefix": ("ddp", prefix_model, settings(), None),
    "ddp-qlora": ("ddp", qlora_model, settings(), None),
    "fsdp-lora": ("fsdp", lora_model, settings(gradient_accumulation_steps=2), None),
    "fsdp-full": ("fsdp", full_model, settings(learning_rate=1e-3), None),
    "fsdp-full-resumed": ("fsdp", full_model, settings(learning_rate=1e-3), "single/fsdp-full/checkpoint-2"),
    "fsdp-full-longer": ("fsdp", full_model, settings(learning_rate=1e-3, max_steps=6, lr_schedule="constant"), None),
    "fsdp-full-extended": ("fsdp", full_model, settings(learning_rate=1e-3, max_steps=6, lr_schedule="constant"),
                           "parallel/fsdp-full-constant/checkpoint-4"),
    "fsdp-full-constant": ("fsdp", full_model, settings(learning_rate=1e-3, lr_schedule="constant"), None),
    "ddp-dropout": ("ddp", dropout_lora_model, settings(), None),
    "ddp-dropout-resumed": ("ddp", dropout_lora_model, settings(), "parallel/ddp-dropout/checkpoint-2"),
} | {name: (name.split("-")[0], build, settings(learning_rate=1e-2 if name.endswith(("adapter", "prompt", "ptuning"))
                                                else 1e-3), None) for name, build in every_method().items()}
# P-Tuning v2 at 1e-3: some of its deep prompts' gradients nearly cancel over the batch, and AdamW scales
# the rounding of such a sum (the processes add in another order) up to a step of the learning rate's size.
# the order the two processes run them in: a resumed one after the run it starts from
ORDER = ["ddp-lora", "ddp-prefix", "ddp-qlora", "fsdp-lora", "fsdp-full", "fsdp-full-resumed", "fsdp-full-constant",
         "fsdp-full-extended", "fsdp-full-longer", "ddp-dropout", "ddp-dropout-resumed", *every_method()]
EVAL_EXAMPLES = 5  # batches of 4 and 1: under 2 processes one of them has nothing of the second


def run_once(name: str, folder: Path, runtime=None, resume: bool = False) -> None:
    _, build, config, _ = SCENARIOS[name]
    model = build()
    train(model, tiny_examples(12), tiny_examples(EVAL_EXAMPLES), config, folder, pad_token_id=0, save_model=dt.save,
          progress=False, runtime=runtime, resume=resume)


def replica(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    fused = fused_mlp_counter()
    for name in ORDER:
        strategy, build, config, resume_from = SCENARIOS[name]
        torch.manual_seed(0)
        model = build()
        runtime = start_runtime(strategy, model)
        if resume_from and resume_from.startswith("parallel/") and rank == 0:
            start = Path(root) / resume_from.removeprefix("parallel/")
            shutil.copytree(start, Path(root) / name / start.name)
        runtime.barrier()
        fused.clear()
        train(model, tiny_examples(12), tiny_examples(EVAL_EXAMPLES), config, Path(root) / name, pad_token_id=0,
              save_model=dt.save, progress=False, runtime=runtime, resume=resume_from is not None)
        (Path(root) / name / f"fused-mlp-calls-{rank}.txt").write_text(str(len(fused)))
    dist.destroy_process_group()


def fused_mlp_counter() -> list:
    """Counts the calls of the fused gated MLP (one entry each) from now on in this process."""
    calls, apply = [], gated_mlp.GatedMLP.apply

    def counted(*args):
        calls.append(None)
        return apply(*args)

    gated_mlp.GatedMLP.apply = counted
    return calls


@pytest.fixture(scope="module", autouse=True)
def backend():
    """The processes use NCCL where there is a GPU for each (the runtime's own choice), else gloo on the
    CPU: with one GPU, two processes would share it, which NCCL refuses, so the children do not see it."""
    hidden = torch.cuda.device_count() < 2 and "CUDA_VISIBLE_DEVICES" not in os.environ
    if hidden:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    yield
    if hidden:
        del os.environ["CUDA_VISIBLE_DEVICES"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """Each scenario that starts afresh, on one process with the whole batch of 4."""
    root = tmp_path_factory.mktemp("single")
    torch.manual_seed(0)
    for name, (_, _, _, resume_from) in SCENARIOS.items():
        if resume_from is None:
            run_once(name, root / name)
    return root


@pytest.fixture(scope="module")
def parallel(single, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parallel")
    for name, (_, _, _, resume_from) in SCENARIOS.items():
        if resume_from and resume_from.startswith("single/"):
            start = single / resume_from.removeprefix("single/")
            shutil.copytree(start, root / name / start.name)
    mp.spawn(replica, args=(free_port(), str(root)), nprocs=2, join=True)
    return root


def metrics(folder: Path, key: str) -> list[float]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


def losses(folder: Path) -> list[float]:
    return metrics(folder, "loss")


def trainer_tensors(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint of scenario ``name``: its trained weights and AdamW moments by name, whether whole
    tensors written by one process (trainable.safetensors, optimizer.pt) or every process's shards (shards/)."""
    if (checkpoint / SHARDS).is_dir():
        return read_whole(checkpoint)
    found = {f"weights.{key}": value for key, value in load_file(str(checkpoint / "trainable.safetensors")).items()}
    build = SCENARIOS[name][1]
    trained = [(key, p) for key, p in build().named_parameters() if p.requires_grad]
    order = [key for key, p in trained if p.ndim >= 2] + [key for key, p in trained if p.ndim < 2]  # AdamW's groups
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    for index, moments in state.items():
        found.update({f"optimizer.{order[index]}.{key}": value for key, value in moments.items()})
    return found


def saved_tensors(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: the method's artifact, and the trainer's weights and moments."""
    found = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        if path.name != "trainable.safetensors":
            found.update({f"{path.name}:{key}": value for key, value in load_file(str(path)).items()})
    return found | {f"trainer:{key}": value for key, value in trainer_tensors(checkpoint, name).items()}


def assert_same_weights(name: str, expected: Path, got: Path) -> None:
    want, have = saved_tensors(expected, name), saved_tensors(got, name)
    assert want and want.keys() == have.keys()
    assert any(key.startswith("trainer:optimizer.") and key.endswith(".exp_avg") for key in want)
    for key, tensor in want.items():
        assert have[key].abs().sum() > 0 or tensor.abs().sum() == 0, f"{key} was saved empty"
        # the same gradients summed in another order: equal up to float rounding
        assert torch.allclose(have[key], tensor, atol=1e-5, rtol=0), key


@pytest.mark.parametrize("name", ["ddp-lora", "ddp-prefix", "ddp-qlora", "fsdp-lora", "fsdp-full", *every_method()])
def test_two_processes_match_one_step_for_step(name, single, parallel):
    want, got = losses(single / name), losses(parallel / name)
    assert len(got) == len(want) == 4  # logged once, by rank 0
    assert got == pytest.approx(want, abs=1e-5)
    # evaluated before the first step and after the last, each process on its share of every batch
    want, got = metrics(single / name, "eval_loss"), metrics(parallel / name, "eval_loss")
    assert len(got) == len(want) == 2 and got == pytest.approx(want, abs=1e-5)
    assert_same_weights(name, single / name / "checkpoint-4", parallel / name / "checkpoint-4")


def test_the_fused_gated_mlp_runs_under_ddp_and_fsdp(parallel):
    """Sharded or replicated, a LoRA model's frozen MLPs keep g and u only (the memory saving holds);
    full fine-tuning trains the MLP weights, which the fused function leaves to the module's forward."""
    def calls(name: str) -> list[int]:
        return [int((parallel / name / f"fused-mlp-calls-{rank}.txt").read_text()) for rank in (0, 1)]

    for name in ("ddp-lora", "fsdp-lora", "ddp-prompt", "fsdp-prompt"):
        assert min(calls(name)) > 0, name
    assert calls("fsdp-full") == [0, 0]


def test_fsdp_saves_a_loadable_model_folder(parallel):
    config = json.loads((parallel / "fsdp-full" / "checkpoint-4" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # not FSDP's dynamic class


def test_fsdp_checkpoints_hold_every_process_s_own_shards_and_no_pickle(parallel, single):
    checkpoint = parallel / "fsdp-full" / "checkpoint-4"
    shards = sorted(path.name for path in (checkpoint / SHARDS).iterdir())
    assert shards == ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not (checkpoint / "trainable.safetensors").exists()
    # each process wrote about half of every weight (its rows), not a gathered copy
    sizes = [(checkpoint / SHARDS / name).stat().st_size for name in shards]
    whole = sum(tensor.numel() * 4 for tensor in trainer_tensors(single / "fsdp-full" / "checkpoint-4",
                                                                 "fsdp-full").values())
    assert all(0.3 * whole < size < 0.7 * whole for size in sizes), (sizes, whole)
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]["state"] == {}


@pytest.mark.parametrize("name", ["ddp-lora", "fsdp-full"])
def test_saved_at_world_size_2_resumes_at_world_size_1(name, single, parallel, tmp_path):
    shutil.copytree(parallel / name / "checkpoint-2", tmp_path / "checkpoint-2")
    run_once(name, tmp_path, resume=True)
    assert_same_weights(name, single / name / "checkpoint-4", tmp_path / "checkpoint-4")


@pytest.mark.parametrize("damage, named", [("missing", "is missing"), ("cut", "is truncated or damaged"),
                                           ("foreign", "is truncated or damaged")])
def test_a_damaged_shard_is_one_sentence_naming_it(damage, named, parallel, tmp_path):
    shutil.copytree(parallel / "fsdp-full" / "checkpoint-2", tmp_path / "checkpoint-2")
    shard = tmp_path / "checkpoint-2" / SHARDS / "shard-00002-model-00001-of-00001.safetensors"
    if damage == "missing":
        shard.unlink()
    elif damage == "cut":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shard.write_bytes(b"not a safetensors file")
    with pytest.raises(DeltatuneError) as caught:
        run_once("fsdp-full", tmp_path, resume=True)
    assert str(caught.value) == (f"{shard} {named}: no earlier checkpoint is left, so start over in a new output "
                                 "folder (or with --overwrite)")


def test_saved_at_world_size_1_resumes_at_world_size_2(single, parallel):
    assert_same_weights("fsdp-full", single / "fsdp-full" / "checkpoint-4",
                        parallel / "fsdp-full-resumed" / "checkpoint-4")


def test_a_finished_run_continues_to_a_larger_max_steps_at_any_world_size(single, parallel, tmp_path):
    # at world size 2: 4 steps, then 2 more, reach the weights of 6 steps at once
    assert_same_weights("fsdp-full-longer", parallel / "fsdp-full-longer" / "checkpoint-6",
                        parallel / "fsdp-full-extended" / "checkpoint-6")
    # at world size 1, from the shards that 2 processes wrote
    shutil.copytree(parallel / "fsdp-full-constant" / "checkpoint-4", tmp_path / "checkpoint-4")
    run_once("fsdp-full-longer", tmp_path, resume=True)
    assert_same_weights("fsdp-full-longer", single / "fsdp-full-longer" / "checkpoint-6", tmp_path / "checkpoint-6")


def test_every_process_resumes_its_own_dropout_stream(parallel):
    """With LoRA dropout, each process draws its own masks; a resumed run restores each process's
    generator, so it reaches the uninterrupted run's weights (with one shared state it would not)."""
    rng = torch.load(parallel / "ddp-dropout" / "checkpoint-2" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["cpu"], rng["ranks"][1]["cpu"])
    assert_same_weights("ddp-dropout", parallel / "ddp-dropout" / "checkpoint-4",
                        parallel / "ddp-dropout-resumed" / "checkpoint-4")
    want, got = losses(parallel / "ddp-dropout"), losses(parallel / "ddp-dropout-resumed")
    assert got == want[2:]  # the copied checkpoint came without the first steps' log


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
