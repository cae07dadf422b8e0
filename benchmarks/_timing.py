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
from tqdm import tqdm


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


def cpu_time(step: Callable[[], object], device: torch.device) -> float:
    """Process CPU seconds of one ``step()`` (steadier than wall time on a shared machine)."""
    start = time.process_time()
    step()
    synchronize(device)
    return time.process_time() - start


def interleaved_times(
    steps: dict, device: torch.device, repeats: int, desc: str, clock: str = "wall"
) -> dict:
    """Median seconds per step, measuring one step of each in turn for ``repeats`` rounds (so
    that load changes hit every step alike); ``clock`` is ``"wall"`` or ``"cpu"``."""
    for step in steps.values():  # warm-up
        median_time(step, device, repeats=1, warmup=2)
    times = {name: [] for name in steps}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, step in steps.items():
            if clock == "cpu":
                times[name].append(cpu_time(step, device))
            else:
                times[name].append(median_time(step, device, repeats=1, warmup=0))
    return {name: statistics.median(values) for name, values in times.items()}


def make_batch(batch: int, dim: int, num_classes: int, device: torch.device, seed: int = 0):
    """Random embeddings (requiring grad) and labels, from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    return embeddings, labels
