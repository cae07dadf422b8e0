"""Time of the main job and of the tuner on frozen features (a script, not a test).

The issue's targets, on 2 CPU cores: for a features file of about 5,000 rows x 1,280 dims, the
default comparison (every loss, 3 seeds) in at most 2 minutes, and a tuning run of 30 trials
per loss in at most 30 minutes.

* ``--features PATH``: a features file (e.g. written by ``pml-proxies-benchmark embed``); by
  default a synthetic one of ``--rows`` x ``--dims`` (Gaussian class centres plus noise, half
  of the classes test classes), written to a temporary folder.
* ``run``: ``pml-proxies-benchmark --dataset features:PATH --trunk linear --seeds 0,1,2``.
* ``tune`` (only with ``--tune-trials N``, it takes minutes): ``pml-proxies-benchmark tune`` with
  ``N`` trials per loss on ``--workers 2`` and the best trials re-run with seeds 0,1,2.

Each command runs in a subprocess; the script prints its wall time and its CPU time (user +
system of the subprocess and its children, ``getrusage``).

    python benchmarks/speed_features.py                          # the default comparison
    python benchmarks/speed_features.py --features omniglot_lite0.npz --tune-trials 30
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_features(path: Path, rows: int, dims: int, classes: int, seed: int = 0) -> Path:
    """A features file of ``rows`` x ``dims`` float32 (``classes`` Gaussian centres, noise 0.5),
    the first half of the classes for training, the rest validation (query and gallery)."""
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, classes, rows))
    centres = rng.normal(size=(classes, dims)).astype(np.float32)
    features = centres[labels] + 0.5 * rng.normal(size=(rows, dims)).astype(np.float32)
    split = np.where(labels < classes // 2, "train", "validation")
    np.savez(path, features=features, labels=labels, split=split)
    return path


def timed(command: list[str]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of a subprocess (user + system, children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, help="a features file (default: synthetic)")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--dims", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=240)
    parser.add_argument("--tune-trials", type=int, default=0, help="also time tune (0: no)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="speed-features-") as tmp:
        folder = Path(tmp)
        features = args.features or synthetic_features(
            folder / "features.npz", args.rows, args.dims, args.classes
        )
        base = [sys.executable, "-m", "pml_proxies.benchmark"]
        data = ["--dataset", f"features:{features}", "--trunk", "linear", "--no-progress"]
        rows = []
        run = [*base, *data, "--seeds", "0,1,2", "--output", str(folder / "run")]
        rows.append(("run: every loss, 3 seeds", 120.0, *timed(run)))
        if args.tune_trials:
            tune = [*base, "tune", *data, "--trials", str(args.tune_trials), "--workers", "2",
                    "--seeds", "0,1,2", "--output", str(folder / "tune")]  # fmt: skip
            rows.append((f"tune: {args.tune_trials} trials per loss", 1800.0, *timed(tune)))
    shape = f"{args.rows} x {args.dims}" if args.features is None else str(args.features)
    print(f"features: {shape}")
    print(f"{'command':34s} {'wall s':>8s} {'CPU s':>8s} {'target (wall)':>14s}")
    for name, target, wall, cpu in rows:
        verdict = "ok" if wall <= target else "over"
        print(f"{name:34s} {wall:8.1f} {cpu:8.1f} {target:9.0f} s {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
