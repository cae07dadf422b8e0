"""The benchmark with DistributedDataParallel (``--nproc-per-node`` / torchrun; gloo, 2 processes
on the CPU): the same metrics as one process, only rank 0 writes, the world size recorded and
reported, finished runs reused; ``--jobs`` with several processes is a usage error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock

import pml_proxies
from pml_proxies.benchmark import distributed as bench_ddp
from pml_proxies.benchmark.cli import main
from pml_proxies.benchmark.config import ConfigError
from pml_proxies.benchmark.report import world_sizes_text
from pml_proxies.benchmark.schema import schema_problem
from pml_proxies.benchmark.train import ResultRecord

REPO = Path(pml_proxies.__file__).resolve().parents[1]
LOSSES = ("proxy_anchor", "mpa", "mpa_dw", "mpa_ap", "proxy_isa", "vcpa")
#: digits (no augmentation), the small CNN with frozen BatchNorm (no batch statistics): 2
#: processes compute what 1 does; batch 8 = 2 classes x 4 images, one class per process. VCPA at
#: temperature 1: the paper's 0.01 makes its Newton steps (Hessian scale alpha^2 / tau) amplify
#: float rounding to ~1e-3 within a few steps, one process against itself in another sum order
ARGS = ["--dataset", "digits", "--losses", ",".join(LOSSES), "--seeds", "0", "--epochs", "2",
        "--iterations-per-epoch", "3", "--batch-size", "8", "--m-per-class", "4",
        "--embedding-size", "16", "--freeze-bn", "--map-samples", "50", "--no-progress",
        "--loss-param", "vcpa.temperature=1.0"]  # fmt: skip
WORLD_TEXT = "processes per run (world size, torchrun / --nproc-per-node)"


def _cli(output: Path, *extra: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (this checkout's package), with a timeout so that a hung rank
    cannot hang the tests."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "pml_proxies.benchmark", *ARGS, "--output", str(output)]
    return subprocess.run([*command, *extra], capture_output=True, text=True, timeout=400, env=env)


def _results(output: Path) -> dict[str, dict]:
    return {
        p.parent.relative_to(output).as_posix(): json.loads(p.read_text())
        for p in sorted(output.glob("runs/*/seed_*/result.json"))
    }


def _files(output: Path) -> list[str]:
    """The folder's files (tensorboard's named by their folder: their names hold a time and a
    process id)."""
    names = [p.relative_to(output) for p in output.rglob("*") if p.is_file()]
    return sorted((n.parent / "events" if n.name.startswith("events.") else n).as_posix()
                  for n in names)  # fmt: skip


@pytest.mark.slow  # three launches of the CLI, two of them with 2 gloo processes
@pytest.mark.timeout(900)
def test_two_processes_match_one_and_resume(tmp_path):
    one = _cli(tmp_path / "one", "--nproc-per-node", "1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(tmp_path / "two", "--nproc-per-node", "2")
    assert two.returncode == 0, two.stderr[-3000:]

    expected, actual = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert sorted(actual) == sorted(expected) == [f"runs/{n}/seed_0" for n in sorted(LOSSES)]
    for run, e in expected.items():
        a = actual[run]
        assert e["world_size"] == 1 and a["world_size"] == 2
        assert (a["best_epoch"], a["iterations"], a["batch_size"]) == (
            e["best_epoch"], e["iterations"], e["batch_size"]
        )  # fmt: skip
        # retrieval metrics count neighbours: equal unless float rounding (gathered batch in
        # another sum order, DDP's gradient average) flips a near-tie; measured <= 4e-6, but for
        # VCPA, whose Newton steps amplify the rounding even at temperature 1: 1.1e-4 (a flipped
        # near-tie moves a metric by about 1/896 times its rank discount), so 2e-4 for it
        tolerance = 2e-4 if run.startswith("runs/vcpa/") else 1e-5
        for metric, value in e["test"].items():
            assert a["test"][metric] == pytest.approx(value, abs=tolerance), (run, metric)
        for row_a, row_e in zip(a["history"], e["history"], strict=True):
            # float32 losses in another order, the rounding grown over 6 AdamW steps
            assert row_a["train_loss"] == pytest.approx(row_e["train_loss"], rel=1e-4), run
            for key in row_e:
                if key.startswith("val_"):  # 358 validation rows: one flipped tie ~ 1e-5
                    assert row_a[key] == pytest.approx(row_e[key], abs=1e-4), (run, key)

    # rank 0 alone wrote: the same files as one process (no second log or result)
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    report = (tmp_path / "two" / "report.md").read_text()
    assert f"{WORLD_TEXT}: 2" in report
    assert f"{WORLD_TEXT}: 1" in (tmp_path / "one" / "report.md").read_text()

    again = _cli(tmp_path / "two", "--nproc-per-node", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(LOSSES)} finished run(s) reused" in again.stdout
    assert _results(tmp_path / "two") == actual  # nothing trained again


@pytest.mark.parametrize(
    "extra, option, words",
    [
        (["--jobs", "2", "--nproc-per-node", "2"], "--jobs", "choose one"),
        (["--nproc-per-node", "0"], "--nproc-per-node", "at least 1"),
        (
            ["--nproc-per-node", "3", "--batch-size", "8", "--m-per-class", "4"],
            "--batch-size",
            "whole classes",
        ),  # fmt: skip
    ],
)
def test_usage_errors_before_anything_starts(tmp_path, capsys, extra, option, words):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        main(["--dataset", "digits", "--losses", "mpa", "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {option}:" in err and words in err, err
    assert not out.exists()


def test_under_torchrun_nproc_must_be_torchruns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as info:
        main(["--losses", "mpa", "--output", str(tmp_path / "never"), "--nproc-per-node", "4"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "torchrun started 2 processes" in err, err
    with pytest.raises(SystemExit) as info:  # --jobs under torchrun itself
        main(["--losses", "mpa", "--output", str(tmp_path / "never"), "--jobs", "2"])
    assert info.value.code == 2 and "argument --jobs:" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_more_processes_than_gpus_is_refused(monkeypatch):
    config = SimpleNamespace(device="cuda", jobs=None, batch_size=8, m_per_class=4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 processes but 1 CUDA device"):
        bench_ddp.check_nproc(config, 2)  # type: ignore[arg-type]
    bench_ddp.check_nproc(config, 1)  # type: ignore[arg-type]
    bench_ddp.check_nproc(SimpleNamespace(**{**vars(config), "device": "cpu"}), 2)  # type: ignore[arg-type]


@pytest.mark.slow  # 2 gloo processes
@pytest.mark.timeout(600)
def test_refusal_on_rank_0_stops_every_process(tmp_path):
    """Rank 0 refuses a busy folder after the processes started: the others are told to stop
    (no hang: the subprocess timeout), nothing is written."""
    output = tmp_path / "busy"
    output.mkdir()
    with FileLock(str(output / ".lock"), timeout=0):
        busy = _cli(output, "--nproc-per-node", "2")
    assert busy.returncode != 0
    assert "another benchmark is running on" in busy.stderr, busy.stderr[-3000:]
    assert sorted(p.name for p in output.iterdir()) == [".lock"]


def test_world_size_is_optional_in_results_and_reported():
    result = {"loss": "mpa", "seed": 0, "best_epoch": 1, "best_val_score": 0.5,
              "train_time_s": 1.0, "iterations": 4, "batch_size": 8, "m_per_class": 4,
              "test": {"precision_at_1": 0.5}, "history": [], "loss_kwargs": {},
              "config_fingerprint": "f", "command": "c"}  # fmt: skip
    assert schema_problem(result, ResultRecord) is None  # a folder from before world_size
    assert schema_problem({**result, "world_size": 2}, ResultRecord) is None
    assert "'world_size'" in schema_problem({**result, "world_size": "2"}, ResultRecord)
    assert world_sizes_text([result]) == f"{WORLD_TEXT}: 1"
    mixed = [result, {**result, "world_size": 2}, {**result, "world_size": 2}]
    assert world_sizes_text(mixed) == f"{WORLD_TEXT}: 1 (1 runs), 2 (2 runs)"
