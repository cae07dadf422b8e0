"""The fused autograd Functions of ``proxy_math``: the Proxy-Anchor terms and the unit cosines.

Both are checked with ``gradcheck`` (float64) and against the unfused autograd formulas written
here from the equations, in float32 and float64, values and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pml_proxies.functional import proxy_math

ALPHA, MARGIN = 32.0, 0.1
B, C = 10, 6
# column 0: all positives (no negative); 3: no positive; 4, 5: mixed
MASK = torch.zeros(B, C, dtype=torch.bool)
MASK[:, 0] = True
MASK[[1, 4, 7], 1] = True
MASK[[0, 2, 3, 5, 6, 8, 9], 2] = True
MASK[[2], 4] = True
MASK[[3, 9], 5] = True


def unfused_terms(sims, pos_mask, alpha, margin, pos_scale=None, neg_scale=None, weights=None):
    """``log(1 + sum_masked exp(z))`` per column, by autograd: the extra zero logit is a row."""
    pos_logits = alpha * (margin - sims)
    neg_logits = alpha * (sims + margin)
    if pos_scale is not None:
        pos_logits = pos_logits * pos_scale
    if neg_scale is not None:
        neg_logits = neg_logits * neg_scale
    if weights is not None:
        pos_logits = pos_logits + (weights - 1).unsqueeze(1)
        neg_logits = neg_logits + (weights - 1).unsqueeze(1)
    zero_row = sims.new_zeros(1, sims.shape[1])

    def term(logits, mask):
        kept = logits.masked_fill(~mask, float("-inf"))
        return torch.logsumexp(torch.cat([kept, zero_row]), dim=0)

    return term(pos_logits, pos_mask), term(neg_logits, ~pos_mask)


def make_inputs(dtype, options, seed=0, mask=MASK):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = mask.shape
    sims = torch.rand(rows, cols, generator=gen, dtype=torch.float64).mul_(2).sub_(1)
    extra = {}
    if "pos_scale" in options:
        extra["pos_scale"] = 0.5 + torch.rand(rows, 1, generator=gen, dtype=torch.float64)
    if "pos_scale_full" in options:
        extra["pos_scale"] = 0.5 + torch.rand(rows, cols, generator=gen, dtype=torch.float64)
    if "neg_scale" in options:
        extra["neg_scale"] = 0.5 + torch.rand(rows, cols, generator=gen, dtype=torch.float64)
    if "weights" in options:
        extra["weights"] = 0.5 + torch.rand(rows, generator=gen, dtype=torch.float64)
    if "large" in options:
        # exponents near 900 overflow exp() in float64 without the max shift
        extra["weights"] = 880 + torch.rand(rows, generator=gen, dtype=torch.float64)
    sims = sims.to(dtype).requires_grad_(True)
    extra = {k: v.to(dtype).requires_grad_(True) for k, v in extra.items()}
    return sims, extra


def fused_terms(sims, pos_mask, alpha, margin, pos_scale=None, neg_scale=None, weights=None):
    return proxy_math.proxy_anchor_terms(
        sims, pos_mask, alpha, margin, pos_scale, neg_scale, miner_weights=weights
    )


OPTIONS = [
    (),
    ("pos_scale",),
    ("pos_scale_full",),
    ("neg_scale",),
    ("weights",),
    ("pos_scale", "neg_scale", "weights"),
    ("large",),
    ("pos_scale", "neg_scale", "large"),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_gradcheck_every_option(options):
    sims, extra = make_inputs(torch.float64, options)
    names = list(extra)

    def fn(s, *rest):
        return fused_terms(s, MASK, 4.0, MARGIN, **dict(zip(names, rest)))

    assert torch.autograd.gradcheck(fn, (sims, *extra.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_equals_unfused_formula(dtype, options):
    sims, extra = make_inputs(dtype, options, seed=3)
    inputs = (sims, *extra.values())
    gen = torch.Generator().manual_seed(5)
    upstream = torch.rand(2, C, generator=gen, dtype=torch.float64).to(dtype)
    results = []
    for terms in (fused_terms, unfused_terms):
        pos, neg = terms(sims, MASK, ALPHA, MARGIN, **extra)
        assert pos.dtype == neg.dtype == dtype and pos.shape == neg.shape == (C,)
        total = (pos * upstream[0]).sum() + (neg * upstream[1]).sum()
        results.append((pos, neg, *torch.autograd.grad(total, inputs)))
    tol = {"rtol": 1e-12, "atol": 1e-12}
    if dtype == torch.float32:
        # exponents near 900 carry a float32 rounding of ~6e-5 (either formula), which the
        # softmax weights (the gradients) inherit as a relative error
        tol = {"rtol": 1e-4, "atol": 1e-3} if "large" in options else {}
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_columns_give_zero_and_zero_gradient(dtype):
    sims, extra = make_inputs(dtype, ("pos_scale", "neg_scale", "weights"), seed=1)
    pos, neg = fused_terms(sims, MASK, ALPHA, MARGIN, **extra)
    assert pos[3] == 0 and neg[0] == 0
    assert (pos[[0, 1, 2, 4, 5]] > 0).all() and (neg[1:] > 0).all()
    grad_sims, grad_pos_scale, grad_neg_scale, grad_weights = torch.autograd.grad(
        pos[3] + neg[0], (sims, *extra.values()), allow_unused=False
    )
    for grad in (grad_sims, grad_pos_scale, grad_neg_scale, grad_weights):
        assert torch.isfinite(grad).all() and (grad == 0).all()


def test_one_hot_batch_as_the_losses_use_it():
    labels = torch.tensor([0, 0, 2, 2, 2, 4, 1, 0])
    pos_mask, _ = proxy_math.class_masks(labels, 5)
    sims, extra = make_inputs(torch.float64, ("neg_scale",), seed=2, mask=pos_mask)
    got = fused_terms(sims, pos_mask, ALPHA, MARGIN, **extra)
    want = unfused_terms(sims, pos_mask, ALPHA, MARGIN, **extra)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[0][3] == 0  # class 3 is absent


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_their_dtype(dtype):
    # as the unfused formula: no upcast, the result and gradient keep the input dtype
    sims, _ = make_inputs(dtype, (), seed=4)
    pos, neg = fused_terms(sims, MASK, ALPHA, MARGIN)
    want = unfused_terms(sims.detach().double(), MASK, ALPHA, MARGIN)
    for got, ref in zip((pos, neg), want):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)
    (grad,) = torch.autograd.grad(pos.sum() + neg.sum(), sims)
    assert grad.dtype == dtype and torch.isfinite(grad).all()


def test_no_double_backward():
    sims, _ = make_inputs(torch.float64, (), seed=6)
    pos, neg = fused_terms(sims, MASK, ALPHA, MARGIN)
    (grad,) = torch.autograd.grad(pos.sum() + neg.sum(), sims, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.sum(), sims)


# ------------------------------------------------------------------ unit cosine similarities
def make_rows(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    p = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    return x.to(dtype), p.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degenerate", [False, True])
def test_unit_cosine_equals_normalize_then_matmul(dtype, degenerate):
    x, p = make_rows(dtype, seed=1)
    if degenerate:  # norms at and below eps: F.normalize divides by eps (no radial gradient)
        x[2] = 0
        p[1] *= 1e-13
    x.requires_grad_(True)
    p.requires_grad_(True)
    unit_x, unit_p, sims = proxy_math.unit_cosine_similarity(x, p)
    want_x, want_p = F.normalize(x, p=2, dim=1), F.normalize(p, p=2, dim=1)
    want = want_x @ want_p.t()
    # the forward is the same computation: identical values
    assert torch.equal(unit_x, want_x.detach()) and torch.equal(unit_p, want_p.detach())
    assert torch.equal(sims, want) and torch.equal(sims, proxy_math.cosine_similarity(x, p))
    assert not unit_x.requires_grad and not unit_p.requires_grad
    upstream = torch.randn(sims.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    got = torch.autograd.grad((sims * upstream).sum(), (x, p))
    ref = torch.autograd.grad((want * upstream).sum(), (x, p))
    # the backward is another computation (closed form vs autograd through F.normalize): each
    # entry sums a few products and a radial correction in another order, and the kernels' order
    # depends on the CPU (MKL held to AVX2 moved one float32 entry by 17 ulps of its value). The
    # terms can cancel, so the bound is ulps of the largest entry, not of each: 32 of them
    eps = torch.finfo(dtype).eps
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=32 * eps * float(r.abs().max()))


def test_unit_cosine_gradcheck():
    x, p = make_rows(torch.float64, seed=3)
    x.requires_grad_(True)
    p.requires_grad_(True)

    def fn(a, b):
        return proxy_math.unit_cosine_similarity(a, b)[2]

    assert torch.autograd.gradcheck(fn, (x, p))
    # one input only
    assert torch.autograd.gradcheck(lambda a: fn(a, p.detach()), (x,))
    assert torch.autograd.gradcheck(lambda b: fn(x.detach(), b), (p,))
    (grad,) = torch.autograd.grad(fn(x, p).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):  # first-order only
        torch.autograd.grad(grad.sum(), x)
