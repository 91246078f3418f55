"""deltatune.memory: byte counts in closed form on tiny modules, and the process peak's contract.

fp32 everywhere: 4 bytes an element. AdamW keeps, per trainable parameter tensor, exp_avg and
exp_avg_sq (each the parameter's size) and a 0-d float32 step counter (4 bytes).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.memory import MIB, MemoryBreakdown, PeakMemory, measure_training_step, unique_bytes

FLOAT = 4  # bytes per fp32 element
STEP_COUNTER = 4  # AdamW's 0-d float32 "step", one per parameter tensor
BATCH = 4


def adamw_bytes(trainable_elements: int, parameter_tensors: int) -> int:
    return 2 * trainable_elements * FLOAT + parameter_tensors * STEP_COUNTER


def one_step(model: nn.Module, inputs: torch.Tensor) -> tuple[MemoryBreakdown, torch.optim.Optimizer]:
    """Count one AdamW step of ``model`` on the loss sum(model(inputs)²)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    breakdown = measure_training_step(model, optimizer, lambda: model(inputs).square().sum().backward())
    return breakdown, optimizer


def features(width: int) -> torch.Tensor:
    return torch.randn(BATCH, width, generator=torch.Generator().manual_seed(0))


def test_unique_bytes_counts_each_storage_once():
    weight = torch.zeros(8, 16)
    assert unique_bytes([weight, weight.t(), weight[0], weight.view(-1)]) == 8 * 16 * FLOAT
    assert unique_bytes([weight[0]]) == 8 * 16 * FLOAT  # a view holds its whole storage
    assert unique_bytes([weight, torch.zeros(3, dtype=torch.float16)]) == 8 * 16 * FLOAT + 3 * 2
    assert unique_bytes([]) == 0


def test_linear_step_in_closed_form():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    breakdown, optimizer = one_step(layer, features(16))
    elements = 16 * 8 + 8
    assert breakdown.parameters == elements * FLOAT
    assert breakdown.gradients == elements * FLOAT
    assert breakdown.optimizer_state == adamw_bytes(elements, parameter_tensors=2)
    # autograd keeps the input x (for dW = gᵀx) and the output y (for d(y²) = 2y); it keeps no
    # weight, since x needs no gradient, and sum keeps nothing
    assert breakdown.activations == (BATCH * 16 + BATCH * 8) * FLOAT
    assert breakdown.total == (2 * elements * FLOAT + adamw_bytes(elements, 2) + (BATCH * 16 + BATCH * 8) * FLOAT)
    assert int(optimizer.state[layer.weight]["step"]) == 1  # the optimizer step was taken


def test_frozen_layer_has_no_gradient_or_optimizer_state():
    torch.manual_seed(0)
    frozen, trained = nn.Linear(16, 8).requires_grad_(False), nn.Linear(8, 4)
    breakdown, optimizer = one_step(nn.Sequential(frozen, trained), features(16))
    assert frozen.weight.grad is None and frozen.weight not in optimizer.state
    trainable = 8 * 4 + 4
    assert breakdown.parameters == (16 * 8 + 8 + trainable) * FLOAT  # frozen weights still take memory
    assert breakdown.gradients == trainable * FLOAT
    assert breakdown.optimizer_state == adamw_bytes(trainable, parameter_tensors=2)
    # nothing in the frozen layer needs a gradient, so it saves nothing; the trained layer saves
    # its input h (BATCH × 8), the square its input y (BATCH × 4)
    assert breakdown.activations == (BATCH * 8 + BATCH * 4) * FLOAT


def test_saved_weight_is_counted_as_a_parameter_not_an_activation():
    torch.manual_seed(0)
    breakdown, _ = one_step(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)), features(16))
    # the second layer also saves its weight (for dh = gW), which is already under parameters
    assert breakdown.activations == (BATCH * 16 + BATCH * 8 + BATCH * 4) * FLOAT


class TiedLM(nn.Module):
    """Embedding and output head share one weight, as in GPT-2 and tied Llamas."""

    def __init__(self, vocab: int = 10, hidden: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def test_tied_weight_counts_once():
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 3]])  # int64: 8 bytes an id
    breakdown, _ = one_step(TiedLM(), ids)
    assert breakdown.parameters == 10 * 4 * FLOAT
    assert breakdown.gradients == 10 * 4 * FLOAT
    assert breakdown.optimizer_state == adamw_bytes(10 * 4, parameter_tensors=1)
    # the embedding keeps the ids, the head its input h (3 × 4), the square the logits (3 × 10)
    assert breakdown.activations == 3 * 8 + (3 * 4 + 3 * 10) * FLOAT


def test_breakdown_to_dict_and_mib():
    breakdown = MemoryBreakdown(parameters=MIB, gradients=0, optimizer_state=2 * MIB, activations=MIB // 2)
    assert breakdown.total == 3 * MIB + MIB // 2
    assert breakdown.to_dict() == {"parameters": MIB, "gradients": 0, "optimizer_state": 2 * MIB,
                                   "activations": MIB // 2, "total": 3 * MIB + MIB // 2}
    assert breakdown.as_mib() == {"parameters": 1.0, "gradients": 0.0, "optimizer_state": 2.0,
                                  "activations": 0.5, "total": 3.5}
    assert json.loads(json.dumps(breakdown.to_dict())) == breakdown.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        breakdown.parameters = 0


def test_cpu_peak_is_rss_in_bytes_and_never_decreases():
    peak = PeakMemory("cpu")
    first = peak.peak_bytes()
    block = torch.ones(32 * MIB // FLOAT)  # 32 MiB, every page written
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    after = peak.peak_bytes()
    assert block.nbytes <= after <= physical  # bytes, not KiB: more than a 32 MiB tensor, less than the machine
    peak.reset()  # the CPU peak cannot be reset
    assert first <= after <= peak.peak_bytes()
    assert list(peak.as_mib()) == ["cpu_peak_rss_mib"]


def test_peak_memory_names_unsupported_devices():
    with pytest.raises(DeltatuneError, match="meta"):
        PeakMemory("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_count_equals_cpu_count_and_peak_covers_it():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    on_cpu, _ = one_step(layer, features(16))
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).cuda()
    peak = PeakMemory("cuda")
    on_cuda, _ = one_step(layer, features(16).cuda())
    assert on_cuda == on_cpu  # a count of storages, the same on every device
    # after the optimizer step, parameters, gradients and AdamW state are all alive on the GPU
    # (activations are freed by then; the step counters stay on the CPU unless fused/capturable)
    held_after_step = on_cuda.parameters + on_cuda.gradients + on_cuda.optimizer_state - 2 * STEP_COUNTER
    assert peak.peak_bytes() >= held_after_step
