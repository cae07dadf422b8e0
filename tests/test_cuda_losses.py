"""Every loss and the center regulariser on CUDA against float64 on the CPU (issue 14).

Forward + backward + an SGD step on the loss's parameters over a sequence of steps (Proxy-ISA's
crosses its memory and filter switches and wraps its memory around; VCPA's noise is recorded on
the device and replayed in the reference), in float32 and under bf16 / fp16 autocast: the loss
values, the gradients and every parameter and buffer. The ``cpu`` parameter runs the same
comparison at reduced sizes with float32 on the CPU; ``-m cuda`` runs the GPU check.
"""

from __future__ import annotations

import pytest
import torch
from cuda_helpers import (
    DEVICES,
    EQUALITY_CASES,
    MODES,
    TOL_FLOAT32,
    Case,
    compare_state,
    cpu_autocast_supports,
    equality,
    equality_cases,
    noise_tape,
    sizes_for,
)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", EQUALITY_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_loss_on_device_equals_float64_on_cpu(device, case, mode, record_property):
    device = torch.device(device)
    if device.type == "cpu" and mode != "float32" and not cpu_autocast_supports(MODES[mode]):
        pytest.skip(f"CPU autocast does not support {MODES[mode]} in this torch")
    sizes = sizes_for(device)
    result = equality(equality_cases(sizes)[case], mode, device, sizes)
    record_property("measured", result.measured())
    assert result.failures() == [], result.measured()
    assert result.state_errors  # every case has state (parameters at least)
    if case == "Proxy-ISA":  # the fixed-point class sums are compared as the sums they encode
        assert "memory_class_sums" in result.state_errors


class _DtypeDependent(torch.nn.Module):
    """A 'loss' that is wrong in float32 only: the equality check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4))

    def forward(self, embeddings, labels):
        offset = 1e-3 if embeddings.dtype != torch.float64 else 0.0
        return (embeddings.float().double().sum(1).mean() + offset) * self.weight.sum()


def test_equality_check_detects_a_wrong_computation():
    sizes = sizes_for("cpu")
    result = equality(Case(_DtypeDependent, sizes.steps), "float32", torch.device("cpu"), sizes)
    assert result.loss_error > TOL_FLOAT32
    assert any(line.startswith("loss ") for line in result.failures())


def test_compare_state_integer_buffers_must_match_exactly():
    from pml_proxies.losses import ProxyISALoss

    a = ProxyISALoss(3, 4, memory_size=5)
    b = ProxyISALoss(3, 4, memory_size=5)
    b.load_state_dict(a.state_dict())
    assert max(compare_state(a, b).values()) == 0.0
    b.memory_labels[0] = 1
    assert compare_state(a, b)["memory_labels"] == float("inf")


def test_noise_tape_replays_the_recorded_draws_and_restores_torch():
    normal, randn = torch.Tensor.normal_, torch.randn
    tape: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(3)
    with noise_tape(tape, replay=False):
        a = torch.empty(2, 3).normal_(generator=gen)
        b = torch.randn((4,), generator=gen)
        unrecorded = torch.randn(5)  # no generator: not recorded
    assert len(tape) == 2 and unrecorded.shape == (5,)
    with noise_tape(tape, replay=True):
        a2 = torch.empty(2, 3, dtype=torch.float64).normal_(generator=torch.Generator())
        b2 = torch.randn((4,), generator=torch.Generator(), dtype=torch.float64)
    assert tape == [] and a2.dtype == torch.float64
    assert torch.equal(a2.float(), a) and torch.equal(b2.float(), b)
    assert torch.Tensor.normal_ is normal and torch.randn is randn
