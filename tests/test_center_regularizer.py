"""IntraClassCenterRegularizer (MPA paper eq. 3) against independent references."""

import math

import pytest
import torch
from conftest import tolerances
from pytorch_metric_learning.losses import SoftTripleLoss
from pytorch_metric_learning.regularizers import SparseCentersRegularizer

from pml_proxies.regularizers import IntraClassCenterRegularizer


def naive_center_regularizer(weights, num_classes, k, eps=0.0):
    """Eq. 3 with plain loops: sum_c sum_{t<s} sqrt(2 - 2 w_cs.w_ct) / (C K (K-1))."""
    total = weights.new_zeros(())
    for c in range(num_classes):
        for t in range(k):
            for s in range(t + 1, k):
                w_t = weights[c * k + t] / weights[c * k + t].norm()
                w_s = weights[c * k + s] / weights[c * k + s].norm()
                total = total + torch.sqrt(2 - 2 * torch.dot(w_s, w_t) + eps)
    return total / (num_classes * k * (k - 1))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_equals_naive_loop(dtype, k):
    torch.manual_seed(0)
    num_classes, dim = 4, 6
    weights = torch.randn(num_classes * k, dim, dtype=dtype, requires_grad=True)
    reg = IntraClassCenterRegularizer(k)
    out = reg(weights)
    ref = naive_center_regularizer(weights, num_classes, k, eps=reg.eps)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    (g,) = torch.autograd.grad(out, weights)
    (g_ref,) = torch.autograd.grad(ref, weights)
    torch.testing.assert_close(g, g_ref, rtol=rtol * 10, atol=atol * 10)


def test_zero_for_one_center(dtype):
    weights = torch.randn(7, 5, dtype=dtype, requires_grad=True)
    out = IntraClassCenterRegularizer(1)(weights)
    assert out.item() == 0.0
    out.backward()  # differentiable, zero gradient
    assert torch.count_nonzero(weights.grad) == 0


def test_zero_for_identical_centers_with_finite_gradient():
    base = torch.randn(3, 1, 8, dtype=torch.float64)
    weights = base.expand(3, 4, 8).reshape(12, 8).clone().requires_grad_(True)
    out = IntraClassCenterRegularizer(4)(weights)
    assert out.item() < 1e-3  # only sqrt(eps) per pair
    out.backward()
    assert torch.isfinite(weights.grad).all()


@pytest.mark.parametrize("k", [2, 4])
def test_matches_pml_sparse_centers_regularizer(dtype, k):
    torch.manual_seed(1)
    num_classes, dim = 5, 8
    weights = torch.randn(num_classes * k, dim, dtype=dtype, requires_grad=True)
    ours = IntraClassCenterRegularizer(k, eps=0.0)(weights)
    pml = SparseCentersRegularizer(num_classes, k)(weights)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(ours, pml, rtol=rtol * 10, atol=atol * 10)
    (g,) = torch.autograd.grad(ours, weights)
    (g_pml,) = torch.autograd.grad(pml, weights)
    torch.testing.assert_close(g, g_pml, rtol=rtol * 100, atol=atol * 100)


def test_gradcheck():
    torch.manual_seed(2)
    weights = torch.randn(3 * 3, 4, dtype=torch.float64, requires_grad=True)
    reg = IntraClassCenterRegularizer(3)
    assert torch.autograd.gradcheck(reg, (weights,))


def test_non_contiguous_class_major_rows():
    """SoftTripleLoss hands ``fc.t()`` (a transposed, non-contiguous view)."""
    torch.manual_seed(3)
    fc = torch.randn(6, 4 * 3, dtype=torch.float64)
    out = IntraClassCenterRegularizer(3)(fc.t())
    torch.testing.assert_close(out, naive_center_regularizer(fc.t(), 4, 3, eps=1e-8))


def test_inside_soft_triple_loss(dtype):
    torch.manual_seed(4)
    num_classes, k, dim, batch = 5, 3, 8, 12
    tau = 0.2
    with_reg = SoftTripleLoss(
        num_classes,
        dim,
        centers_per_class=k,
        weight_regularizer=IntraClassCenterRegularizer(k),
        weight_reg_weight=tau,
    ).to(dtype)
    without = SoftTripleLoss(num_classes, dim, centers_per_class=k).to(dtype)
    without.fc.data.copy_(with_reg.fc.data)
    emb = torch.randn(batch, dim, dtype=dtype)
    labels = torch.randint(0, num_classes, (batch,))
    expected = without(emb, labels) + tau * naive_center_regularizer(
        with_reg.fc.t(), num_classes, k, eps=1e-8
    )
    rtol, atol = tolerances(dtype)
    loss = with_reg(emb, labels)
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
    loss.backward()
    assert torch.isfinite(with_reg.fc.grad).all()


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_low_precision_weights_computed_in_float32(low):
    torch.manual_seed(6)
    weights = torch.randn(4 * 3, 16).to(low)
    out = IntraClassCenterRegularizer(3)(weights)
    assert out.dtype == torch.float32
    ref = naive_center_regularizer(weights.double(), 4, 3, eps=1e-8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_soft_triple_under_autocast():
    torch.manual_seed(7)
    num_classes, k, dim = 6, 3, 16
    loss_fn = SoftTripleLoss(
        num_classes, dim, centers_per_class=k, weight_regularizer=IntraClassCenterRegularizer(k)
    )
    emb = torch.randn(10, dim)
    labels = torch.randint(0, num_classes, (10,))
    reference = loss_fn.weight_regularizer(loss_fn.fc.t())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reg = loss_fn.weight_regularizer(loss_fn.fc.t())
        loss = loss_fn(emb, labels)
    assert reg.dtype == torch.float32
    torch.testing.assert_close(reg, reference)  # autocast does not reach inside
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(loss_fn.fc.grad).all()


def test_sop_scale_forward_backward():
    """C = 11,318, K = 2, D = 512 (Stanford Online Products): O(C K^2) memory, runs fine."""
    torch.manual_seed(5)
    num_classes, k, dim = 11_318, 2, 512
    weights = torch.randn(num_classes * k, dim, requires_grad=True)
    out = IntraClassCenterRegularizer(k)(weights)
    out.backward()
    assert math.isfinite(out.item())
    assert 0.0 < out.item() < 1.0  # random centers: distance ~ sqrt(2), halved
    assert torch.isfinite(weights.grad).all()
    # spot check one class against the loop
    sub = weights.detach()[:20]
    torch.testing.assert_close(
        IntraClassCenterRegularizer(k)(sub), naive_center_regularizer(sub, 10, k, eps=1e-8)
    )


def test_rejects_rows_not_multiple_of_k():
    with pytest.raises(ValueError, match="class-major"):
        IntraClassCenterRegularizer(3)(torch.randn(10, 4))


def test_rejects_bad_centers_per_class():
    with pytest.raises(ValueError, match="centers_per_class"):
        IntraClassCenterRegularizer(0)
