"""Parity with what PML's own ``ProxyAnchorLoss`` test checks, for the losses that reduce to
Proxy-Anchor: ``MultiProxyAnchorLoss(K=1)`` and ``ProxyISALoss`` with both weightings "none".

PML's test compares its loss with the original Proxy-Anchor code on 180 2-D embeddings at angles
0..179 degrees (10 classes, labels 0..4, margin 0.5, alpha 32; alpha 1 in float16) and checks
``get_logits``. These tests check the same behaviours against a reference written here from the
formula, plus the documented differences (docs/losses.md, "PML parity")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pml_proxies.losses import MultiProxyAnchorLoss, ProxyISALoss

NUM_CLASSES, DIM, MARGIN = 10, 2, 0.5


def make(kind: str, alpha: float):
    if kind == "mpa_k1":
        return MultiProxyAnchorLoss(NUM_CLASSES, DIM, centers_per_class=1, margin=MARGIN,
                                    alpha=alpha)  # fmt: skip
    return ProxyISALoss(NUM_CLASSES, DIM, margin=MARGIN, alpha=alpha, memory_size=50,
                        positive_weighting="none", negative_weighting="none",
                        memory_start_epoch=1, filter_start_epoch=1)  # fmt: skip


def angle_embeddings(dtype):
    angles = torch.arange(180, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).to(dtype)


def reference(X, y, P, alpha):
    """Proxy-Anchor from its formula, one class at a time (as the original code's one-hot sums)."""
    x = X / X.norm(dim=1, keepdim=True)
    p = P / P.norm(dim=1, keepdim=True)
    cos = x @ p.t()
    pos = neg = 0
    present = 0
    for c in range(NUM_CLASSES):
        mine = y == c
        if mine.any():
            present += 1
            pos = pos + torch.log(1 + torch.exp(-alpha * (cos[mine, c] - MARGIN)).sum())
        neg = neg + torch.log(1 + torch.exp(alpha * (cos[~mine, c] + MARGIN)).sum())
    return pos / present + neg / NUM_CLASSES


@pytest.mark.parametrize("kind", ["mpa_k1", "isa_none"])
def test_loss_equals_the_formula_over_training_steps(kind, dtype):
    torch.manual_seed(0)
    loss = make(kind, alpha=32).to(dtype)
    gen = torch.Generator().manual_seed(1)
    X = angle_embeddings(dtype)
    for _ in range(3):  # Proxy-ISA: memory and filter on, state moving
        y = torch.randint(0, 5, (180,), generator=gen)
        X1 = X.clone().requires_grad_(True)
        value = loss(X1, y)
        value.backward()
        P = loss.proxies.detach().clone().requires_grad_(True)
        X2 = X.clone().requires_grad_(True)
        expected = reference(X2, y, P, 32)
        expected.backward()
        rtol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(value, expected, rtol=rtol, atol=0)
        scale = rtol * max(float(X2.grad.abs().max()), float(P.grad.abs().max()))
        torch.testing.assert_close(X1.grad, X2.grad, rtol=rtol, atol=scale)
        torch.testing.assert_close(loss.proxies.grad, P.grad, rtol=rtol, atol=scale)
        with torch.no_grad():
            loss.proxies -= 0.1 * loss.proxies.grad
        loss.proxies.grad = None


@pytest.mark.parametrize("kind", ["mpa_k1", "isa_none"])
def test_get_logits_are_the_cosines(kind, dtype):
    torch.manual_seed(0)
    loss = make(kind, alpha=32).to(dtype)
    X = angle_embeddings(dtype)
    expected = F.normalize(X) @ F.normalize(loss.proxies.detach()).t()
    logits = loss.get_logits(X).detach()
    if kind == "isa_none":  # normalise-then-multiply, as PML: the same floats
        assert torch.equal(logits, expected)
    else:  # MPA's fused cosine to many centers: equal up to float rounding
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(logits, expected, rtol=0, atol=4 * eps)


@pytest.mark.parametrize("kind", ["mpa_k1", "isa_none"])
def test_float16_inputs_give_the_float32_loss(kind):
    """PML's float16 case (alpha = 1): these losses compute in float32 and return float32, so
    the value is the float32 loss of the float16 inputs (PML returns a float16 loss)."""
    torch.manual_seed(0)
    loss = make(kind, alpha=1)
    X = angle_embeddings(torch.float16)
    y = torch.randint(0, 5, (180,), generator=torch.Generator().manual_seed(1))
    value = loss(X, y)
    assert value.dtype == torch.float32 and loss.proxies.dtype == torch.float32
    expected = reference(X.float(), y, loss.proxies.detach(), 1)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=0)
    assert loss.get_logits(X).dtype == torch.float32
