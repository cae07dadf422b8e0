"""Training the package's losses with ``torchrun`` and ``DistributedDataParallel`` (DDP).

What a DDP user of a proxy loss needs, in a few lines: start the process group from
``torchrun``'s environment (:func:`init_from_env`), wrap the loss (:class:`DistributedProxyLoss`)
and the trunk (:func:`wrap_model`), split every global batch over the ranks
(:class:`ShardedBatchSampler`, :class:`DistributedMPerClassSampler`) and gather the evaluation
embeddings (:func:`shard_indices`, :func:`gather_embeddings`). Every helper is a no-op with one
process, so the same script runs with ``python`` and with ``torchrun --nproc-per-node N``.

How the pieces keep a run with ``N`` processes and global batch ``B`` equal to the one-process
run with batch ``B`` (same draw, same loss values and gradients to float rounding):

* **The loss sees the global batch.** :class:`DistributedProxyLoss` is PML's
  ``DistributedLossWrapper(efficient=False)``: every rank all-gathers the embeddings and labels and
  computes the loss of the whole global batch, so stateful losses (Proxy-ISA's memory, filter and
  epoch schedule, VCPA's Newton steps and noise) update from the same data on every rank, and
  identically (they put the gathered batch in rank order; VCPA broadcasts its noise state from rank
  0 at the first step). The wrapper returns ``N x`` the loss, so that DDP's gradient *average*
  over the ranks gives the trunk the gradient of the global loss.
* **The proxies are not in DDP.** Each rank's proxy gradient is ``N x`` the global one, computed on
  a differently ordered batch (last bits differ); :meth:`DistributedProxyLoss.sync_gradients`
  all-reduces it and divides by ``N**2``: every rank then holds the same bits, equal to the
  one-process gradient to float rounding, and the optimizer keeps the proxies identical. Wrapping
  the loss in DDP instead would average the ``N x`` gradients (``N`` times too large) and refuses
  VCPA, whose proxies have no gradient (no parameters).
* **The sampler draws the single-process stream.** :class:`ShardedBatchSampler` draws the
  single-process sampler's indices (the same draw for the same seed) on every rank and gives rank
  ``r`` the ``r``-th slice of every global batch; with PML's ``MPerClassSampler``
  (:class:`DistributedMPerClassSampler`) each slice holds whole classes (``m`` images each).
  Every rank gets the same number of batches. Once per pass, the ranks check that they drew the
  same stream (a checksum), and raise otherwise.

A complete example (``torchrun --nproc-per-node 2 train.py``; ``python train.py`` runs it on one
process)::

    import torch
    from torch.utils.data import DataLoader, Subset

    from pml_proxies import distributed as D
    from pml_proxies.losses import ProxyISALoss

    rank, world, device = D.init_from_env("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # the same network and proxies on every rank
    model = build_model().to(device)  # your trunk + embedder (frozen BatchNorm or SyncBatchNorm)
    loss = D.DistributedProxyLoss(ProxyISALoss(num_classes, 512).to(device))
    ddp_model = D.wrap_model(model, device)  # DDP with several processes, else `model`
    optimizer = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=1e-4)
    sampler = D.DistributedMPerClassSampler(train_set.labels, m=4, batch_size=128,
                                            length_before_new_iter=len(train_set))
    loader = DataLoader(train_set, batch_size=sampler.local_batch_size, sampler=sampler)
    for epoch in range(1, epochs + 1):
        loss.loss.set_epoch(epoch)  # Proxy-ISA's schedule: the same epoch on every rank
        for x, y in loader:
            value = loss(ddp_model(x.to(device)), y.to(device))  # world x global-batch loss
            optimizer.zero_grad()
            value.backward()
            loss.sync_gradients()  # proxies: the global gradient, the same bits on every rank
            optimizer.step()
        model.eval()
        rows = D.shard_indices(len(test_set))  # this rank's share of the test set
        with torch.no_grad():
            emb = torch.cat([model(x.to(device)) for x, _ in DataLoader(Subset(test_set, rows))])
        labels = torch.as_tensor(test_set.labels)[list(rows)].to(device)
        emb, labels = D.gather_embeddings(emb, labels)  # the whole test set, in order
        if rank == 0:
            print(calculator.get_accuracy(emb, labels))
            torch.save({"model": model.state_dict(), "loss": loss.loss.state_dict()}, "last.pt")
    D.destroy()
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Iterator

import numpy as np
import torch
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from torch.utils.data import Sampler

from .functional.distributed import world

__all__ = [
    "DistributedMPerClassSampler",
    "DistributedProxyLoss",
    "ShardedBatchSampler",
    "destroy",
    "gather_embeddings",
    "init_from_env",
    "shard_indices",
    "world",
    "wrap_model",
]


# ------------------------------------------------------------------ process group
def init_from_env(device: str | torch.device = "cpu") -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment)
    first initialise the default process group: NCCL for a CUDA ``device`` (this process's device
    becomes ``cuda:LOCAL_RANK``), gloo otherwise. Without ``torchrun``: ``(0, 1, device)``.

    Raises:
        ValueError: ``WORLD_SIZE`` or ``LOCAL_RANK`` is not an integer.
    """
    device = torch.device(device)
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ValueError(f"WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun): {e}") from e
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = world()
    return rank, world_size, device


def destroy(wait: bool = True) -> None:
    """End of a script: wait for every rank (:func:`torch.distributed.barrier`; ``wait=False``
    on a failure path, where a peer may be gone), then destroy the default process group, where
    one is initialised.

    The barrier keeps a rank that finished early (every rank but 0 skips the metrics and the
    writing) from tearing its connections down while rank 0 still works, and the garbage
    collection afterwards frees the group's last references (a DDP wrapper's, for instance)
    while the interpreter is still alive: gloo's worker threads destroyed during interpreter
    shutdown can abort the process ("terminate called without an active exception", SIGABRT),
    which torchrun reports as a failed job although every result was written.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        gc.collect()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` with several processes, else ``model`` itself.

    DDP reduces the gradients of the parameters that require one *when it is built*: build it
    again when that set changes (a warm-up that freezes the trunk). Building broadcasts rank 0's
    parameters and buffers, so every rank starts from the same network.
    """
    if world()[1] == 1:
        return model
    device = torch.device(device)
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


# ------------------------------------------------------------------ loss
class DistributedProxyLoss(DistributedLossWrapper):
    """PML's ``DistributedLossWrapper(loss, efficient=False)`` plus the gradient exchange of the
    loss's own parameters (see the module docstring for why not DDP).

    With several processes ``forward`` returns ``world_size x`` the loss of the gathered global
    batch (what DDP's gradient average needs; divide by ``world_size`` to log the global loss);
    with one process it returns ``loss(...)``. Save and load ``wrapper.loss.state_dict()``: it
    does not depend on the world size. A miner's ``indices_tuple`` must index the gathered batch:
    wrap the miner in PML's ``DistributedMinerWrapper`` (the proxy losses take none).
    """

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__(loss, efficient=False)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if world()[1] == 1:
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """After ``backward``: replace every loss parameter's gradient by the global-batch
        gradient, identical on every rank (sum over ranks / ``world_size**2``). Collective:
        every rank calls it after every backward (a no-op with one process)."""
        world_size = world()[1]
        if world_size == 1:
            return
        for p in self.loss.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:  # every rank computes the same graph: none has one
                continue
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world_size**2)


# ------------------------------------------------------------------ samplers
class ShardedBatchSampler(Sampler[int]):
    """This rank's share of every global batch that ``sampler`` draws.

    ``sampler`` is the single-process sampler (its indices in batches of ``batch_size``, e.g.
    PML's ``MPerClassSampler`` or a seeded ``RandomSampler``); every rank draws it whole (the same
    draw, given the same seed) and keeps slice ``rank`` of each global batch, the slices in rank
    order making up the single-process batch. Use it with a ``DataLoader`` of batch size
    :attr:`local_batch_size` and ``drop_last=True``; an incomplete last global batch is dropped
    (as the single-process loader with ``drop_last=True`` does), so every rank runs the same
    number of steps.

    Args:
        sampler: the single-process sampler.
        batch_size: the global batch size ``B``.
        block: the slices must be multiples of ``block`` (``m`` for ``MPerClassSampler``: whole
            classes per rank).
        rank, world_size: default: this process's (:func:`world`).
        check: once per pass, check (a collective, in an initialised process group) that every
            rank drew the same stream.

    Raises:
        ValueError: ``B`` not a multiple of ``world_size * block``, a bad rank.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        *,
        block: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        check: bool = True,
    ) -> None:
        own_rank, own_world = world()
        self.rank = own_rank if rank is None else int(rank)
        self.world_size = own_world if world_size is None else int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got {rank} and {world_size}")
        if batch_size < 1 or block < 1 or batch_size % (self.world_size * block):
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of world_size x block "
                f"({self.world_size} x {block}): every rank gets the same number of whole blocks"
            )
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // self.world_size
        self.check = check

    def global_batches(self) -> int:
        """Number of whole global batches in one pass of ``sampler``."""
        return len(self.sampler) // self.batch_size  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.global_batches() * self.local_batch_size

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to ``sampler`` where it has ``set_epoch`` (e.g. a ``DistributedSampler``)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        n = self.global_batches()
        if len(indices) < n * self.batch_size:
            raise RuntimeError(f"the sampler gave {len(indices)} indices, its len() says more")
        if self.check and world()[1] > 1:
            _check_same_stream(indices)
        shards = indices[: n * self.batch_size].reshape(n, self.world_size, -1)
        return iter(shards[:, self.rank].reshape(-1).tolist())


def _check_same_stream(indices: np.ndarray) -> None:
    digest = hashlib.sha1(indices.tobytes()).hexdigest()
    digests: list = [None] * world()[1]
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise RuntimeError(
            "the ranks drew different batches: seed numpy / torch identically on every rank "
            "(e.g. the same seed) and draw no other random numbers on one rank only"
        )


class DistributedMPerClassSampler(ShardedBatchSampler):
    """PML's ``MPerClassSampler(labels, m, batch_size, length_before_new_iter)`` split over the
    ranks: the global batch (``batch_size // m`` classes, ``m`` images each, drawn with numpy's
    global random state as the single-process sampler) is the single-process batch; each rank
    gets ``batch_size // (world_size * m)`` whole classes. See :class:`ShardedBatchSampler`."""

    def __init__(
        self,
        labels,
        m: int,
        batch_size: int,
        length_before_new_iter: int = 100000,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        check: bool = True,
    ) -> None:
        from pytorch_metric_learning.samplers import MPerClassSampler

        super().__init__(
            MPerClassSampler(labels, m, batch_size, length_before_new_iter),
            batch_size,
            block=m,
            rank=rank,
            world_size=world_size,
            check=check,
        )


# ------------------------------------------------------------------ evaluation
def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Rows of this rank's contiguous share of ``n`` rows (the shares in rank order are
    ``range(n)``; sizes differ by at most one)."""
    own_rank, own_world = world()
    rank = own_rank if rank is None else rank
    world_size = own_world if world_size is None else world_size
    return range(rank * n // world_size, (rank + 1) * n // world_size)


@torch.no_grad()
def gather_embeddings(
    embeddings: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(embeddings, labels)`` concatenated in rank order, on every rank (the whole
    evaluation set when each rank embedded its :func:`shard_indices`); the inputs themselves with
    one process. The shards may differ in size. Collective."""
    world_size = world()[1]
    if world_size == 1:
        return embeddings, labels
    dist, device = torch.distributed, embeddings.device
    size = torch.tensor([embeddings.shape[0]], device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    pad = max(counts) - embeddings.shape[0]
    parts = []
    for tensor in (embeddings, labels.to(device)):
        padded = torch.cat([tensor, tensor.new_zeros((pad, *tensor.shape[1:]))])
        gathered = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(gathered, padded.contiguous())
        parts.append(torch.cat([g[:c] for g, c in zip(gathered, counts)]))
    return parts[0], parts[1].to(labels.device)
