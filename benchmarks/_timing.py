"""Timing helpers shared by the speed scripts in ``benchmarks/`` (not part of the package).

Speed is always reported as a ratio to a baseline measured in the same run, since machines are
shared and noisy; absolute milliseconds are printed for information only.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    step: Callable[[], object],
    device: torch.device,
    repeats: int = 10,
    warmup: int = 2,
) -> float:
    """Median wall time of ``step()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> float:
    """Extra peak memory of one ``step()`` in MB: CUDA peak allocation, or growth of the process's
    max RSS on CPU (a lower bound there, since RSS peaks are process-wide)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024


def forward_backward(loss_fn: torch.nn.Module, embeddings: torch.Tensor, labels: torch.Tensor):
    """A closure running one forward and backward of ``loss_fn`` (gradients cleared each time)."""

    def step():
        embeddings.grad = None
        loss_fn.zero_grad(set_to_none=True)
        loss = loss_fn(embeddings, labels)
        loss.backward()
        return loss

    return step


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with the given ``columns``."""
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
