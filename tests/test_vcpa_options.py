"""VCPA beyond the paper (damped and monotone Newton steps, the objective estimate and its stats)
and the loss's contract (validated arguments, validated state, no host sync on CUDA).

References are written here: the objective estimate against PML's ``ProxyAnchorLoss`` at every
draw plus a KL written from its formula, the line search's rule against its definition.
"""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from pytorch_metric_learning.losses import ProxyAnchorLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner
from test_vcpa import assert_same_state, make_batch, state_of

from pml_proxies.losses import VCPALoss
from pml_proxies.losses.vcpa_loss import (
    CUDA_STATE_BYTES,
    expected_objective,
    newton_batch,
    newton_update,
)

#: every Newton option, each tested for resume, seeds, eval and distributed behaviour
OPTIONS = {
    "paper": {},
    "damped": {"newton_damping": 0.25},
    "monotone": {"newton_line_search": True},
    "monotone-damped-S3": {
        "newton_line_search": True,
        "newton_damping": 0.5,
        "objective_samples": 3,
        "line_search_backtracks": 1,
    },
    "monotone-deterministic": {"newton_line_search": True, "stochastic": False},
}
OPTION_PARAMS = [pytest.param(v, id=k) for k, v in OPTIONS.items()]


def clustered_batch(num_classes=10, dim=16, batch=40, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=gen, dtype=dtype), dim=1)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    emb = centres[labels] + 0.3 * torch.randn(batch, dim, generator=gen, dtype=dtype)
    return emb, labels


def reference_objective(loss, emb, labels, mean, std, mean_prev, std_prev, eps, pairs=None):
    """tau KL(q || q_prev) + mean over draws of PML's ProxyAnchorLoss at mean + std * eps."""
    tau = loss.temperature
    kl = (
        0.5
        * (
            (std / std_prev) ** 2
            + ((mean - mean_prev) / std_prev) ** 2
            - 1
            - 2 * torch.log(std / std_prev)
        ).sum()
    )
    reference = ProxyAnchorLoss(loss.num_classes, loss.embedding_size, alpha=32, margin=0.1)
    reference = reference.to(emb.dtype)
    values = []
    for e in eps:
        reference.proxies.data = mean + std * e
        values.append(reference(emb, labels, pairs))
    return tau * kl + torch.stack(values).mean()


# ------------------------------------------------------------------- constructor validation
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": 1e-40}, ValueError, r"alpha\*\*2 / temperature"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"alpha": -32.0}, ValueError, "alpha"),
        ({"alpha": 1e200}, ValueError, "alpha"),
        ({"margin": float("nan")}, ValueError, "margin"),
        ({"margin": 1e300}, ValueError, "margin"),
        ({"newton_steps": 2.5}, ValueError, "newton_steps"),
        ({"newton_steps": -1}, ValueError, "newton_steps"),
        ({"newton_steps": "3"}, TypeError, "newton_steps"),
        ({"sigma_min": 0.0}, ValueError, "sigma_min"),
        ({"sigma_min": 1e-30}, ValueError, "sigma_min"),
        ({"sigma_min": float("inf")}, ValueError, "sigma_min"),
        ({"stochastic": "yes"}, TypeError, "stochastic"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2.5}, ValueError, "seed"),
        ({"newton_damping": 0.0}, ValueError, "newton_damping"),
        ({"newton_damping": 1.5}, ValueError, "newton_damping"),
        ({"newton_damping": float("nan")}, ValueError, "newton_damping"),
        ({"newton_line_search": 1}, TypeError, "newton_line_search"),
        ({"objective_samples": 0}, ValueError, "objective_samples"),
        ({"objective_samples": 2.5}, ValueError, "objective_samples"),
        ({"line_search_backtracks": -1}, ValueError, "line_search_backtracks"),
        ({"newton_steps": 0, "newton_damping": 0.5}, ValueError, "newton_steps > 0"),
        ({"newton_steps": 0, "newton_line_search": True}, ValueError, "newton_steps > 0"),
    ],
)
def test_constructor_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        VCPALoss(3, 4, **kwargs)


def test_constructor_accepts_and_converts():
    loss = VCPALoss(3, 4, newton_steps=3.0, temperature=1, alpha=32, newton_damping=1)
    assert loss.newton_steps == 3 and isinstance(loss.newton_steps, int)
    assert isinstance(loss.temperature, float) and loss.newton_damping == 1.0
    assert not loss.newton_line_search and loss.objective_samples == 8


# ------------------------------------------------------------------------ generator state
def test_corrupted_rng_state_raises_on_load():
    """Before: 10 zero bytes loaded silently and the generator was reseeded (inexact resume)."""
    source = VCPALoss(3, 4, seed=0)
    cpu_size = source.rng_state.numel()
    corrupt = [
        (torch.zeros(10, dtype=torch.uint8), "10 bytes"),
        (torch.zeros(cpu_size, dtype=torch.uint8), "not a valid CPU generator state"),
        (torch.zeros(cpu_size, dtype=torch.float32), "uint8"),
    ]
    for bad, match in corrupt:
        target = VCPALoss(3, 4, seed=1)
        before = state_of(target)
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(dict(state_of(source), rng_state=bad))
        assert_same_state(before, state_of(target))


@pytest.mark.parametrize("newton_steps", [0, 2])
def test_failed_load_changes_nothing(newton_steps):
    """A 5-class state into a 4-class loss: before, torch reported the size mismatch after
    rng_state had been replaced (and the generator reset), so the next step drew other noise."""
    emb, labels = make_batch(8, 4, 4, 0)
    target = VCPALoss(4, 4, newton_steps=newton_steps, seed=1)
    twin = VCPALoss(4, 4, newton_steps=newton_steps, seed=1)
    target(emb, labels)
    twin(emb, labels)
    before = state_of(target)
    source = VCPALoss(5, 4, newton_steps=newton_steps, seed=0)
    with pytest.raises(ValueError, match="proxy_mean has shape"):
        target.load_state_dict(source.state_dict())
    assert_same_state(before, state_of(target))
    # the cached generator too: the next step is the one of a loss that never saw the load
    assert torch.equal(target(emb, labels), twin(emb, labels))
    assert_same_state(state_of(twin), state_of(target))


@pytest.mark.parametrize("newton_steps", [0, 2])
@pytest.mark.parametrize("key", ["proxy_std", "proxy_mean"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300], ids=["inf", "nan", "1e300"])
def test_non_finite_state_is_refused(newton_steps, key, value):
    """Before: proxy_std = inf passed the sigma_min check and the next step turned the state
    NaN. 1e300 is finite in float64 but overflows the float32 buffer."""
    source = state_of(VCPALoss(3, 4, newton_steps=newton_steps, seed=0))
    source[key] = source[key].double()
    source[key][1, 2] = value
    target = VCPALoss(3, 4, newton_steps=newton_steps, seed=1)
    before = state_of(target)
    with pytest.raises(ValueError, match=key):
        target.load_state_dict(source)
    assert_same_state(before, state_of(target))


def test_corrupted_rng_state_buffer_raises_in_forward():
    loss = VCPALoss(3, 4, seed=0)
    loss.rng_state = torch.zeros(10, dtype=torch.uint8)
    emb, labels = make_batch(6, 4, 3, 0)
    with pytest.raises(ValueError, match="rng_state"):
        loss(emb, labels)


def test_cuda_sized_state_seeds_a_cpu_generator_deterministically():
    """A CUDA (Philox) state resumed on the CPU is still a valid state: it seeds the generator."""
    state = torch.arange(CUDA_STATE_BYTES, dtype=torch.uint8)
    emb, labels = make_batch(6, 4, 3, 0)
    values = []
    for seed in (1, 2):
        loss = VCPALoss(3, 4, seed=seed)
        loss.load_state_dict(dict(state_of(loss), rng_state=state))
        values.append(loss(emb, labels))
    assert torch.equal(values[0], values[1])


# ---------------------------------------------------------------------------- damping
@pytest.mark.parametrize("damping", [1.0, 0.25])
def test_damped_update_keeps_fixed_points(damping):
    """Where g = 0 nothing moves, whatever the step size."""
    gen = torch.Generator().manual_seed(0)
    shape = (5, 3)
    mean_prev = torch.randn(shape, generator=gen, dtype=torch.float64)
    std_prev = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
    inv_var_prev = std_prev.pow(-2)
    hess = torch.rand(shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    # stochastic: at the warm start with a zero data gradient, g_mu = g_sigma = 0
    mean, std, _ = newton_update(
        mean_prev, std_prev, eps.clone(), mean_prev, inv_var_prev,
        torch.zeros(shape, dtype=torch.float64), hess.clone(), 1e-5, False, damping,
    )  # fmt: skip
    torch.testing.assert_close(mean, mean_prev, rtol=0, atol=1e-15)
    torch.testing.assert_close(std, std_prev, rtol=0, atol=1e-15)
    # deterministic, away from the prior, with a data gradient that cancels the KL's
    mu = mean_prev + torch.randn(shape, generator=gen, dtype=torch.float64)
    grad = -(mu - mean_prev) * inv_var_prev
    mean, std, step = newton_update(
        mu, std_prev, None, mean_prev, inv_var_prev, grad, hess.clone(), 1e-5, False, damping
    )
    torch.testing.assert_close(mean, mu, rtol=0, atol=1e-14)
    assert torch.equal(std, std_prev)
    assert step.abs().max() < 1e-14


def test_damping_scales_the_step_and_converges_to_the_same_point():
    """eta scales the first step exactly; at tau = 100 (where the paper's steps converge) damped
    steps reach the same fixed point."""
    emb, labels = clustered_batch(dtype=torch.float64)
    finals, first_steps = [], []
    for damping, steps in ((1.0, 40), (0.25, 160)):
        loss = VCPALoss(10, 16, temperature=100.0, stochastic=False, newton_damping=damping, seed=0)
        loss = loss.double()
        start = loss.proxy_mean.clone()
        one = VCPALoss(
            10, 16, temperature=100.0, stochastic=False, newton_damping=damping, newton_steps=1
        ).double()
        one.load_state_dict(loss.state_dict())
        one(emb, labels)
        first_steps.append(one.proxy_mean - start)
        loss.newton_steps = steps
        loss(emb, labels)
        finals.append(loss.proxy_mean.clone())
    torch.testing.assert_close(first_steps[1], 0.25 * first_steps[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------- objective and line search
@pytest.mark.parametrize("with_miner", [False, True])
def test_objective_stats_match_reference(dtype, with_miner):
    """The monotone mode's first draws are its S fixed eps: objective_before / _after are
    tau KL + the mean over those draws of PML's ProxyAnchorLoss, before / after the steps."""
    num_classes, dim, seed, samples = 6, 8, 3, 4
    emb, labels = make_batch(20, dim, num_classes, 1, dtype)
    pairs = MultiSimilarityMiner(0.1)(emb, labels) if with_miner else None
    loss = VCPALoss(
        num_classes, dim, temperature=0.05, newton_steps=3, seed=seed, newton_line_search=True,
        objective_samples=samples, collect_stats=True,
    ).to(dtype)  # fmt: skip
    with torch.no_grad():  # start away from the prior
        loss.proxy_mean.copy_(0.3 * torch.randn(num_classes, dim, dtype=dtype))
        loss.proxy_std.uniform_(0.3, 0.9)
    mean_prev, std_prev = loss.proxy_mean.clone(), loss.proxy_std.clone()
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((samples, num_classes, dim), generator=gen, dtype=dtype)
    loss(emb, labels, pairs)
    before = reference_objective(
        loss, emb, labels, mean_prev, std_prev, mean_prev, std_prev, eps, pairs
    )
    after = reference_objective(
        loss, emb, labels, loss.proxy_mean, loss.proxy_std, mean_prev, std_prev, eps, pairs
    )
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    assert loss.objective_before == pytest.approx(float(before.detach()), rel=rtol)
    assert loss.objective_after == pytest.approx(float(after.detach()), rel=rtol)
    assert loss.objective_after <= loss.objective_before
    assert 0 <= loss.line_search_step <= 1


def test_objective_along_a_step_matches_pointwise():
    """The (T, C) estimate along mean + t d, std + t d_std equals the estimate at each point."""
    num_classes, dim = 7, 5
    emb, labels = make_batch(12, dim, num_classes, 2, torch.float64)
    gen = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    batch = newton_batch(F.normalize(emb, dim=1), labels, 0.5 + rand(12).abs())
    mean, d_mean, mean_prev = rand(num_classes, dim), rand(num_classes, dim), rand(num_classes, dim)
    std = 0.5 + rand(num_classes, dim).abs()
    d_std = 0.1 * rand(num_classes, dim).abs()
    std_prev = 0.5 + rand(num_classes, dim).abs()
    eps = rand(3, num_classes, dim)
    fractions = torch.tensor([0.0, 1.0, 0.5, 0.125], dtype=torch.float64)
    along = expected_objective(
        batch, mean, std, mean_prev, std_prev, eps, 32.0, 0.1, 0.07,
        step_mean=d_mean, step_std=d_std, fractions=fractions,
    )  # fmt: skip
    for k, t in enumerate(fractions.tolist()):
        point = expected_objective(
            batch, mean + t * d_mean, std + t * d_std, mean_prev, std_prev, eps, 32.0, 0.1, 0.07
        )
        torch.testing.assert_close(along[k], point[0], rtol=1e-10, atol=1e-12)


def test_accepted_fraction_is_the_largest_that_does_not_increase():
    fractions = torch.tensor([0.0, 1.0, 0.5, 0.25])
    values = torch.tensor(
        [
            [5.0, 5.0, 5.0, 5.0],  # current value of each of 4 classes
            [4.0, 6.0, 6.0, 5.0],  # t = 1
            [4.5, 4.9, 6.0, 7.0],  # t = 1/2
            [3.0, 4.0, 5.5, 7.0],  # t = 1/4
        ]
    )
    chosen = VCPALoss._accepted_fraction(values, fractions).squeeze(1)
    assert chosen.tolist() == [1.0, 0.5, 0.0, 1.0]  # equal counts as "does not increase"


def test_monotone_mode_never_increases_its_estimate_over_training():
    """At the paper's tau = 0.01, where the paper's stochastic steps raise the expected objective
    in many training steps, the monotone mode never does (on its own draws)."""
    emb_all, labels_all = clustered_batch(num_classes=20, dim=32, batch=200, seed=1)
    rises = {}
    for name, options in (("paper", {}), ("monotone", {"newton_line_search": True})):
        loss = VCPALoss(20, 32, seed=0, collect_stats=True, **options)
        rises[name] = 0
        for step in range(5):
            emb, labels = (
                emb_all[step * 40 : (step + 1) * 40],
                labels_all[step * 40 : (step + 1) * 40],
            )
            loss(emb, labels)
            rises[name] += loss.objective_after > loss.objective_before
    assert rises["monotone"] == 0
    assert rises["paper"] > 0  # the mode is needed here


def test_newton_path_leaves_state_untouched_and_follows_training():
    """newton_path's first M points are the objective along the training step's own iterates."""
    emb, labels = clustered_batch(dtype=torch.float64)
    loss = VCPALoss(10, 16, seed=0, newton_steps=3, newton_line_search=True).double()
    loss(emb, labels)
    before = state_of(loss)
    path = loss.newton_path(emb, labels, steps=5, num_samples=4, seed=7)
    assert path.shape == (6,)
    assert_same_state(before, state_of(loss))
    twin = VCPALoss(10, 16, seed=0, newton_steps=3, newton_line_search=True).double()
    twin.load_state_dict(before)
    with torch.no_grad():
        twin(emb, labels)  # the training step: its state is the path's third iterate
    batch = newton_batch(F.normalize(emb, dim=1), labels)
    gen = torch.Generator().manual_seed(7)
    eps = torch.randn((4, 10, 16), generator=gen, dtype=torch.float64)
    value = expected_objective(
        batch, twin.proxy_mean, twin.proxy_std, before["proxy_mean"], before["proxy_std"], eps,
        32.0, 0.1, 0.01,
    ).sum()  # fmt: skip
    torch.testing.assert_close(path[3], value, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------- behaviour kept for every option
@pytest.mark.parametrize("options", OPTION_PARAMS)
def test_collect_stats_does_not_change_training(options):
    emb, labels = clustered_batch()
    states = []
    for collect in (False, True):
        loss = VCPALoss(10, 16, seed=4, collect_stats=collect, **options)
        values = [loss(emb, labels) for _ in range(2)]
        states.append((values, state_of(loss)))
    assert all(torch.equal(a, b) for a, b in zip(states[0][0], states[1][0]))
    assert_same_state(states[0][1], states[1][1])


@pytest.mark.parametrize("options", OPTION_PARAMS)
def test_resume_seeds_and_eval_for_every_option(options):
    num_classes, dim = 6, 8
    batches = [make_batch(12, dim, num_classes, s) for s in range(4)]
    loss = VCPALoss(num_classes, dim, seed=11, newton_steps=2, **options)
    for emb, labels in batches[:2]:
        loss(emb, labels)
    resumed = VCPALoss(num_classes, dim, seed=999, newton_steps=2, **options)
    resumed.load_state_dict(loss.state_dict())
    twin = VCPALoss(num_classes, dim, seed=11, newton_steps=2, **options)
    for emb, labels in batches[:2]:
        twin(emb, labels)
    assert_same_state(state_of(loss), state_of(twin))  # same seed, same run
    for emb, labels in batches[2:]:
        assert torch.equal(loss(emb, labels), resumed(emb, labels))
    assert_same_state(state_of(loss), state_of(resumed))
    # eval: the loss at the means, no state change
    before = state_of(loss)
    loss.eval()
    emb, labels = batches[0]
    value = loss(emb, labels)
    assert_same_state(before, state_of(loss))
    reference = ProxyAnchorLoss(num_classes, dim)
    reference.proxies.data = loss.proxy_mean.clone()
    torch.testing.assert_close(value, reference(emb, labels))


@pytest.mark.parametrize("options", OPTION_PARAMS)
def test_failing_step_commits_nothing_for_every_option(options, monkeypatch):
    """An error after the Newton steps (in the reducer) leaves the state, generator included,
    as it was, for the paper's steps and every option."""
    emb, labels = make_batch(12, 8, 6, 0)
    loss = VCPALoss(6, 8, seed=0, **options)
    twin = VCPALoss(6, 8, seed=0, **options)
    before = state_of(loss)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(loss.reducer, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        loss(emb, labels)
    assert_same_state(before, state_of(loss))
    monkeypatch.undo()
    assert torch.equal(loss(emb, labels), twin(emb, labels))
    assert_same_state(state_of(loss), state_of(twin))


# --------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("options", OPTION_PARAMS)
def test_cuda_training_step_has_no_host_sync(options):
    """The Newton steps (damped, line-searched), the sampling and the state commit run without a
    host sync (before: ``addcmul_(value=<tensor>)`` synchronised)."""
    for num_classes in (6, 40):  # both algorithms of the positive terms (C < 2B, C >= 2B)
        loss = VCPALoss(num_classes, 8, seed=0, check_inputs=False, **options).to("cuda")
        emb, labels = make_batch(10, 8, num_classes, 0)
        emb, labels = emb.cuda(), labels.cuda()
        loss(emb, labels)  # warm-up (generator, caches)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss.compute_proxy_loss(emb, labels, None)
            loss.commit_state(loss._staged_state)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            loss._staged_state = None


# -------------------------------------------------------------------------- distributed
def _dist_worker(rank, world_size, init_file, out_dir, options):
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    loss = VCPALoss(6, 8, newton_steps=2, seed=None, **options)  # different seeds per rank
    torch.save(state_of(loss), os.path.join(out_dir, f"init{rank}.pt"))
    wrapper = DistributedLossWrapper(loss)
    values = []
    for step in range(2):
        emb, labels = make_batch(5, 8, 6, 100 * step + rank)
        value = wrapper(emb.requires_grad_(True), labels)
        value.backward()
        values.append(value.detach())
    torch.save({"state": state_of(loss), "values": values}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", [pytest.param(OPTIONS[k], id=k) for k in ("damped", "monotone-damped-S3")]
)
def test_distributed_two_ranks_for_the_new_options(tmp_path, options):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_dist_worker, args=(2, init_file, str(tmp_path), options), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert_same_state(r0["state"], r1["state"])
    assert all(torch.equal(a, b) for a, b in zip(r0["values"], r1["values"]))
    single = VCPALoss(6, 8, newton_steps=2, **options)
    single.load_state_dict(torch.load(tmp_path / "init0.pt"))
    for step in range(2):
        parts = [make_batch(5, 8, 6, 100 * step + r) for r in range(2)]
        value = single(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        assert torch.equal(value * 2, r0["values"][step])
    assert_same_state(state_of(single), r0["state"])
