"""Tests of ProxyISALoss against an independent loop reference (docs/proxy-isa.md), PML's
ProxyAnchorLoss, and of its state handling (resume, eval mode, failed steps, distributed)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tolerances
from pytorch_metric_learning.losses import ProxyAnchorLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from pml_proxies.hooks import SetEpochHook, set_epoch, stateful_losses
from pml_proxies.losses import ProxyISALoss

POSITIVE = ("none", "inverse_effective_number", "lower_bound", "decay")
NEGATIVE = ("none", "inverse_effective_number")
# small, hand-checkable: V small so that sigma moves, h large so that thresholds bite
SMALL = dict(
    margin=0.1,
    alpha=32.0,
    volume_bound=4.0,
    hardness_scale=0.5,
    sensitivity=0.9,
    search_margin=0.1,
    decay_timing=1.5,
    memory_size=6,
    memory_start_epoch=2,
    filter_start_epoch=3,
)
STATE = (
    "epoch",
    "memory_enabled",
    "filter_enabled",
    "sample_counts",
    "effective_numbers",
    "learned_similarities",
    "memory_embeddings",
    "memory_labels",
    "memory_write_position",
    "memory_count",
    "memory_class_counts",
    "memory_class_sums",
)


# --------------------------------------------------------------------------- reference
class Reference:
    """The method of docs/proxy-isa.md step by step with plain Python loops (state in Python
    floats)."""

    def __init__(self, C, T, margin, alpha, volume_bound, hardness_scale, sensitivity,
                 search_margin, decay_timing, memory_size=None, memory_start_epoch=3,
                 filter_start_epoch=4, positive_weighting="decay",
                 negative_weighting="inverse_effective_number"):  # fmt: skip
        self.C, self.T = C, T
        self.delta, self.alpha, self.V = margin, alpha, volume_bound
        self.h, self.k, self.lam, self.tau = (
            hardness_scale,
            sensitivity,
            search_margin,
            decay_timing,
        )
        self.mem_start, self.filt_start = memory_start_epoch, filter_start_epoch
        self.pos_w, self.neg_w = positive_weighting, negative_weighting
        self.n = [0] * C
        self.E = [0.0] * C
        self.s = [1.0] * C
        self.slots = [None] * T  # (embedding, label)
        self.ptr = 0
        self.epoch = 1

    def step(self, X, y, P, training=True):
        B, C = len(y), self.C
        memory_on, filter_on = self.epoch >= self.mem_start, self.epoch >= self.filt_start
        xn = [X[i] / X[i].norm() for i in range(B)]
        pn = [P[c] / P[c].norm() for c in range(C)]
        S = [[(xn[i] * pn[c]).sum() for c in range(C)] for i in range(B)]
        Sv = [[float(S[i][c].detach()) for c in range(C)] for i in range(B)]
        nu, sigma, out, invE = [], [], [], []
        for c in range(C):
            E = self.E[c]
            nu.append(1 / (1 + math.log(1 + E)))
            sigma.append(
                1 + (1 + math.exp(-self.tau)) * (nu[c] - 1) / (1 + math.exp(self.V - E - self.tau))
            )
            eta = (1 + self.k * (1 - self.s[c])) * nu[c] + self.lam
            out.append(self.s[c] - eta)
            invE.append(1 / max(1.0, E))
        penalty = {"inverse_effective_number": invE, "lower_bound": nu, "decay": sigma}
        w_pos = [1.0] * B
        if filter_on and self.pos_w != "none":
            for i in range(B):
                c = y[i]
                in_band = out[c] <= Sv[i][c] <= self.s[c]
                w_pos[i] = penalty[self.pos_w][c] + (1.0 if in_band else 0.0)
        w_neg = [[1.0] * C for _ in range(B)]
        if self.neg_w != "none":
            for i in range(B):
                for c in range(C):
                    if Sv[i][c] < out[c]:
                        w_neg[i][c] = invE[c]
        pos_total, pos_div, neg_total, neg_div = 0, 0.0, 0, 0.0
        for c in range(C):
            members = [i for i in range(B) if y[i] == c]
            others = [i for i in range(B) if y[i] != c]
            if members:
                acc = 0
                for i in members:
                    acc = acc + torch.exp(w_pos[i] * self.alpha * (self.delta - S[i][c]))
                pos_total = pos_total + torch.log(1 + acc)
                pos_div += sum(w_pos[i] for i in members) / len(members)
            if others:
                acc = 0
                for i in others:
                    acc = acc + torch.exp(w_neg[i][c] * self.alpha * (S[i][c] + self.delta))
                neg_total = neg_total + torch.log(1 + acc)
                neg_div += sum(w_neg[i][c] for i in others) / len(others)
        loss = pos_total / pos_div + (neg_total / neg_div if neg_div > 0 else 0)
        if training:
            outlier = [filter_on and Sv[i][y[i]] < out[y[i]] for i in range(B)]
            beta = (self.V - 1) / self.V
            for c in range(C):
                self.n[c] += sum(1 for i in range(B) if y[i] == c and not outlier[i])
                self.E[c] = (1 - beta ** self.n[c]) / (1 - beta)
            if memory_on:
                for i in range(B):
                    if not outlier[i]:
                        self.slots[self.ptr] = (xn[i].detach().double(), y[i])
                        self.ptr = (self.ptr + 1) % self.T
                for c in sorted(set(y)):
                    entries = [e for e in self.slots if e is not None and e[1] == c]
                    if entries:
                        p = pn[c].detach().double()
                        self.s[c] = self.h * sum(float(e @ p) for e, _ in entries) / len(entries)
        return loss


def assert_state_matches(loss, ref, dtype, bits):
    rtol, atol = tolerances(dtype)
    assert int(loss.epoch) == ref.epoch
    assert bool(loss.memory_enabled) == (ref.epoch >= ref.mem_start)
    assert bool(loss.filter_enabled) == (ref.epoch >= ref.filt_start)
    assert loss.sample_counts.tolist() == ref.n
    torch.testing.assert_close(
        loss.effective_numbers.double(),
        torch.tensor(ref.E, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    )
    torch.testing.assert_close(
        loss.learned_similarities.double(),
        torch.tensor(ref.s, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    )
    labels = [-1 if e is None else e[1] for e in ref.slots]
    assert loss.memory_labels.tolist() == labels
    assert int(loss.memory_write_position) == ref.ptr
    assert int(loss.memory_count) == sum(e is not None for e in ref.slots)
    D = loss.embedding_size
    ref_sums = torch.zeros(ref.C, D, dtype=torch.float64)
    ref_counts = [0] * ref.C
    for t, e in enumerate(ref.slots):
        if e is not None:
            torch.testing.assert_close(
                loss.memory_embeddings[t].double(), e[0], rtol=rtol, atol=atol
            )
            ref_sums[e[1]] += loss.memory_embeddings[t].double()
            ref_counts[e[1]] += 1
    assert loss.memory_class_counts.tolist() == ref_counts
    torch.testing.assert_close(
        loss.memory_class_sums.double() / 2.0**bits, ref_sums, rtol=0, atol=1e-11
    )


def run_against_reference(dtype, positive, negative, C=4, D=3, epochs=4, steps=3, seed=0,
                          sizes=(7, 3, 9, 5), sync_free=None, **overrides):  # fmt: skip
    cfg = dict(SMALL, **overrides)
    torch.manual_seed(seed)
    loss = ProxyISALoss(C, D, positive_weighting=positive, negative_weighting=negative, **cfg)
    loss = loss.to(dtype)
    loss.sync_free_memory_updates = sync_free
    ref = Reference(
        C, cfg["memory_size"], positive_weighting=positive, negative_weighting=negative, **cfg
    )
    P = loss.proxies.detach().clone()
    gen = torch.Generator().manual_seed(seed + 1)
    rtol, atol = tolerances(dtype)
    step = 0
    saw_outlier = saw_wrap = False
    for epoch in range(1, epochs + 1):
        loss.set_epoch(epoch)
        ref.epoch = epoch
        for _ in range(steps):
            B = sizes[step % len(sizes)]
            step += 1
            X = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
            y = torch.randint(0, C, (B,), generator=gen)
            y[0] = y[1]  # a class with several samples
            X1 = X.clone().requires_grad_(True)
            loss.proxies.data.copy_(P)
            loss.proxies.grad = None
            value = loss(X1, y)
            value.backward()
            X2 = X.clone().requires_grad_(True)
            P2 = P.clone().requires_grad_(True)
            ptr_before = ref.ptr
            n_before = sum(ref.n)
            ref_value = ref.step(X2, y.tolist(), P2)
            ref_value.backward()
            saw_outlier |= sum(ref.n) - n_before < B
            saw_wrap |= ref.epoch >= ref.mem_start and ref.ptr < ptr_before + B
            torch.testing.assert_close(value.detach(), ref_value.detach(), rtol=rtol, atol=atol)
            torch.testing.assert_close(X1.grad, X2.grad, rtol=rtol, atol=10 * atol)
            torch.testing.assert_close(loss.proxies.grad, P2.grad, rtol=rtol, atol=10 * atol)
            assert_state_matches(loss, ref, dtype, loss.fixed_point_bits)
            P = P - 0.5 * P2.grad.detach()
    return saw_outlier, saw_wrap


@pytest.mark.parametrize("sync_free", [False, True], ids=["host_sizes", "fixed_shape"])
@pytest.mark.parametrize("negative", NEGATIVE)
@pytest.mark.parametrize("positive", POSITIVE)
def test_matches_loop_reference_every_step(dtype, positive, negative, sync_free):
    saw_outlier, saw_wrap = run_against_reference(dtype, positive, negative, sync_free=sync_free)
    assert saw_outlier and saw_wrap  # the run crossed the filter and wrapped the ring buffer


@pytest.mark.parametrize("sync_free", [False, True], ids=["host_sizes", "fixed_shape"])
@pytest.mark.parametrize("memory_size", [1, 4, 23])
def test_matches_loop_reference_memory_sizes(memory_size, sync_free):
    # T = 1 and 4: every batch (3..9 rows) is larger than the memory; 23: several partial wraps
    run_against_reference(
        torch.float64, "decay", "inverse_effective_number", memory_size=memory_size, epochs=5,
        sync_free=sync_free,
    )  # fmt: skip


def test_matches_reference_paper_defaults():
    # default hyper-parameters (V = 100, h = 0.15, ...), switches at epochs 3 and 4
    run_against_reference(
        torch.float64, "decay", "inverse_effective_number", C=5, D=4, epochs=5, steps=2,
        volume_bound=100.0, hardness_scale=0.15, memory_start_epoch=3, filter_start_epoch=4,
        memory_size=10,
    )  # fmt: skip


# --------------------------------------------------------------------------- Proxy-Anchor
def pa_pair(C, D, dtype, **kwargs):
    torch.manual_seed(3)
    isa = ProxyISALoss(C, D, **kwargs).to(dtype)
    pa = ProxyAnchorLoss(C, D)
    pa.proxies.data = isa.proxies.data.clone()
    return isa, pa


def compare_with_pa(isa, pa, X, y, dtype, indices_tuple=None):
    rtol, atol = tolerances(dtype)
    X1, X2 = X.clone().requires_grad_(True), X.clone().requires_grad_(True)
    isa.proxies.grad = None
    pa.proxies.grad = None
    a = isa(X1, y, indices_tuple)
    b = pa(X2, y, indices_tuple)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    torch.testing.assert_close(X1.grad, X2.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(isa.proxies.grad, pa.proxies.grad, rtol=rtol, atol=atol)


def test_first_step_equals_proxy_anchor(dtype):
    isa, pa = pa_pair(20, 16, dtype)
    X = torch.randn(30, 16, dtype=dtype)
    y = torch.randint(0, 20, (30,))
    compare_with_pa(isa, pa, X, y, dtype)
    assert int(isa.sample_counts.sum()) == 30  # and the state moved on


def test_no_weighting_equals_proxy_anchor_at_every_step(dtype):
    isa, pa = pa_pair(
        8, 6, dtype, positive_weighting="none", negative_weighting="none", memory_size=10,
        memory_start_epoch=2, filter_start_epoch=3, hardness_scale=1.0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    opt = torch.optim.SGD([isa.proxies], lr=0.5)
    for epoch in range(1, 5):
        isa.set_epoch(epoch)
        for _ in range(3):
            X = torch.randn(12, 6, generator=gen, dtype=torch.float64).to(dtype)
            y = torch.randint(0, 8, (12,), generator=gen)
            compare_with_pa(isa, pa, X, y, dtype)
            opt.step()
            pa.proxies.data = isa.proxies.data.clone()
    assert int(isa.memory_count) == 10 and bool(isa.filter_enabled)
    assert float(isa.effective_numbers.max()) > 1  # the state did evolve


def test_miner_weights_as_proxy_anchor():
    isa, pa = pa_pair(6, 5, torch.float64, positive_weighting="none", negative_weighting="none")
    X = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 6, (16,))
    tuples = MultiSimilarityMiner(epsilon=0.5)(X, y)
    compare_with_pa(isa, pa, X, y, torch.float64, tuples)


# --------------------------------------------------------------------------- state handling
def state_of(loss):
    return {k: v.clone() for k, v in loss.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_state_dict_holds_all_state():
    loss = ProxyISALoss(5, 4, memory_size=7)
    assert set(STATE) | {"proxies"} == set(loss.state_dict().keys())
    assert loss.memory_embeddings.dtype == loss.proxies.dtype == torch.float32


def test_set_epoch_switches():
    loss = ProxyISALoss(5, 4, memory_size=7)
    assert (int(loss.epoch), bool(loss.memory_enabled), bool(loss.filter_enabled)) == (1, 0, 0)
    loss.set_epoch(3)
    assert (bool(loss.memory_enabled), bool(loss.filter_enabled)) == (True, False)
    loss.set_epoch(4)
    assert (bool(loss.memory_enabled), bool(loss.filter_enabled)) == (True, True)
    with pytest.raises(ValueError, match="epoch"):
        loss.set_epoch(-1)
    fresh = ProxyISALoss(5, 4, memory_size=7)
    fresh.load_state_dict(loss.state_dict())
    assert (fresh._epoch, fresh._memory_on, fresh._filter_on) == (4, True, True)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(positive_weighting="sigma"),
        dict(negative_weighting="decay"),
        dict(memory_size=0),
        dict(volume_bound=0.5),
        dict(memory_start_epoch=0),
        dict(distributed_batch_layout="x"),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ProxyISALoss(5, 4, **kwargs)


def train_plain(loss, model, opt, batches, epochs_of_steps):
    values = []
    for (X, y), epoch in zip(batches, epochs_of_steps):
        loss.set_epoch(epoch)
        opt.zero_grad()
        value = loss(model(X), y)
        value.backward()
        opt.step()
        values.append(value.item())
    return values


def make_run(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 5)
    loss = ProxyISALoss(7, 5, memory_size=9, memory_start_epoch=2, filter_start_epoch=3,
                        volume_bound=4.0, hardness_scale=0.5)  # fmt: skip
    opt = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=0.05)
    return model, loss, opt


def test_resume_from_state_dict_is_exact(tmp_path):
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 7, (8,), generator=gen))
               for _ in range(15)]  # fmt: skip
    epochs = [1 + i // 3 for i in range(15)]  # 5 epochs of 3 steps
    model, loss, opt = make_run()
    full = train_plain(loss, model, opt, batches, epochs)

    model, loss, opt = make_run()
    first = train_plain(loss, model, opt, batches[:7], epochs[:7])  # stops inside epoch 3
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "loss": loss.state_dict(),
                "opt": opt.state_dict()}, path)  # fmt: skip
    model, loss, opt = make_run(seed=123)  # different initial values, overwritten by the load
    ckpt = torch.load(path)
    model.load_state_dict(ckpt["model"])
    loss.load_state_dict(ckpt["loss"])
    opt.load_state_dict(ckpt["opt"])
    rest = train_plain(loss, model, opt, batches[7:], epochs[7:])
    assert first + rest == full
    assert bool(loss.filter_enabled) and int(loss.memory_count) == 9


def test_eval_mode_changes_nothing():
    model, loss, opt = make_run()
    gen = torch.Generator().manual_seed(2)
    for epoch in (1, 2, 3):
        loss.set_epoch(epoch)
        loss(torch.randn(8, 5, generator=gen), torch.randint(0, 7, (8,), generator=gen))
    before = state_of(loss)
    loss.eval()
    value = loss(torch.randn(8, 5, generator=gen), torch.randint(0, 7, (8,), generator=gen))
    assert torch.isfinite(value)
    assert_same_state(before, state_of(loss))


def test_failed_steps_change_nothing(monkeypatch):
    _, loss, _ = make_run()
    gen = torch.Generator().manual_seed(2)
    for epoch in (1, 2, 3):
        loss.set_epoch(epoch)
        loss(torch.randn(8, 5, generator=gen), torch.randint(0, 7, (8,), generator=gen))
    before = state_of(loss)
    X, y = torch.randn(8, 5, generator=gen), torch.randint(0, 7, (8,), generator=gen)
    bad = y.clone()
    bad[3] = 7
    with pytest.raises(ValueError, match="labels"):
        loss(X, bad)
    nan = X.clone()
    nan[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        loss(nan, y)
    with pytest.raises(ValueError, match="embedding size"):
        loss(torch.randn(8, 4), y)

    # an error after the loss is computed (here in the reducer) still changes nothing
    class Broken(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("reducer failed")

    monkeypatch.setattr(loss, "reducer", Broken())
    with pytest.raises(RuntimeError, match="reducer failed"):
        loss(X, y)
    assert_same_state(before, state_of(loss))


def test_autocast_computes_in_float32_and_keeps_proxies_float32():
    torch.manual_seed(0)
    loss = ProxyISALoss(6, 8, memory_size=5, memory_start_epoch=1, filter_start_epoch=1)
    ref = copy.deepcopy(loss)
    X = torch.randn(10, 8).to(torch.bfloat16)
    y = torch.randint(0, 6, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = loss(X, y)
    b = ref(X.float(), y)
    assert a.dtype == torch.float32 and loss.proxies.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert_same_state(state_of(loss), state_of(ref))


def sync_free_steps(device, steps=3):
    """A few sync-free training steps (memory on from epoch 1, filter from epoch 2)."""
    torch.manual_seed(0)
    loss = ProxyISALoss(6, 8, memory_size=5, memory_start_epoch=1, filter_start_epoch=2,
                        volume_bound=4.0, hardness_scale=0.5).to(device)  # fmt: skip
    loss.sync_free_memory_updates = True
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(10, 8, generator=gen).to(device),
                torch.randint(0, 6, (10,), generator=gen).to(device))
               for _ in range(steps)]  # fmt: skip
    return loss, batches


def test_sync_free_state_update_builds_no_tensor_from_host_values(monkeypatch):
    # on CUDA, torch.tensor(host value, device=...) is a blocking H2D copy, i.e. a host sync:
    # the fixed-shape update path (filter off and on) must build its tensors on the device
    loss, batches = sync_free_steps("cpu")

    def host_tensor(*args, **kwargs):
        raise AssertionError("torch.tensor called in the sync-free state update")

    for epoch in (1, 2):
        loss.set_epoch(epoch)
        X, y = batches[epoch]
        loss(X, y)  # warm-up outside the patch (caches)
        loss.compute_proxy_loss(X, y, None)
        update = loss._staged_state
        assert (update["outliers"] is None) == (epoch == 1)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "tensor", host_tensor)
            loss.commit_state(update)
        loss._staged_state = None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_update_has_no_host_sync():
    loss, batches = sync_free_steps("cuda")
    for epoch in (1, 2):
        loss.set_epoch(epoch)
        X, y = batches[epoch]
        loss(X, y)
        loss.compute_proxy_loss(X, y, None)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss.commit_state(loss._staged_state)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            loss._staged_state = None


def test_statistics():
    loss = ProxyISALoss(6, 2, memory_size=20, memory_start_epoch=1, filter_start_epoch=2,
                        collect_stats=True)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    loss(torch.randn(10, 2, generator=gen), torch.randint(0, 6, (10,), generator=gen))
    assert loss.memory_fill == pytest.approx(0.5)
    assert loss.mean_positive_weight == 1.0 and loss.mean_negative_weight == 1.0
    assert loss.outlier_fraction == 0.0
    assert loss.mean_effective_number == pytest.approx(loss.effective_numbers.mean().item())
    assert loss.mean_learned_similarity == pytest.approx(loss.learned_similarities.mean().item())
    loss.set_epoch(2)
    for _ in range(3):
        loss(torch.randn(10, 2, generator=gen), torch.randint(0, 6, (10,), generator=gen))
    assert loss.memory_fill == 1.0
    assert loss.mean_negative_weight < 1.0
    assert loss.mean_positive_weight != 1.0
    assert 0.0 <= loss.outlier_fraction <= 1.0
    quiet = ProxyISALoss(6, 2, memory_size=20)
    quiet(torch.randn(10, 2), torch.randint(0, 6, (10,)))
    assert not hasattr(quiet, "memory_fill")


# --------------------------------------------------------------------------- hooks
class FakeTrainer:
    def __init__(self, loss_funcs):
        self.loss_funcs = loss_funcs
        self.epoch = 1


def test_set_epoch_finds_wrapped_losses():
    a = ProxyISALoss(5, 4, memory_size=7)
    b = ProxyISALoss(5, 4, memory_size=7)
    funcs = {"metric_loss": DistributedLossWrapper(a), "other": [b], "plain": torch.nn.Linear(2, 2)}
    assert stateful_losses(funcs) == [a, b]
    assert set_epoch(funcs, 4) == 2
    assert int(a.epoch) == int(b.epoch) == 4


def test_set_epoch_hook_with_fake_trainer():
    loss = ProxyISALoss(5, 4, memory_size=7)
    trainer = FakeTrainer({"metric_loss": loss})
    calls = []
    hook = SetEpochHook()
    chained = hook.end_of_epoch_hook(lambda t: calls.append(int(loss.epoch)) or False)
    assert chained(trainer) is False  # the wrapped hook's result is passed on
    assert calls == [2]  # the wrapped hook (e.g. a checkpoint) already sees the next epoch
    # attached: a forward syncs the loss to trainer.epoch before computing anything
    trainer.epoch = 4
    loss(torch.randn(6, 4), torch.randint(0, 5, (6,)))
    assert int(loss.epoch) == 4 and bool(loss.filter_enabled)
    hook.detach()
    trainer.epoch = 1
    loss(torch.randn(6, 4), torch.randint(0, 5, (6,)))
    assert int(loss.epoch) == 4


# --------------------------------------------------------------------------- distributed
def _distributed_worker(rank, world, init_file, out_dir, steps, layout):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)  # same proxies on every rank
        loss = ProxyISALoss(5, 4, memory_size=7, memory_start_epoch=1, filter_start_epoch=2,
                            volume_bound=4.0, hardness_scale=0.5,
                            distributed_batch_layout=layout)  # fmt: skip
        wrapped = DistributedLossWrapper(loss)
        opt = torch.optim.SGD(loss.parameters(), lr=0.5)
        for step in range(steps):
            loss.set_epoch(1 + step // 2)
            gen = torch.Generator().manual_seed(100 * step + rank)  # different data per rank
            X = torch.randn(4, 4, generator=gen, requires_grad=True)
            y = torch.randint(0, 5, (4,), generator=gen)
            opt.zero_grad()
            wrapped(X, y).backward()
            torch.distributed.all_reduce(loss.proxies.grad)  # as DDP would (sum: same result)
            opt.step()
            for name, value in loss.state_dict().items():
                gathered = [torch.empty_like(value) for _ in range(world)]
                torch.distributed.all_gather(gathered, value.contiguous())
                if not all(torch.equal(g, gathered[0]) for g in gathered):
                    raise AssertionError(f"state {name} differs between ranks at step {step}")
        torch.save(loss.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two gloo processes
def test_distributed_ranks_hold_identical_state(tmp_path, layout="pml"):
    steps, world = 6, 2
    # fork: no re-import of torch in the workers (spawn costs ~15 s on a small machine)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _distributed_worker,
        args=(world, str(tmp_path / "init"), str(tmp_path), steps, layout),
        nprocs=world,
        join=True,
        start_method=method,
    )
    final = torch.load(tmp_path / "rank0.pt")
    assert int(final["memory_count"]) == 7 and bool(final["filter_enabled"])
    # the same run in one process on the gathered batch in rank order gives the same state
    torch.manual_seed(0)
    loss = ProxyISALoss(5, 4, memory_size=7, memory_start_epoch=1, filter_start_epoch=2,
                        volume_bound=4.0, hardness_scale=0.5)  # fmt: skip
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    for step in range(steps):
        loss.set_epoch(1 + step // 2)
        Xs, ys = [], []
        for rank in range(world):
            gen = torch.Generator().manual_seed(100 * step + rank)
            Xs.append(torch.randn(4, 4, generator=gen))
            ys.append(torch.randint(0, 5, (4,), generator=gen))
        opt.zero_grad()
        (world * loss(torch.cat(Xs), torch.cat(ys))).backward()
        loss.proxies.grad *= world  # all_reduce sum of the ranks' equal gradients
        opt.step()
    for name, value in loss.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, final[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, final[name]), name
