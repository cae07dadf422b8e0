"""The main job on the device (issue 14): ``python -m pml_proxies.benchmark --losses all
--seeds 0 --quick`` with ``--device cuda`` on the bundled Omniglot, once with the small CNN and
once with the EfficientNet-Lite0 trunk; every loss finishes with finite metrics. Each run is a
subprocess in a temporary folder; its ``summary.csv`` rows are recorded as a property and its
``summary.md`` printed. The ``cpu`` parameter (slow) runs the digits with the small CNN."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cuda_helpers import (
    CUDA_MARKS,
    REPO,
    expected_losses,
    finished_runs,
    finite_summary,
    omniglot_root,
    sizes_for,
    subprocess_env,
)


@pytest.mark.parametrize(
    "device, trunk",
    [
        pytest.param("cpu", "small_cnn", marks=pytest.mark.slow, id="cpu-small_cnn"),
        pytest.param("cuda", "small_cnn", marks=CUDA_MARKS, id="cuda-small_cnn"),
        pytest.param("cuda", "efficientnet_lite0", marks=CUDA_MARKS, id="cuda-efficientnet_lite0"),
    ],
)
def test_benchmark_cli_trains_every_loss(device, trunk, tmp_path, record_property):
    device = torch.device(device)
    sizes = sizes_for(device)
    out = tmp_path / trunk
    threads = "1" if trunk == "small_cnn" else str(max(1, torch.get_num_threads()))
    cmd = [
        sys.executable, "-m", "pml_proxies.benchmark",
        "--dataset", sizes.bench_dataset, "--trunk", trunk, "--losses", "all", "--seeds", "0",
        "--quick", "--epochs", str(sizes.bench_epochs),
        "--iterations-per-epoch", str(sizes.bench_iterations),
        "--device", device.type, "--output", str(out), "--threads", threads,
    ]  # fmt: skip
    root = omniglot_root(tmp_path) if sizes.bench_dataset == "omniglot" else None
    if root is not None:
        cmd += ["--root", root]
    record_property("command", " ".join(cmd))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=sizes.bench_timeout_s,
            cwd=str(tmp_path), env=subprocess_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        finished = finished_runs(out)
        pytest.fail(f"timed out after {sizes.bench_timeout_s:.0f} s; {len(finished)} loss(es) "
                    f"finished: {json.dumps(finished)}")  # fmt: skip
    record_property("seconds", round(time.perf_counter() - t0, 1))
    summary = []
    if (out / "summary.csv").exists():
        with open(out / "summary.csv", newline="") as f:
            summary = list(csv.DictReader(f))
    record_property("summary", summary)
    if (out / "summary.md").exists():
        print((out / "summary.md").read_text())
    missing = sorted(set(expected_losses()) - {row["loss"] for row in summary})
    assert proc.returncode == 0, f"rc {proc.returncode}; {proc.stderr[-2000:]}"
    assert missing == [], f"missing losses {missing}"
    assert finite_summary(summary), summary


def test_omniglot_root_falls_back_to_the_bundled_zips(tmp_path, monkeypatch):
    bundled = sorted((REPO / "pml_proxies" / "datasets" / "data").glob("*small*.zip"))
    if not bundled:
        pytest.skip("the small Omniglot zips are not bundled")
    monkeypatch.setenv("PML_PROXIES_DATA", str(tmp_path / "empty"))
    root = omniglot_root(tmp_path)
    if root is None:  # get_dataset("omniglot", ...) finds the bundled data by itself
        return
    assert sorted(p.name for p in (Path(root) / "omniglot").iterdir()) == [p.name for p in bundled]


def test_finished_runs_reads_the_runs_a_timed_out_benchmark_left(tmp_path):
    run = tmp_path / "runs" / "mpa" / "seed_0"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"test": {"precision_at_1": 0.5}}))
    (tmp_path / "runs" / "vcpa" / "seed_0").mkdir(parents=True)  # interrupted: no result.json
    assert finished_runs(tmp_path) == {"mpa": {"precision_at_1": 0.5}}


def test_finite_summary_rejects_nan_text_and_empty():
    assert finite_summary([{"loss": "mpa", "precision_at_1_mean": "0.5"}])
    assert not finite_summary([{"loss": "mpa", "precision_at_1_mean": "nan"}])
    assert not finite_summary([{"loss": "mpa", "precision_at_1_mean": ""}])
    assert not finite_summary([])
