"""Every loss of the package under ``torch.compile``: a few training steps of a compiled copy give
the eager loss values, gradients and state (before the fix, Proxy-ISA failed at the first backward
with "modified by an inplace operation": the compiled backward recomputed its weights from the
``effective_numbers`` buffer, which the step's state commit had already overwritten).

Backend ``aot_eager``: AOT autograd traces, functionalises and partitions forward and backward as
inductor does (the failure above needs it; ``backend="eager"`` never reached it), then runs the
graphs with eager kernels, so a test costs seconds instead of inductor's C++ compilation (about
40 s for Proxy-ISA alone on 2 cores).
"""

import copy

import pytest
import torch

from pml_proxies.losses import (
    AllPairsMultiProxyAnchorLoss,
    DataWiseMultiProxyAnchorLoss,
    MultiProxyAnchorLoss,
    ProxyISALoss,
    VCPALoss,
)
from pml_proxies.regularizers import IntraClassCenterRegularizer

C, D, B, STEPS = 4, 8, 12, 3

LOSSES = {
    # memory and filter on from the first epoch: the per-class weights and the state commit run
    "proxy_isa": lambda: ProxyISALoss(
        C, D, memory_size=16, memory_start_epoch=1, filter_start_epoch=1
    ),
    "mpa": lambda: MultiProxyAnchorLoss(C, D, centers_per_class=3),
    "mpa_dw": lambda: DataWiseMultiProxyAnchorLoss(C, D, centers_per_class=3),
    "mpa_ap": lambda: AllPairsMultiProxyAnchorLoss(C, D, centers_per_class=3),
    "vcpa": lambda: VCPALoss(C, D, newton_steps=2, seed=0),
    "vcpa_trained": lambda: VCPALoss(C, D, newton_steps=0, seed=0),
}


# Tolerances in units in the last place (ulps) of the compared tensor's largest magnitude. The
# compiled graphs run the same kernels on functionalised (out-of-place) ops, but may order some
# float operations differently: measured at most 1 ulp for every loss (3 seeds, both dtypes) but
# VCPA with Newton steps, where a 1-ulp difference is amplified (exponents scaled by alpha = 32,
# the Hessian Q - G^2 a difference of nearly equal terms, divided through by tau): measured up to
# ~3,400 ulps (1e-4 relative in float32, 1e-12 in float64) with AVX-512 kernels, and in float64
# up to ~9e4 ulps (2e-11 relative) with torch, oneDNN and MKL held to AVX2 (.ci/test's matrix):
# how much the steps amplify depends on the kernels' rounding, so VCPA's float64 bound is 2^22
# ulps (1e-9 relative). A wrong value differs by O(1).
ULPS = {"default": 16, "vcpa": 2**14}
ULPS_FLOAT64 = {"vcpa": 2**22}


def batches(dtype):
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        embeddings = torch.randn(B, D, generator=gen, dtype=dtype)
        yield embeddings, torch.arange(B) % C


def run(loss, dtype):
    """Loss values and gradients (embeddings, then the loss's parameters) of the steps."""
    values, grads = [], []
    for embeddings, labels in batches(dtype):
        embeddings.requires_grad_(True)
        value = loss(embeddings, labels)
        params = list(loss.parameters())
        grads.append(torch.autograd.grad(value, [embeddings, *params]))
        values.append(value.detach())
    return values, grads


def assert_close(got, want, ulps, what):
    """``got`` within ``ulps`` units in the last place of ``want``'s largest magnitude."""
    bound = ulps * torch.finfo(want.dtype).eps * max(float(want.abs().max()), 1e-30)
    diff = float((got - want).abs().max())
    assert diff <= bound, f"{what}: max difference {diff:.3g} > {bound:.3g} ({ulps} ulps)"


def assert_close_runs(eager, compiled, ulps):
    for step, (got, want) in enumerate(zip(compiled[0], eager[0])):
        assert_close(got, want, ulps, f"loss at step {step}")
    for step, (got, want) in enumerate(zip(compiled[1], eager[1])):
        for index, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, ulps, f"gradient {index} at step {step}")


def assert_same_state(eager, compiled, ulps):
    eager, compiled = eager.state_dict(), compiled.state_dict()
    assert compiled.keys() == eager.keys()
    for key, want in eager.items():
        got = compiled[key]
        if want.is_floating_point():
            assert_close(got, want, ulps, key)
        else:
            assert torch.equal(got, want), key


@pytest.mark.parametrize("name", list(LOSSES))
def test_compiled_loss_matches_eager(name, dtype):
    torch._dynamo.reset()
    torch.manual_seed(0)  # the proxies' initialisation
    eager = LOSSES[name]().to(dtype)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager")
    ulps = ULPS.get(name, ULPS["default"])
    if dtype == torch.float64:
        ulps = ULPS_FLOAT64.get(name, ulps)
    assert_close_runs(run(eager, dtype), run(compiled, dtype), ulps)
    assert_same_state(eager, twin, ulps)  # the state the compiled steps committed


def test_compiled_center_regularizer_matches_eager(dtype):
    torch._dynamo.reset()
    regularizer = IntraClassCenterRegularizer(3)
    centers = torch.randn(C * 3, D, dtype=dtype, generator=torch.Generator().manual_seed(0))
    values = []
    for module in (regularizer, torch.compile(IntraClassCenterRegularizer(3), backend="aot_eager")):
        weights = centers.clone().requires_grad_(True)
        value = module(weights)
        values.append((value.detach(), torch.autograd.grad(value, weights)[0]))
    for got, want in zip(values[1], values[0]):
        assert_close(got, want, ULPS["default"], "regulariser")
