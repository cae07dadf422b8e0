"""Helpers for losses under PML's ``DistributedLossWrapper`` (torch.distributed)."""

from __future__ import annotations

import functools

import torch


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside an initialised process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@functools.lru_cache(maxsize=64)
def _rank_order(batch_size: int, world_size: int, rank: int, device: torch.device) -> torch.Tensor:
    chunk = batch_size // world_size
    # chunk position of rank k in PML's layout: [own rank, 0, 1, .., rank-1, rank+1, ..]
    starts = [0 if k == rank else (k + 1 if k < rank else k) for k in range(world_size)]
    order = torch.arange(chunk).unsqueeze(0) + torch.tensor(starts).unsqueeze(1) * chunk
    return order.flatten().to(device)


def gathered_batch_rank_order(batch_size: int, device: torch.device) -> torch.Tensor | None:
    """Permutation putting a batch gathered by PML's ``DistributedLossWrapper`` in rank order.

    On rank ``r`` the wrapper passes ``[own chunk, rank 0, .., rank r-1, rank r+1, ..]``; stateful
    losses apply this permutation so that every rank updates its state with the same ordering and
    stays bit-identical. ``None`` outside torch.distributed, on rank 0 (already in order), or when
    the batch does not split evenly into one chunk per rank.
    """
    rank, world_size = world()
    if world_size <= 1 or rank == 0 or batch_size % world_size:
        return None
    return _rank_order(batch_size, world_size, rank, torch.device(device))
