"""Helpers shared by the benchmark tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

from pml_proxies.benchmark import BenchmarkConfig


def tiny_config(output: Path | str, losses, **kw) -> BenchmarkConfig:
    """A digits config that trains a run in about a second (``kw`` overrides any field)."""
    base = dict(
        dataset="digits",
        losses=list(losses),
        seeds=[0],
        output=str(output),
        epochs=2,
        iterations_per_epoch=2,
        embedding_size=16,
        batch_size=16,
        progress=False,
        map_samples=50,
        log_freq=1,
        jobs=1,  # in this process (parallel runs: tests/test_benchmark_jobs.py)
    )
    base.update(kw)
    return BenchmarkConfig(**base)
