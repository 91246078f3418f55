"""The loop's runtime seam: the single-process default changes nothing, and a data-parallel
runtime (two real processes over gloo) reaches the single-process result with the same loop."""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from deltatune.runtime import Runtime
from deltatune.train import train

from test_train import config, read_metrics, save_trainable, tiny_examples, tiny_model, weights


class DataParallelOverGloo(Runtime):
    """Plain data parallelism for the test: each process takes every other example of a batch and
    averages gradients with the others after the last micro-batch of a step."""

    @property
    def gradient_divisor(self) -> int:
        return self.world_size

    def shard(self, indices):
        return list(indices)[self.rank :: self.world_size]

    def all_sum(self, value: float) -> float:
        total = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)

    @contextmanager
    def accumulating(self, model, last):
        yield
        if last:
            for param in model.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= self.world_size

    def gather_objects(self, value):
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        dist.barrier()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def replica(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        model = tiny_model()
        train(model, tiny_examples(12), [], config(max_steps=3), Path(folder), pad_token_id=0,
              save_model=save_trainable, progress=False, runtime=DataParallelOverGloo(rank=rank, world_size=world_size))
        save_file(weights(model), str(Path(folder) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_the_default_runtime_changes_nothing(tmp_path):
    implicit, explicit = tiny_model(), tiny_model()
    train(implicit, tiny_examples(8), [], config(), tmp_path / "a", pad_token_id=0, save_model=save_trainable,
          progress=False)
    train(explicit, tiny_examples(8), [], config(), tmp_path / "b", pad_token_id=0, save_model=save_trainable,
          progress=False, runtime=Runtime(device=torch.device("cpu")))
    assert all(torch.equal(p, weights(explicit)[n]) for n, p in weights(implicit).items())


def test_metrics_record_peak_memory(tmp_path):
    train(tiny_model(), tiny_examples(4), [], config(max_steps=2), tmp_path, pad_token_id=0,
          save_model=save_trainable, progress=False)
    lines = [line for line in read_metrics(tmp_path) if "loss" in line]
    assert lines and all(line["cpu_peak_rss_mib"] > 0 for line in lines)


def test_two_processes_reach_the_single_process_weights(tmp_path):
    single = tiny_model()
    train(single, tiny_examples(12), [], config(max_steps=3), tmp_path / "single", pad_token_id=0,
          save_model=save_trainable, progress=False)
    folder = tmp_path / "parallel"
    folder.mkdir()
    mp.spawn(replica, args=(2, free_port(), str(folder)), nprocs=2, join=True)
    replicas = [load_file(str(folder / f"rank{rank}.safetensors")) for rank in range(2)]
    for name, param in weights(single).items():
        assert torch.equal(replicas[0][name], replicas[1][name]), f"the replicas disagree on {name}"
        # a different summation order of the same gradients: equal up to float rounding
        assert torch.allclose(replicas[0][name], param, atol=1e-6), name
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [1, 2, 3]  # written once, by the main process
    single_losses = [line["loss"] for line in read_metrics(tmp_path / "single")]
    assert all(abs(a["loss"] - b) < 1e-6 for a, b in zip(logged, single_losses))  # the loss over both processes
