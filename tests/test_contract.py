"""The losses' contract: constructor arguments checked at construction, labels given as lists or
on another device, the only accepted distance, Proxy-ISA's state checked on load and committed
atomically."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance

from pml_proxies.hooks import set_epoch
from pml_proxies.losses import (
    AllPairsMultiProxyAnchorLoss,
    DataWiseMultiProxyAnchorLoss,
    MultiProxyAnchorLoss,
    ProxyISALoss,
    VCPALoss,
)
from pml_proxies.regularizers import IntraClassCenterRegularizer

MPA_FAMILY = (MultiProxyAnchorLoss, DataWiseMultiProxyAnchorLoss, AllPairsMultiProxyAnchorLoss)
ALL_LOSSES = (*MPA_FAMILY, ProxyISALoss, VCPALoss)
NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------- constructors
MPA_BAD = [
    (dict(gamma=NAN), ValueError, "gamma"),
    (dict(gamma=-0.1), ValueError, "gamma"),
    (dict(alpha=NAN), ValueError, "alpha"),
    (dict(alpha=-32), ValueError, "alpha"),
    (dict(alpha=0), ValueError, "alpha"),
    (dict(alpha=INF), ValueError, "alpha"),
    (dict(margin=NAN), ValueError, "margin"),
    (dict(centers_per_class=2.5), ValueError, "centers_per_class"),
    (dict(centers_per_class="2"), TypeError, "centers_per_class"),
    (dict(pooling="median"), ValueError, "pooling"),
    (dict(weight_reg_weight=-0.2), ValueError, "weight_reg_weight"),
    (dict(weight_reg_weight=NAN), ValueError, "weight_reg_weight"),
]

ISA_BAD = [
    (dict(volume_bound=1e16), ValueError, "beta"),
    (dict(volume_bound=0.5), ValueError, "volume_bound"),
    (dict(volume_bound=INF), ValueError, "volume_bound"),
    (dict(decay_timing=-1e3), ValueError, "overflow"),
    (dict(decay_timing=NAN), ValueError, "decay_timing"),
    (dict(alpha=NAN), ValueError, "alpha"),
    (dict(alpha=-32), ValueError, "alpha"),
    (dict(margin=INF), ValueError, "margin"),
    (dict(hardness_scale=-0.15), ValueError, "hardness_scale"),
    (dict(sensitivity=NAN), ValueError, "sensitivity"),
    (dict(search_margin=NAN), ValueError, "search_margin"),
    (dict(memory_size=2.5), ValueError, "memory_size"),
    (dict(memory_size=0), ValueError, "memory_size"),
    (dict(memory_start_epoch=1.5), ValueError, "memory_start_epoch"),
    (dict(filter_start_epoch=0), ValueError, "filter_start_epoch"),
    (dict(positive_weighting="sigma"), ValueError, "positive_weighting"),
    (dict(negative_weighting="decay"), ValueError, "negative_weighting"),
    (dict(distributed_batch_layout="x"), ValueError, "distributed_batch_layout"),
]

BASE_BAD = [
    ((2.7, 8), {}, ValueError, "num_classes"),
    ((0, 8), {}, ValueError, "num_classes"),
    ((True, 8), {}, TypeError, "num_classes"),
    ((5, 8.5), {}, ValueError, "embedding_size"),
    ((5, "8"), {}, TypeError, "embedding_size"),
    ((5, 8), dict(check_inputs="yes"), TypeError, "check_inputs"),
]


@pytest.mark.parametrize("loss_cls", MPA_FAMILY, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs, error, name", MPA_BAD)
def test_mpa_family_rejects_bad_arguments(loss_cls, kwargs, error, name):
    with pytest.raises(error, match=name):
        loss_cls(5, 8, **kwargs)


@pytest.mark.parametrize("kwargs, error, name", ISA_BAD)
def test_proxy_isa_rejects_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        ProxyISALoss(5, 8, memory_size=kwargs.pop("memory_size", 10), **kwargs)


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("args, kwargs, error, name", BASE_BAD)
def test_base_arguments_rejected(loss_cls, args, kwargs, error, name):
    extra = dict(memory_size=10) if loss_cls is ProxyISALoss else {}
    with pytest.raises(error, match=name):
        loss_cls(*args, **kwargs, **extra)


def float_arguments(cls):
    """The real-number arguments of ``cls``'s constructor (a float default), and PML's
    regulariser weights for the losses."""
    names = [
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if isinstance(parameter.default, float)
    ]
    if cls in ALL_LOSSES:
        names += ["weight_reg_weight", "embedding_reg_weight"]
    return names


FLOAT_ARGUMENTS = [
    pytest.param(cls, name, id=f"{cls.__name__}-{name}")
    for cls in (*ALL_LOSSES, IntraClassCenterRegularizer)
    for name in float_arguments(cls)
]


@pytest.mark.parametrize("cls, name", FLOAT_ARGUMENTS)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_every_float_argument_rejects_non_finite_values(cls, name, value):
    """Before: ``weight_reg_weight`` / ``embedding_reg_weight`` were passed to PML unchecked by
    Proxy-ISA and VCPA (``embedding_reg_weight`` by the MPA family too)."""
    args = (2,) if cls is IntraClassCenterRegularizer else (4, 3)
    extra = dict(memory_size=10) if cls is ProxyISALoss else {}
    with pytest.raises(ValueError, match=name):
        cls(*args, **extra, **{name: value})


def test_float_arguments_are_found():
    assert {"alpha", "margin", "temperature", "sigma_min", "newton_damping"} <= set(
        float_arguments(VCPALoss)
    )
    assert "decay_timing" in float_arguments(ProxyISALoss)
    assert float_arguments(IntraClassCenterRegularizer) == ["eps"]


def test_integer_valued_floats_are_accepted_as_integers():
    loss = MultiProxyAnchorLoss(3.0, 4.0, centers_per_class=2.0)
    assert (loss.num_classes, loss.embedding_size, loss.centers_per_class) == (3, 4, 2)
    assert loss.proxies.shape == (6, 4)
    isa = ProxyISALoss(3, 4, memory_size=7.0)
    assert isa.memory_size == 7 and isinstance(isa.memory_size, int)


def test_proxy_isa_limits_keep_finite_arithmetic():
    """The largest accepted volume_bound and the smallest accepted decay_timing give finite
    weights and losses over a few steps (the rejected values gave NaN / OverflowError)."""
    torch.manual_seed(0)
    for kwargs in (dict(volume_bound=1e15), dict(decay_timing=-88.0)):
        loss = ProxyISALoss(4, 3, memory_size=8, memory_start_epoch=1, filter_start_epoch=1,
                            **kwargs)  # fmt: skip
        for _ in range(3):
            value = loss(torch.randn(6, 3), torch.randint(0, 4, (6,)))
            assert torch.isfinite(value)
        for weight in loss.class_weights(torch.float32).values():
            assert torch.isfinite(weight).all()


def test_regularizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="centers_per_class"):
        IntraClassCenterRegularizer(2.5)
    with pytest.raises(TypeError, match="centers_per_class"):
        IntraClassCenterRegularizer(None)
    for eps in (NAN, -1e-8):
        with pytest.raises(ValueError, match="eps"):
            IntraClassCenterRegularizer(2, eps=eps)


def test_set_epoch_rejects_bad_epochs_before_touching_a_loss():
    loss = ProxyISALoss(4, 3, memory_size=5)
    for bad, error in ((2.5, ValueError), (-1, ValueError), ("3", TypeError)):
        with pytest.raises(error, match="epoch"):
            set_epoch(loss, bad)
        with pytest.raises(error, match="epoch"):
            loss.set_epoch(bad)
    assert int(loss.epoch) == 1
    assert set_epoch(loss, 3.0) == 1 and int(loss.epoch) == 3


# --------------------------------------------------------------------------- labels
def make_loss(loss_cls, C=4, D=5):
    if loss_cls is ProxyISALoss:
        return loss_cls(C, D, memory_size=10)
    if loss_cls is VCPALoss:
        return loss_cls(C, D, newton_steps=1, seed=0)
    return loss_cls(C, D, centers_per_class=2)


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_labels_as_a_list_raise_type_error(loss_cls):
    loss = make_loss(loss_cls)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        loss(torch.randn(3, 5), [0, 1, 2])
    for key, value in loss.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_labels_on_another_device_are_moved_before_validation(loss_cls):
    loss = make_loss(loss_cls)
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 5, generator=gen), torch.randint(0, 4, (6,), generator=gen)
    for emb_device, label_device in (("cuda", "cpu"), ("cpu", "cuda")):
        value = loss(X.to(emb_device), y.to(label_device))
        assert value.device.type == emb_device
        bad = y.clone()
        bad[2] = 4
        with pytest.raises(ValueError, match="labels must lie in"):
            loss(X.to(emb_device), bad.to(label_device))


# --------------------------------------------------------------------------- distance
@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_only_the_cosine_similarity_is_accepted(loss_cls):
    extra = dict(memory_size=10) if loss_cls is ProxyISALoss else {}
    for distance in (LpDistance(), DotProductSimilarity(), CosineSimilarity(power=2)):
        with pytest.raises(ValueError, match="CosineSimilarity"):
            loss_cls(4, 5, distance=distance, **extra)
    loss = loss_cls(4, 5, distance=CosineSimilarity(), **extra)
    assert isinstance(loss.distance, CosineSimilarity)


# --------------------------------------------------------------------------- get_logits
def test_proxy_isa_get_logits_are_cosines_to_the_proxies(dtype):
    torch.manual_seed(0)
    loss = ProxyISALoss(6, 4, memory_size=10).to(dtype)
    X = torch.randn(9, 4, dtype=dtype)
    expected = torch.zeros(9, 6, dtype=dtype)
    for i in range(9):
        for c in range(6):
            p = loss.proxies[c].detach()
            expected[i, c] = (X[i] @ p) / (X[i].norm() * p.norm())
    logits = loss.get_logits(X)
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.detach(), expected)
    assert loss.float().get_logits(X.half()).dtype == torch.float32  # computes in float32


# --------------------------------------------------------------------------- Proxy-ISA state
def trained_isa(C=5, D=3, T=6, steps=4, seed=0):
    torch.manual_seed(seed)
    loss = ProxyISALoss(C, D, memory_size=T, memory_start_epoch=1, filter_start_epoch=2,
                        volume_bound=4.0, hardness_scale=0.5)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        loss.set_epoch(1 + step // 2)
        loss(torch.randn(4, D, generator=gen), torch.randint(0, C, (4,), generator=gen))
    return loss


def snapshot(loss):
    return {k: v.clone() for k, v in loss.state_dict().items()}


def assert_unchanged(loss, before):
    for key, value in loss.state_dict().items():
        assert torch.equal(value, before[key]), key


def corrupt(state, **changes):
    state = {k: v.clone() for k, v in state.items()}
    for key, fn in changes.items():
        state[key] = fn(state[key])
    return state


def _set(index, value):
    def fn(t):
        t[index] = value
        return t

    return fn


def _as_float_with(index, value):
    """An integer buffer as float64 with one entry set to ``value``."""

    def fn(t):
        t = t.double()
        t.view(-1)[index] = value
        return t

    return fn


CORRUPTIONS = {
    "label_out_of_range": (dict(memory_labels=_set(0, 5)), "memory_labels must lie in"),
    "label_below_minus_one": (dict(memory_labels=_set(0, -2)), "memory_labels must lie in"),
    "count_mismatch": (dict(memory_count=lambda t: t - 1), "memory_count"),
    "position_out_of_range": (dict(memory_write_position=lambda t: t + 6), "write_position"),
    "class_counts_mismatch": (
        dict(memory_class_counts=lambda t: t.flip(0) + 1),
        "memory_class_counts",
    ),
    "class_sums_mismatch": (dict(memory_class_sums=lambda t: t + 1), "memory_class_sums"),
    "negative_sample_count": (dict(sample_counts=_set(1, -3)), "sample_counts"),
    "nan_effective_number": (dict(effective_numbers=_set(2, NAN)), "effective_numbers"),
    # before: NaN passed the checks and became -2**63, a state that could not be loaded again
    "nan_sample_count": (dict(sample_counts=_as_float_with(1, NAN)), "sample_counts"),
    "inf_sample_count": (dict(sample_counts=_as_float_with(1, INF)), "sample_counts"),
    "fractional_sample_count": (dict(sample_counts=_as_float_with(1, 2.5)), "sample_counts"),
    "huge_sample_count": (dict(sample_counts=_as_float_with(1, 2.0**63)), "sample_counts"),
    "nan_epoch": (dict(epoch=lambda t: torch.tensor(NAN)), "epoch"),
    "nan_memory_enabled": (dict(memory_enabled=lambda t: torch.tensor(NAN)), "memory_enabled"),
    "two_filter_enabled": (dict(filter_enabled=lambda t: torch.tensor(2)), "filter_enabled"),
    "nan_memory_count": (dict(memory_count=lambda t: torch.tensor(NAN)), "memory_count"),
    "nan_memory_label": (dict(memory_labels=_as_float_with(0, NAN)), "memory_labels"),
    "inf_learned_similarity": (
        dict(learned_similarities=_set(0, -INF)),
        "learned_similarities",
    ),
    "nan_memory_embedding": (dict(memory_embeddings=_set((0, 1), NAN)), "memory_embeddings"),
    "float32_overflow": (
        dict(effective_numbers=lambda t: t.double().index_fill_(0, torch.tensor([0]), 1e300)),
        "effective_numbers",
    ),
    "negative_effective_number": (dict(effective_numbers=_set(2, -1.0)), "effective_numbers"),
    "nan_proxy": (dict(proxies=_set((1, 0), NAN)), "proxies"),
    "nan_class_sum": (dict(memory_class_sums=_as_float_with(0, NAN)), "memory_class_sums"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_loading_an_inconsistent_state_raises_and_changes_nothing(case):
    source = trained_isa()
    assert int(source.memory_count) == 6  # full memory
    changes, message = CORRUPTIONS[case]
    target = trained_isa(seed=1)
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(corrupt(source.state_dict(), **changes))
    assert_unchanged(target, before)


def test_loading_a_state_of_a_loss_with_more_classes_raises():
    bigger = trained_isa(C=7)
    target = trained_isa(C=5, seed=1)
    before = snapshot(target)
    with pytest.raises(ValueError, match="sample_counts has shape"):
        target.load_state_dict(bigger.state_dict())
    assert_unchanged(target, before)


def test_a_strict_load_with_a_missing_key_raises_and_changes_nothing():
    """Before: torch wrote every other buffer, then raised for the missing key."""
    state = trained_isa().state_dict()
    del state["memory_count"]
    target = trained_isa(seed=1)
    before = snapshot(target)
    with pytest.raises(ValueError, match="memory_count"):
        target.load_state_dict(state)
    assert_unchanged(target, before)


def test_partial_load_is_checked_against_the_current_buffers():
    source, target = trained_isa(), trained_isa(seed=1)
    before = snapshot(target)
    with pytest.raises(ValueError, match="memory_class_counts|memory_class_sums"):
        target.load_state_dict({"memory_labels": source.memory_labels.clone()}, strict=False)
    assert_unchanged(target, before)


@pytest.mark.parametrize("T", [40, 6], ids=["partly_filled", "full"])
def test_a_consistent_state_loads(T, dtype):
    source = trained_isa(T=T).to(dtype)
    assert 0 < int(source.memory_count) <= T
    source(torch.randn(4, 3, dtype=dtype), torch.tensor([0, 1, 2, 2]))  # a step in this dtype
    target = trained_isa(T=T, seed=1).to(dtype)
    target.load_state_dict(source.state_dict())
    assert_unchanged(target, snapshot(source))


def test_partly_filled_memory_must_fill_from_slot_zero():
    source = trained_isa(T=40)
    count = int(source.memory_count)
    state = corrupt(source.state_dict(), memory_write_position=lambda t: t + 1)
    with pytest.raises(ValueError, match="not full"):
        trained_isa(T=40, seed=1).load_state_dict(state)
    assert count < 40


@pytest.mark.parametrize("sync_free", [False, True], ids=["host_sizes", "fixed_shape"])
def test_a_failing_commit_writes_nothing(sync_free):
    """A state corrupted behind the loss's back (a slot about to be overwritten holds a class
    >= C): the step raises, and no buffer changed (before: sample_counts had been updated)."""
    loss = trained_isa()
    loss.sync_free_memory_updates = sync_free
    slot = int(loss.memory_write_position)
    loss.memory_labels[slot] = loss.num_classes  # bypasses the load check on purpose
    before = snapshot(loss)
    with pytest.raises((IndexError, RuntimeError)):
        loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    assert_unchanged(loss, before)


def test_valid_commits_still_match_a_fresh_recount():
    """After many steps (wrap-around, outliers) the per-class bookkeeping equals a recount of the
    memory, i.e. the state would pass its own load check."""
    loss = trained_isa(steps=12)
    loss._check_state(dict(loss.state_dict()))
    assert math.isfinite(float(loss.effective_numbers.sum()))
    unit = F.normalize(loss.memory_embeddings, dim=1)
    filled = loss.memory_labels >= 0
    torch.testing.assert_close(unit[filled], loss.memory_embeddings[filled])


# --------------------------------------------------------------------------- every loss's state
def stepped_loss(loss_cls, C=4, D=5, seed=0):
    torch.manual_seed(seed)
    loss = make_loss(loss_cls, C, D)
    gen = torch.Generator().manual_seed(seed)
    loss(torch.randn(8, D, generator=gen), torch.arange(8) % C)
    return loss


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_a_state_of_more_classes_raises_and_changes_nothing(loss_cls):
    """Before, for VCPA: torch reported the size mismatch after rng_state had been replaced."""
    target = stepped_loss(loss_cls, seed=1)
    before = snapshot(target)
    with pytest.raises(ValueError, match="has shape"):
        target.load_state_dict(stepped_loss(loss_cls, C=5).state_dict())
    assert_unchanged(target, before)


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_non_finite_proxies_are_refused_and_change_nothing(loss_cls, value):
    source = stepped_loss(loss_cls).state_dict()
    key = "proxy_mean" if loss_cls is VCPALoss else "proxies"
    source[key][0, 0] = value
    target = stepped_loss(loss_cls, seed=1)
    before = snapshot(target)
    with pytest.raises(ValueError, match=key):
        target.load_state_dict(source)
    assert_unchanged(target, before)


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_unexpected_key_raises_under_strict_only(loss_cls):
    source = stepped_loss(loss_cls)
    target = stepped_loss(loss_cls, seed=1)
    before = snapshot(target)
    state = dict(source.state_dict(), stray=torch.zeros(1))
    with pytest.raises(ValueError, match="stray"):
        target.load_state_dict(state)
    assert_unchanged(target, before)
    target.load_state_dict(state, strict=False)
    assert_unchanged(target, snapshot(source))
