"""Training on several processes: DDP and FSDP2 runtimes on PyTorch's own engine.

    torchrun --nproc_per_node 8 -m deltatune train --config run.yaml            (DDP)
    torchrun --nproc_per_node 8 -m deltatune train --config run.yaml strategy=fsdp
    deltatune train --nproc 2 --config run.yaml     (one machine: launches torchrun itself)

The one training loop (``deltatune.train``) meets the other processes only through the
``Runtime`` seam (``deltatune.runtime``). Under torchrun (``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set) :func:`start_runtime` joins the process group — gloo on CPU, NCCL on GPUs —
and returns one of the two runtimes here; without torchrun it returns the single-process
``Runtime()``, which changes nothing.

``ddp``   every process holds the whole model; ``DistributedDataParallel`` averages the
          trainable parameters' gradients in buckets during backward. Frozen weights and buffers
          are left out of DDP: every process loaded the same base from disk, so nothing of it is
          broadcast (a 4-bit QLoRA base included).
``fsdp``  FSDP2 (``torch.distributed.fsdp.fully_shard``): every parameter, frozen or trained,
          is cut into W shards along its first dimension and gathered one unit at a time for
          forward and backward; gradients are reduce-scattered and the optimizer steps on its
          shard, so AdamW's state is sharded too. A unit is each block of a ``ModuleList`` (the
          transformer layers), then the root for the rest. FSDP2 gathers a unit as one buffer
          of one dtype: a unit mixing dtypes (a bf16 base with fp32 LoRA factors) is split into
          one unit per module that owns parameters. Frozen and trained parameters may share a
          unit (FSDP2 reduces only the gradients that exist).
``auto``  (default) DDP while one device holds the model's weights, gradients and AdamW state
          with room left for activations; otherwise FSDP2. On CPU: DDP.

What the loop relies on, the same for both: a micro-batch of ``batch_size`` examples is the
global one, and process r takes its examples r, r+W, r+2W, ... (``shard``), so W processes read
exactly what one process reads; the loss is weighed by label tokens summed over every process
(``all_sum``) and multiplied back by W (``gradient_divisor``) because DDP and FSDP2 average; the
gradient sync waits for the last micro-batch of a step (``no_sync``,
``set_requires_gradient_sync``). The saved adapter or model holds whole tensors, written once by
rank 0. A checkpoint's trainer state (trained weights, AdamW's moments) is whole tensors written by
rank 0 under DDP, and under FSDP2 every process's own shards (``torch.distributed.checkpoint``,
``deltatune.sharded_state``); either continues at any world size. A process that dies or stops answering
makes the others stop within ``DELTATUNE_DISTRIBUTED_TIMEOUT`` seconds (default 600) with one
sentence, instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.runtime import Runtime

STRATEGIES = ("auto", "ddp", "fsdp")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TIMEOUT_VARIABLE = "DELTATUNE_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
# auto: DDP while weights, gradients and AdamW state take at most this share of one device
DDP_MEMORY_SHARE = 0.5


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or anything that sets its variables)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a process on its own: the one that prints and writes."""
    return os.environ.get("RANK", "0") == "0"


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DeltatuneError(f"{TIMEOUT_VARIABLE}={text!r} is not a number of seconds above 0: set it like "
                             f"{TIMEOUT_VARIABLE}=600")
    return seconds


def start_runtime(strategy: str, model: nn.Module) -> Runtime:
    """The runtime for this process: DDP or FSDP2 under torchrun with more than one process
    (joining the process group here), else the single-process ``Runtime()``."""
    if strategy not in STRATEGIES:
        raise DeltatuneError(f"strategy {strategy!r} is unknown: use one of {', '.join(STRATEGIES)}")
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Runtime()
    rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    seconds = timeout_s()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=seconds),
                                    device_id=device if cuda else None)
        except (RuntimeError, ValueError) as error:
            raise DeltatuneError(f"process {rank} could not join the other {world_size - 1} processes within "
                                 f"{seconds:.0f} s ({_first_line(error)}): check that every process started, "
                                 f"and the --rdzv-endpoint / MASTER_ADDR:MASTER_PORT") from None
    if strategy == "auto":
        strategy = "ddp" if fits_one_device(model, device) else "fsdp"
    runtime_class = DDPRuntime if strategy == "ddp" else FSDPRuntime
    runtime = runtime_class(device=device, rank=rank, world_size=world_size, timeout_s=seconds)
    runtime.barrier()  # every process has checked the output folder before rank 0 writes into it
    return runtime


def finish_runtime(runtime: Runtime) -> None:
    """Wait for every process, then leave the process group (nothing to do for one process)."""
    if isinstance(runtime, DistributedRuntime) and dist.is_initialized():
        runtime.barrier()
        dist.destroy_process_group()


def fits_one_device(model: nn.Module, device: torch.device) -> bool:
    """Whether the weights of ``model`` and, for the trained ones, a gradient and AdamW's two moments
    (each in the parameter's dtype) take at most ``DDP_MEMORY_SHARE`` of ``device``: the ``auto``
    strategy's choice of DDP over FSDP2."""
    if device.type != "cuda":
        return True
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    trained = sum(3 * p.numel() * p.element_size() for p in params if p.requires_grad)
    return weights + trained <= DDP_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``deltatune <argv>`` as ``nproc`` processes on this machine with torchrun; their exit status."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise DeltatuneError(f"--nproc must be a whole number of at least 1, got {nproc!r}: pass e.g. --nproc 2")
    if under_torchrun():
        raise DeltatuneError("--nproc starts torchrun itself, and this process already runs under torchrun: "
                             "leave --nproc out")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "deltatune", *without_nproc(argv)]
    return subprocess.run(command, check=False).returncode


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (or ``--nproc=N``)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


@dataclass
class DistributedRuntime(Runtime):
    """What DDP and FSDP2 share: the data split, the sums, the barrier, and turning a lost
    process into one sentence."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    _wrapped: nn.Module | None = field(default=None, repr=False)

    @property
    def gradient_divisor(self) -> int:
        return self.world_size  # DDP and FSDP2 average gradients over the processes

    def shard(self, indices: Sequence[int]) -> Sequence[int]:
        if len(indices) < self.world_size:
            raise DeltatuneError(f"batch_size {len(indices)} is smaller than the {self.world_size} processes, so some "
                                 f"would get no examples: set batch_size to at least {self.world_size} (it is the "
                                 "micro-batch of all processes together)")
        return list(indices)[self.rank :: self.world_size]

    def all_sum(self, value: float) -> float:
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        with self.meeting("summing the step's token counts and losses"):
            dist.all_reduce(total)
        return float(total)

    def broadcast(self, value: Any) -> Any:
        box = [value]
        with self.meeting("sharing the checkpoint's folder"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        with self.meeting("gathering every process's random generators"):
            dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        with self.meeting("waiting for every process"):
            if dist.get_backend() == "gloo":  # names the ranks that did not arrive
                dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s))
            else:
                dist.barrier(device_ids=[self.device.index])

    @contextmanager
    def meeting(self, what: str) -> Iterator[None]:
        """Turn the error of a collective whose partner is gone into one sentence."""
        try:
            yield
        except DeltatuneError:
            raise
        except (dist.DistError, RuntimeError) as error:
            if not _is_lost_process(error):
                raise
            raise DeltatuneError(
                f"process {self.rank} of {self.world_size} lost the others while {what}: another process stopped or "
                f"did not answer within {self.timeout_s:.0f} s ({_first_line(error)}); its own error is above — fix "
                "it and start again (--resume continues from the newest checkpoint)") from None

    def place(self, model: nn.Module) -> torch.device:
        model.to(self.device)
        return self.device


def _is_lost_process(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(sign in text for sign in ("connection closed", "connection reset", "timed out", "timeout",
                                         "broken pipe", "gloo", "nccl", "socket"))


@dataclass
class DDPRuntime(DistributedRuntime):
    """Every process holds the whole model; ``DistributedDataParallel`` averages the trainable
    parameters' gradients during backward."""

    def place(self, model: nn.Module) -> torch.device:
        super().place(model)
        # Frozen weights and buffers are the same on every process (each loaded the same base):
        # DDP leaves them alone, so a 4-bit base is never broadcast and no buffer is re-sent each step.
        left_out = [name for name, p in model.named_parameters() if not p.requires_grad]
        left_out += [name for name, _ in model.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, left_out)
        with self.meeting("wrapping the model in DistributedDataParallel"):
            # find_unused_parameters: a method whose trained tensor skips a step (an unused
            # prompt encoder, a LoRA on a layer the input never reaches) still syncs.
            self._wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        return self.device

    def replica(self, model: nn.Module) -> nn.Module:
        return self._wrapped if self._wrapped is not None else model

    @contextmanager
    def accumulating(self, model: nn.Module, last: bool) -> Iterator[None]:
        skip_sync = self._wrapped.no_sync() if (self._wrapped is not None and not last) else nullcontext()
        with self.meeting("syncing gradients"), skip_sync:
            yield


@dataclass
class FSDPRuntime(DistributedRuntime):
    """FSDP2: each process keeps 1/W of every parameter, gradient and optimizer moment, and writes
    its shards of the trained weights and moments into checkpoints itself."""

    sharded_checkpoints = True

    def place(self, model: nn.Module) -> torch.device:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        for name, param in model.named_parameters():
            if type(param.data) is not torch.Tensor:  # a tensor subclass: torchao's NF4 (QLoRA), say
                raise DeltatuneError(f"strategy=fsdp cannot shard {name}, a {type(param.data).__name__} (a quantised "
                                     "base such as QLoRA's NF4): use strategy=ddp for this method")
        super().place(model)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        with self.meeting("sharding the model"):
            for unit in shard_units(model):
                fully_shard(unit, mesh=mesh)
        return self.device

    @contextmanager
    def accumulating(self, model: nn.Module, last: bool) -> Iterator[None]:
        model.set_requires_gradient_sync(last)  # without it, gradients stay whole and local until the last
        with self.meeting("syncing gradients"):
            yield

    @contextmanager
    def whole(self, model: nn.Module) -> Iterator[None]:
        """On the main process, each sharded parameter is swapped for its whole value (on the CPU)
        while inside, then back; the others take part in gathering and keep nothing. FSDP2's own
        ``unshard`` would not do: its state-dict hook puts the shards back."""
        from torch.distributed.tensor import DTensor

        whole: dict[int, nn.Parameter] = {}
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        with self.meeting("gathering the model's weights"):
            for module in model.modules():
                for name, param in list(module._parameters.items()):
                    if not isinstance(param, DTensor):
                        continue
                    if id(param) not in whole:  # a tied parameter is gathered once, on every process alike
                        value = param.detach().full_tensor().to("cpu")  # one tensor at a time on the device
                        whole[id(param)] = nn.Parameter(value if self.is_main else value.new_empty(0),
                                                        requires_grad=param.requires_grad)
                    swapped.append((module, name, param))
        if not self.is_main:
            swapped = []
        try:
            for module, name, param in swapped:
                module._parameters[name] = whole[id(param)]
            yield
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        optimizer.load_state_dict(state)  # whole tensors; each process keeps its shard of them
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not isinstance(param, DTensor):
                    continue
                moments = optimizer.state.get(param, {})
                for key, value in moments.items():
                    if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                        moments[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                                         src_data_rank=None)

    def release(self, model: nn.Module) -> None:
        """FSDP2 keeps the root unit's weights gathered after a forward (a backward would need them next):
        after an evaluation, which has none, put them back into shards."""
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def distribute(self, parameters: Mapping[str, torch.Tensor],
                   full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor, distribute_tensor

        laid_out = {}
        for name, tensor in full.items():
            param = parameters.get(name)
            if isinstance(param, DTensor) and tuple(tensor.shape) == tuple(param.shape):
                tensor = distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh, param.placements,
                                           src_data_rank=None)  # every process read the same file: no broadcast
            laid_out[name] = tensor
        return laid_out


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules to ``fully_shard``, innermost first: each block of a ``ModuleList`` (a
    transformer layer), then ``model`` itself for the rest. A unit whose parameters mix dtypes
    becomes one unit per module owning parameters inside it; parameters shared by several
    modules (tied embeddings) stay with the enclosing unit."""
    blocks = {id(block) for module in model.modules() if isinstance(module, nn.ModuleList) for block in module}
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    claimed: set[int] = set()
    units: list[nn.Module] = []

    def pending(module: nn.Module, recurse: bool = True) -> list[nn.Parameter]:
        found = {id(p): p for p in module.parameters(recurse=recurse) if id(p) not in claimed}
        return list(found.values())

    def claim(module: nn.Module, params: list[nn.Parameter]) -> None:
        units.append(module)
        claimed.update(id(p) for p in params)

    def add(module: nn.Module, path: str) -> None:
        params = pending(module)
        if len({p.dtype for p in params}) > 1:
            for inner_path, inner in _post_order(module, path):
                own = pending(inner, recurse=False)
                if inner is not module and own and all(owners[id(p)] == 1 for p in own):
                    if len({p.dtype for p in own}) > 1:
                        raise DeltatuneError(_mixed_dtypes(inner_path, own))
                    claim(inner, own)
            params = pending(module)
            if len({p.dtype for p in params}) > 1:
                raise DeltatuneError(_mixed_dtypes(path, params))
        if params or module is model:
            claim(module, params)

    for path, module in _post_order(model, ""):
        if id(module) in blocks or module is model:
            add(module, path)
    return units


def _post_order(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{path}.{name}" if path else name)
    yield path, module


def _mixed_dtypes(path: str, params: Sequence[torch.Tensor]) -> str:
    dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in params}))
    return (f"strategy=fsdp cannot shard {path or 'the model'}: its own parameters mix dtypes ({dtypes}) and FSDP2 "
            "gathers them as one buffer; load the model in one dtype (dtype=float32) or use strategy=ddp")
