"""``pml_proxies.distributed``: the sharded samplers, evaluation gathering, and two gloo processes
training a small trunk in DDP with every loss of the package and Proxy-Anchor, checked against
the one-process run with the same global batch."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pytorch_metric_learning.samplers import MPerClassSampler

from pml_proxies import distributed as D
from pml_proxies.benchmark.losses import build_loss

LOSSES = ("proxy_anchor", "mpa", "mpa_dw", "mpa_ap", "proxy_isa", "vcpa")
#: Proxy-ISA's memory from epoch 1 and its filter from epoch 2: the schedule runs in 8 steps
OVERRIDES = {"proxy_isa": dict(memory_size=12, memory_start_epoch=1, filter_start_epoch=2)}
NUM_CLASSES, IN_DIM, DIM, M, BATCH, STEPS_PER_EPOCH, EPOCHS = 6, 6, 8, 2, 8, 4, 2


# ------------------------------------------------------------------ samplers
def test_shards_make_up_the_single_process_batches():
    labels = np.repeat(np.arange(7), 5)
    world, batch = 2, 12
    np.random.seed(3)
    single = list(MPerClassSampler(labels, M, batch, 60))
    shards = []
    for rank in range(world):
        np.random.seed(3)  # every rank seeded as the single process
        shards.append(
            list(D.DistributedMPerClassSampler(labels, M, batch, 60, rank=rank, world_size=world))
        )
    assert len(shards[0]) == len(shards[1]) == 30  # 5 global batches, 6 indices per rank each
    local = batch // world
    for b in range(5):
        parts = [s[b * local : (b + 1) * local] for s in shards]
        assert parts[0] + parts[1] == single[b * batch : (b + 1) * batch]
        for part in parts:  # whole classes on each rank: m images per class
            counts = np.unique(labels[part], return_counts=True)[1]
            assert (counts == M).all() and len(counts) == local // M


def test_one_process_is_the_plain_sampler_and_bad_geometry_is_refused():
    labels = np.repeat(np.arange(4), 4)
    np.random.seed(0)
    plain = list(MPerClassSampler(labels, 2, 8, 16))
    np.random.seed(0)
    assert list(D.DistributedMPerClassSampler(labels, 2, 8, 16)) == plain
    with pytest.raises(ValueError, match="batch_size .* world_size x block"):
        D.DistributedMPerClassSampler(labels, 2, 6, 16, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        D.ShardedBatchSampler(range(8), 4, rank=2, world_size=2)


def test_incomplete_last_batch_is_dropped_on_every_rank():
    shards = [list(D.ShardedBatchSampler(range(11), 4, rank=r, world_size=2)) for r in range(2)]
    assert shards == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("n", [0, 1, 7, 10])
def test_shard_indices_cover_the_rows_in_order(n):
    shards = [D.shard_indices(n, r, 3) for r in range(3)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ------------------------------------------------------------------ training
def _data(dtype):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(10)
    x = torch.randn(len(labels), IN_DIM, generator=gen, dtype=dtype) + labels[:, None].to(dtype)
    return x, labels


def _state(module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _assert_same_on_every_rank(tensors: dict, what: str) -> None:
    for name, value in tensors.items():
        gathered = [torch.empty_like(value) for _ in range(D.world()[1])]
        torch.distributed.all_gather(gathered, value.detach().contiguous())
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise AssertionError(f"{what}: {name} differs between the ranks")


def _train(name: str, dtype) -> dict:
    """Train a small MLP with ``name`` under the helpers (any world size); the per-step global
    loss, trunk and proxy gradients and the final state, as on rank 0."""
    rank, world, device = D.init_from_env("cpu")
    x, labels = _data(dtype)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_DIM, 16), torch.nn.ReLU(), torch.nn.Linear(16, DIM)
    ).to(dtype)
    inner, _ = build_loss(name, NUM_CLASSES, DIM, overrides=OVERRIDES.get(name))
    loss = D.DistributedProxyLoss(inner.to(dtype))
    ddp = D.wrap_model(model, device)
    optimizer = torch.optim.SGD([*model.parameters(), *loss.parameters()], lr=0.05)
    np.random.seed(0)
    sampler = D.DistributedMPerClassSampler(labels, M, BATCH, BATCH * STEPS_PER_EPOCH)
    record: dict = {"values": [], "trunk_grads": [], "proxy_grads": []}
    for epoch in range(1, EPOCHS + 1):
        inner.set_epoch(epoch) if hasattr(inner, "set_epoch") else None
        rows = list(sampler)
        for step in range(STEPS_PER_EPOCH):
            idx = rows[step * sampler.local_batch_size : (step + 1) * sampler.local_batch_size]
            value = loss(ddp(x[idx]), labels[idx])
            optimizer.zero_grad()
            value.backward()
            loss.sync_gradients()
            optimizer.step()
            record["values"].append(value.detach() / world)
            record["trunk_grads"].append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            grads = [p.grad.flatten() for p in inner.parameters() if p.grad is not None]
            record["proxy_grads"].append(torch.cat(grads) if grads else torch.zeros(0))
            if world > 1:
                _assert_same_on_every_rank(_state(inner), f"{name} step {epoch}.{step}")
                _assert_same_on_every_rank(_state(model), f"{name} step {epoch}.{step}")
    with torch.no_grad():
        share = list(D.shard_indices(len(labels)))
        emb, gathered_labels = D.gather_embeddings(model(x[share]), labels[share])
    record.update(state={k: v.detach().clone() for k, v in _state(inner).items()}, emb=emb)
    assert torch.equal(gathered_labels, labels)
    return record


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        out = {f"{n}-{d}": _train(n, d) for n in LOSSES for d in (torch.float32, torch.float64)}
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "ddp.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two gloo processes
@pytest.mark.timeout(300)
def test_two_processes_equal_one_process_for_every_loss(tmp_path):
    # fork: no re-import of torch in the workers (spawn costs ~15 s on a small machine)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method=method,
    )  # raises if a rank's state ever differed from the other's
    ddp = torch.load(tmp_path / "ddp.pt")
    for name in LOSSES:
        for dtype in (torch.float32, torch.float64):
            single, multi = _train(name, dtype), ddp[f"{name}-{dtype}"]
            # the same sums in another order (gathered batch, DDP's average of world x the
            # gradient): the first step differs by rounding (a few ulps of the largest entry,
            # summed over the batch); training feeds the difference back, so float32 drifts to
            # ~1e-4 after 8 steps on the MPA losses (float64: ~1e-13)
            first, later = (1e-5, 1e-3) if dtype == torch.float32 else (1e-13, 1e-11)
            for key in ("values", "trunk_grads", "proxy_grads"):
                for step, (a, b) in enumerate(zip(single[key], multi[key], strict=True)):
                    _assert_relative(b, a, first if step == 0 else later, (name, dtype, key, step))
            for key, value in single["state"].items():
                # integer buffers: counts (equal), and Proxy-ISA's fixed-point memory sums of
                # float embeddings (rounding as the floats)
                _assert_relative(multi["state"][key].double(), value.double(), later, (name, key))
            _assert_relative(multi["emb"], single["emb"], later, (name, dtype, "embeddings"))


def _assert_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float, what) -> None:
    """``max |actual - expected| <= tol * max |expected|`` (an error relative to the scale)."""
    assert actual.shape == expected.shape, what
    if expected.numel():
        scale = float(expected.abs().max()) or 1.0
        assert float((actual - expected).abs().max()) <= tol * scale, what


def _leave_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    if rank == 0:  # the slow rank: metrics and writing, while the other has nothing left to do
        import time

        time.sleep(1.0)
        open(os.path.join(out_dir, "written"), "w").close()
    D.destroy()
    if rank == 1:  # left only after rank 0 had finished (not a timing race: a barrier)
        assert os.path.exists(os.path.join(out_dir, "written"))
    assert not torch.distributed.is_initialized()


@pytest.mark.timeout(120)
def test_destroy_waits_for_every_rank_before_tearing_the_group_down(tmp_path):
    """A rank that finished early tearing its gloo connections down during interpreter
    shutdown, while rank 0 still worked, aborted it (SIGABRT) in CI; ``destroy`` now waits."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _leave_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method=method,
    )
