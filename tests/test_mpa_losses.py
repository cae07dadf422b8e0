"""The MPA family (MPA, MPA-DW, MPA-AP) against independent references.

* K = 1: PML's ``ProxyAnchorLoss`` on shared proxies (any pooling), with and without a PML miner;
* any K: naive loops written here from the paper's equations 1, 3, 6-7, 12-13 and 15-17;
* ``torch.autograd.gradcheck`` in float64; autocast; input validation.
"""

import math

import pytest
import torch
from conftest import tolerances
from pytorch_metric_learning.losses import ProxyAnchorLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_proxies.functional import proxy_math
from pml_proxies.losses import (
    AllPairsMultiProxyAnchorLoss,
    DataWiseMultiProxyAnchorLoss,
    MultiProxyAnchorLoss,
)
from pml_proxies.regularizers import IntraClassCenterRegularizer

LOSSES = [MultiProxyAnchorLoss, DataWiseMultiProxyAnchorLoss, AllPairsMultiProxyAnchorLoss]
POOLINGS = ["softmax", "max", "mean"]
ALPHA, DELTA, GAMMA, TAU = 32.0, 0.1, 0.1, 0.2


# ---------------------------------------------------------------------------- naive references
def naive_class_similarity(x, centers, c, k, pooling, gamma=GAMMA):
    """Eq. 1 (softmax) or the max / mean of the K cosine similarities, one sample, one class."""
    x = x / x.norm()
    sims = [torch.dot(x, centers[c * k + j] / centers[c * k + j].norm()) for j in range(k)]
    if pooling == "max":
        best = sims[0]
        for s in sims[1:]:
            best = torch.maximum(best, s)
        return best
    if pooling == "mean":
        return sum(sims) / k
    denom = sum(torch.exp(s / gamma) for s in sims)
    return sum(torch.exp(s / gamma) / denom * s for s in sims)


def naive_regularizer(centers, num_classes, k, eps=1e-8):
    """Eq. 3."""
    total = centers.new_zeros(())
    if k == 1:
        return total
    for c in range(num_classes):
        for t in range(k):
            for s in range(t + 1, k):
                w_t = centers[c * k + t] / centers[c * k + t].norm()
                w_s = centers[c * k + s] / centers[c * k + s].norm()
                total = total + torch.sqrt(2 - 2 * torch.dot(w_s, w_t) + eps)
    return total / (num_classes * k * (k - 1))


def similarity_table(x, centers, labels, num_classes, k, pooling):
    return [
        [naive_class_similarity(x[i], centers, c, k, pooling) for c in range(num_classes)]
        for i in range(len(labels))
    ]


def naive_mpa(x, centers, labels, num_classes, k, pooling, weights=None):
    """Eq. 6 (C- = all classes, docs/mpa.md), PML miner weights as ``+ (w - 1)`` exponents."""
    S = similarity_table(x, centers, labels, num_classes, k, pooling)
    batch = len(labels)
    w = [1.0] * batch if weights is None else [float(v) for v in weights]
    present = [c for c in range(num_classes) if c in labels.tolist()]
    pos = 0.0
    for c in present:
        inner = sum(
            torch.exp(-ALPHA * (S[i][c] - DELTA) + w[i] - 1) for i in range(batch) if labels[i] == c
        )
        pos = pos + torch.log(1 + inner)
    neg = 0.0
    for c in range(num_classes):
        terms = [
            torch.exp(ALPHA * (S[i][c] + DELTA) + w[i] - 1) for i in range(batch) if labels[i] != c
        ]
        if terms:
            neg = neg + torch.log(1 + sum(terms))
    return pos / len(present) + neg / num_classes


def naive_mpa_dw(x, centers, labels, num_classes, k, pooling, weights=None):
    """Eq. 12, miner weights multiplying the per-sample losses (as PML's SoftTripleLoss)."""
    S = similarity_table(x, centers, labels, num_classes, k, pooling)
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        pos = torch.log(1 + torch.exp(-ALPHA * (S[i][y] - DELTA)))
        neg_terms = [torch.exp(ALPHA * (S[i][c] + DELTA)) for c in range(num_classes) if c != y]
        neg = torch.log(1 + sum(neg_terms)) if neg_terms else 0.0
        total = total + (pos + neg) * (1.0 if weights is None else float(weights[i]))
    return total / len(labels)


def naive_mpa_ap(x, centers, labels, num_classes, k, pooling, weights=None):
    """Eq. 15-16."""
    S = similarity_table(x, centers, labels, num_classes, k, pooling)
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        shifted = [DELTA - S[i][c] if c == y else S[i][c] + DELTA for c in range(num_classes)]
        loss = torch.log(1 + sum(torch.exp(ALPHA * s) for s in shifted))
        total = total + loss * (1.0 if weights is None else float(weights[i]))
    return total / len(labels)


NAIVE = {
    MultiProxyAnchorLoss: naive_mpa,
    DataWiseMultiProxyAnchorLoss: naive_mpa_dw,
    AllPairsMultiProxyAnchorLoss: naive_mpa_ap,
}


def naive_total(loss_cls, x, centers, labels, num_classes, k, pooling, tau=TAU, weights=None):
    value = NAIVE[loss_cls](x, centers, labels, num_classes, k, pooling, weights)
    if tau:
        value = value + tau * naive_regularizer(centers, num_classes, k)
    return value


def make_batch(batch, dim, num_classes, dtype, seed=0, labels=None):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=gen, dtype=dtype)
    if labels is None:
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return emb, labels


def grads(loss_value, *tensors):
    return torch.autograd.grad(loss_value, tensors)


# ---------------------------------------------------------------------------- K = 1: Proxy-Anchor
LABEL_CASES = {
    "random": None,
    "absent_classes": torch.tensor([0, 0, 2, 2, 2, 5, 5, 0]),  # classes 1, 3, 4, 6 absent
    "one_class": torch.full((8,), 3),
}


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_k1_equals_pml_proxy_anchor(dtype, pooling, case):
    num_classes, dim = 7, 16
    emb, labels = make_batch(8, dim, num_classes, dtype, seed=1, labels=LABEL_CASES[case])
    ours = MultiProxyAnchorLoss(num_classes, dim, centers_per_class=1, pooling=pooling).to(dtype)
    pml = ProxyAnchorLoss(num_classes, dim).to(dtype)
    pml.proxies.data.copy_(ours.proxies.data)

    emb_a = emb.clone().requires_grad_(True)
    emb_b = emb.clone().requires_grad_(True)
    loss_a, loss_b = ours(emb_a, labels), pml(emb_b, labels)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    g_a = grads(loss_a, emb_a, ours.proxies)
    g_b = grads(loss_b, emb_b, pml.proxies)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10)


def test_k1_equals_pml_proxy_anchor_with_miner(dtype):
    num_classes, dim, batch = 4, 8, 16
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(batch) % num_classes
    # clustered embeddings so that the miner keeps some pairs and drops others
    emb = torch.randn(num_classes, dim, generator=gen, dtype=dtype)[labels] + 0.8 * torch.randn(
        batch, dim, generator=gen, dtype=dtype
    )
    indices_tuple = MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
    assert (weights < 1).any()  # the miner does something

    ours = MultiProxyAnchorLoss(num_classes, dim, centers_per_class=1).to(dtype)
    pml = ProxyAnchorLoss(num_classes, dim).to(dtype)
    pml.proxies.data.copy_(ours.proxies.data)
    emb_a = emb.clone().requires_grad_(True)
    emb_b = emb.clone().requires_grad_(True)
    loss_a = ours(emb_a, labels, indices_tuple)
    loss_b = pml(emb_b, labels, indices_tuple)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    # the miner changed the value
    assert not torch.allclose(loss_a, ours(emb, labels))
    for a, b in zip(grads(loss_a, emb_a, ours.proxies), grads(loss_b, emb_b, pml.proxies)):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10)


# ---------------------------------------------------------------------------- naive references
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_equals_naive_reference(dtype, loss_cls, k, pooling):
    num_classes, dim = 4, 6
    labels = torch.tensor([0, 2, 2, 1, 0, 2])  # class 3 absent
    emb, _ = make_batch(6, dim, num_classes, dtype, seed=3 + k)
    loss_fn = loss_cls(num_classes, dim, centers_per_class=k, pooling=pooling).to(dtype)
    emb.requires_grad_(True)
    value = loss_fn(emb, labels)
    ref = naive_total(loss_cls, emb, loss_fn.proxies, labels, num_classes, k, pooling)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(value, ref, rtol=rtol, atol=atol)
    for a, b in zip(grads(value, emb, loss_fn.proxies), grads(ref, emb, loss_fn.proxies)):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_naive_reference_with_miner(loss_cls):
    dtype = torch.float64
    num_classes, dim, k, batch = 3, 6, 2, 9
    labels = torch.arange(batch) % num_classes
    emb, _ = make_batch(batch, dim, num_classes, dtype, seed=11)
    indices_tuple = (torch.tensor([0, 1, 1]), torch.tensor([3, 4, 4]), torch.tensor([2, 5, 6]))
    weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
    loss_fn = loss_cls(num_classes, dim, centers_per_class=k).to(dtype)
    value = loss_fn(emb, labels, indices_tuple)
    ref = naive_total(
        loss_cls, emb, loss_fn.proxies, labels, num_classes, k, "softmax", weights=weights
    )
    torch.testing.assert_close(value, ref)


@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_regularizer_weight_and_switch_off(loss_cls):
    dtype = torch.float64
    num_classes, dim, k = 3, 5, 3
    emb, labels = make_batch(5, dim, num_classes, dtype, seed=5)
    default = loss_cls(num_classes, dim, centers_per_class=k).to(dtype)
    heavier = loss_cls(num_classes, dim, centers_per_class=k, weight_reg_weight=0.7).to(dtype)
    off = loss_cls(num_classes, dim, centers_per_class=k, weight_regularizer=None).to(dtype)
    for other in (heavier, off):
        other.proxies.data.copy_(default.proxies.data)
    assert isinstance(default.weight_regularizer, IntraClassCenterRegularizer)
    assert default.weight_reg_weight == TAU
    args = (loss_cls, emb, default.proxies, labels, num_classes, k, "softmax")
    torch.testing.assert_close(default(emb, labels), naive_total(*args, tau=TAU))
    torch.testing.assert_close(heavier(emb, labels), naive_total(*args, tau=0.7))
    torch.testing.assert_close(off(emb, labels), naive_total(*args, tau=0.0))
    assert not torch.allclose(default(emb, labels), off(emb, labels))


def test_proxies_parameter_is_class_major():
    loss_fn = MultiProxyAnchorLoss(5, 7, centers_per_class=3)
    assert isinstance(loss_fn.proxies, torch.nn.Parameter)
    assert loss_fn.proxies.shape == (15, 7)
    # a sample equal to center 1 of class 2 (row 2*3+1) has its highest class similarity to class 2
    emb = loss_fn.proxies.detach()[7:8].clone()
    assert loss_fn.get_logits(emb).argmax().item() == 2


# ---------------------------------------------------------------------------- similarities
def test_cosine_similarity_to_many_equals_naive(dtype):
    gen = torch.Generator().manual_seed(13)
    emb = (torch.randn(4, 5, generator=gen, dtype=dtype) * 3).requires_grad_()
    proxies = (torch.randn(7, 5, generator=gen, dtype=dtype) * 2).requires_grad_()
    sims = proxy_math.cosine_similarity_to_many(emb, proxies)
    naive = torch.stack(
        [torch.stack([torch.dot(e, p) / (e.norm() * p.norm()) for p in proxies]) for e in emb]
    )
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(sims, naive, rtol=rtol, atol=atol)
    weights = torch.randn(4, 7, generator=gen, dtype=dtype)
    got = torch.autograd.grad((sims * weights).sum(), (emb, proxies))
    ref = torch.autograd.grad((naive * weights).sum(), (emb, proxies))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(proxy_math.cosine_similarity_to_many, (emb, proxies))


def test_cosine_similarity_to_many_zero_proxy_is_finite():
    emb = torch.randn(3, 4, requires_grad=True)
    proxies = torch.randn(2, 4)
    proxies[1] = 0
    proxies.requires_grad_()
    sims = proxy_math.cosine_similarity_to_many(emb, proxies)
    sims.sum().backward()
    assert torch.equal(sims[:, 1], torch.zeros(3))
    assert torch.isfinite(emb.grad).all() and torch.isfinite(proxies.grad).all()


# ---------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("pooling", POOLINGS)
def test_pool_similarities_equals_naive_and_gradcheck(dtype, pooling):
    batch, num_classes, k, gamma = 3, 4, 5, 0.05
    gen = torch.Generator().manual_seed(12)
    sims = (torch.rand(batch, num_classes * k, generator=gen, dtype=dtype) * 2 - 1).requires_grad_()
    pooled = proxy_math.pool_similarities(sims, k, pooling, gamma)
    assert pooled.shape == (batch, num_classes)
    for i in range(batch):
        for c in range(num_classes):
            row = [sims[i, c * k + j].item() for j in range(k)]
            if pooling == "max":
                expected = max(row)
            elif pooling == "mean":
                expected = sum(row) / k
            else:
                z = [math.exp(v / gamma) for v in row]
                expected = sum(zj / sum(z) * v for zj, v in zip(z, row))
            assert pooled[i, c].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda s: proxy_math.pool_similarities(s, k, pooling, gamma), (sims,)
        )
    # K = 1: the input itself
    assert proxy_math.pool_similarities(sims, 1, pooling, gamma) is sims
    with pytest.raises(ValueError, match="pooling"):
        proxy_math.pool_similarities(sims, k, "median", gamma)


def test_softmax_pooling_large_similarities_are_stable():
    """Logits s / gamma of +-1e3 overflow exp without the max shift."""
    sims = torch.tensor([[100.0, 99.0, -100.0, -100.0]], requires_grad=True)
    pooled = proxy_math.pool_similarities(sims, 2, "softmax", 0.1)
    pooled.sum().backward()
    assert torch.isfinite(pooled).all() and torch.isfinite(sims.grad).all()
    assert pooled[0, 0].item() == pytest.approx(100.0 - 1 / (1 + math.exp(10)), rel=1e-6)


# ---------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_gradcheck(loss_cls, pooling):
    num_classes, dim, k = 3, 4, 2
    emb, labels = make_batch(5, dim, num_classes, torch.float64, seed=7)
    labels = torch.tensor([0, 1, 1, 0, 0])
    # a small alpha keeps finite differences well conditioned
    loss_fn = loss_cls(num_classes, dim, centers_per_class=k, pooling=pooling, alpha=4.0).double()
    proxies = loss_fn.proxies.detach().clone()

    def fn(e, p):
        return torch.func.functional_call(loss_fn, {"proxies": p}, (e, labels))

    assert torch.autograd.gradcheck(fn, (emb.requires_grad_(True), proxies.requires_grad_(True)))


# ---------------------------------------------------------------------------- dtypes, autocast
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_autocast_bfloat16_cpu(loss_cls):
    num_classes, dim, k = 10, 32, 3
    emb, labels = make_batch(20, dim, num_classes, torch.float32, seed=8)
    loss_fn = loss_cls(num_classes, dim, centers_per_class=k)
    reference = loss_fn(emb, labels)
    linear = torch.nn.Linear(dim, dim)
    torch.nn.init.eye_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(emb)
        assert out.dtype == torch.bfloat16
        loss = loss_fn(out, labels)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    # only the bfloat16 rounding of the embeddings differs (about 3 significant digits)
    torch.testing.assert_close(loss, reference, rtol=3e-2, atol=3e-2)
    loss.backward()
    assert loss_fn.proxies.dtype == torch.float32
    assert loss_fn.proxies.grad.dtype == torch.float32
    assert torch.isfinite(loss_fn.proxies.grad).all()


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_low_precision_input_keeps_proxy_dtype(loss_cls, low):
    num_classes, dim = 6, 8
    emb, labels = make_batch(10, dim, num_classes, torch.float32, seed=9)
    loss_fn = loss_cls(num_classes, dim, centers_per_class=2)
    reference = loss_fn(emb, labels)
    loss = loss_fn(emb.to(low), labels)
    assert loss_fn.proxies.dtype == torch.float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, reference, rtol=5e-2, atol=5e-2)
    # a later float32 call is unaffected
    torch.testing.assert_close(loss_fn(emb, labels), reference)


# ---------------------------------------------------------------------------- input validation
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_value_errors(loss_cls):
    num_classes, dim = 4, 5
    loss_fn = loss_cls(num_classes, dim, centers_per_class=2)
    before = loss_fn.proxies.detach().clone()
    emb, labels = make_batch(6, dim, num_classes, torch.float32)
    cases = [
        ((emb, torch.tensor([0, 1, 2, 3, 4, 0])), "labels must lie in"),
        ((emb, torch.tensor([0, 1, -1, 3, 2, 0])), "labels must lie in"),
        ((emb, labels[:5]), "one label per embedding"),
        ((emb, labels.view(2, 3)), "labels must be 1-D"),
        ((emb[0], labels[:1]), "2-D"),
        ((emb.view(6, 5, 1), labels), "2-D"),
        ((torch.randn(6, dim + 1), labels), "embedding size mismatch"),
        ((emb.clone().index_fill_(0, torch.tensor([2]), float("nan")), labels), "NaN"),
        ((emb.clone().index_fill_(0, torch.tensor([2]), float("inf")), labels), "infinite"),
        ((emb[:0], labels[:0]), "empty batch"),
    ]
    for (e, y), message in cases:
        with pytest.raises(ValueError, match=message):
            loss_fn(e, y)
    assert torch.equal(loss_fn.proxies.detach(), before)


@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_constructor_value_errors(loss_cls):
    with pytest.raises(ValueError, match="pooling"):
        loss_cls(4, 5, pooling="median")
    for bad in (0, -2):
        with pytest.raises(ValueError, match="centers_per_class"):
            loss_cls(4, 5, centers_per_class=bad)
    with pytest.raises(ValueError, match="gamma"):
        loss_cls(4, 5, gamma=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        loss_cls(0, 5)
    with pytest.raises(ValueError, match="embedding_size"):
        loss_cls(4, 0)


def test_defaults_follow_the_paper():
    loss_fn = MultiProxyAnchorLoss(3, 4)
    assert (loss_fn.centers_per_class, loss_fn.alpha, loss_fn.margin, loss_fn.gamma) == (
        10,
        ALPHA,
        DELTA,
        GAMMA,
    )
    assert loss_fn.pooling == "softmax"
    assert math.isclose(loss_fn.weight_reg_weight, TAU)
