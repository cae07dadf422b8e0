"""The components VCPA is built from, in their own modules: the closed-form Newton math
(``functional.vcpa_math``), the generator-state helpers (``utils.rng_state``) and the optimizer
hook that keeps ``proxy_std >= sigma_min`` (``hooks.std_projection``). Their behaviour inside the
loss is tested in test_vcpa.py and test_vcpa_options.py (through the names the loss's module
still exports)."""

from __future__ import annotations

import gc

import pytest
import torch

from pml_proxies.functional import vcpa_math
from pml_proxies.hooks import std_projection, track_for_projection
from pml_proxies.losses import vcpa_loss
from pml_proxies.utils import rng_state

MOVED = {
    vcpa_math: [
        "NORM_EPS",
        "NewtonBatch",
        "newton_batch",
        "proxy_anchor_newton_terms",
        "gaussian_kl",
        "expected_objective",
        "newton_update",
    ],
    rng_state: ["CUDA_STATE_BYTES", "check_generator_state", "generator_from_state"],
}


def test_the_loss_module_still_exports_what_moved():
    for module, names in MOVED.items():
        for name in names:
            assert getattr(vcpa_loss, name) is getattr(module, name), name
            assert name in vcpa_loss.__all__


def test_generator_from_state_resumes_a_cpu_state_exactly():
    generator = torch.Generator().manual_seed(3)
    torch.randn(5, generator=generator)
    state = generator.get_state()
    expected = torch.randn(4, generator=generator)
    resumed = rng_state.generator_from_state(state, torch.device("cpu"))
    assert torch.equal(torch.randn(4, generator=resumed), expected)


def test_a_cuda_state_seeds_a_cpu_generator_deterministically():
    state = torch.arange(rng_state.CUDA_STATE_BYTES, dtype=torch.uint8)
    other = state.clone()
    other[0] = 1
    draws = [
        torch.randn(3, generator=rng_state.generator_from_state(s, torch.device("cpu")))
        for s in (state, state, other)
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert rng_state.seed_from_state(state) == rng_state.seed_from_state(state.clone())
    assert 0 <= rng_state.seed_from_state(state) < 2**63


@pytest.mark.parametrize(
    "state, match",
    [
        (torch.zeros(3, dtype=torch.float32), "1-D uint8 generator state"),
        (torch.zeros(7, dtype=torch.uint8), "has 7 bytes"),
    ],
)
def test_check_generator_state_names_the_problem(state, match):
    with pytest.raises(ValueError, match=match):
        rng_state.check_generator_state(state, name="my_state")


class Bounded(torch.nn.Module):
    """Any module with a ``proxy_std`` Parameter and ``project_std_``."""

    def __init__(self) -> None:
        super().__init__()
        self.proxy_std = torch.nn.Parameter(torch.full((3,), 0.5))

    @torch.no_grad()
    def project_std_(self) -> None:
        self.proxy_std.clamp_(min=0.4)


def test_track_for_projection_projects_after_steps_of_optimizers_holding_the_parameter():
    module, other = Bounded(), torch.nn.Parameter(torch.zeros(3))
    track_for_projection(module)
    track_for_projection(module)  # idempotent
    holding = torch.optim.SGD(module.parameters(), lr=1.0)
    not_holding = torch.optim.SGD([other], lr=1.0)
    module.proxy_std.grad = torch.tensor([1.0, -1.0, 0.05])
    holding.step()
    assert module.proxy_std.tolist() == pytest.approx([0.4, 1.5, 0.45])
    with torch.no_grad():
        module.proxy_std[0] = 0.1
    other.grad = torch.ones(3)
    not_holding.step()  # another optimizer's step leaves the module alone
    assert module.proxy_std[0].item() == pytest.approx(0.1)
    del module
    gc.collect()
    assert all(not isinstance(m, Bounded) for m in std_projection._PROJECTED_LOSSES)
