"""The GPU scripts' code on the CPU (issues 14 and 19), so that they cannot rot: the speed table
(``benchmarks/gpu_speed.py``) and the one command (``benchmarks/gpu_check.py``: ``pytest -m
cuda`` on the GPU checks, then the speed table). The checks themselves are the tests in
``tests/test_cuda_*.py``, whose ``cpu`` parameters run in this suite."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gpu_speed = _load("gpu_speed")
gpu_check = _load("gpu_check")


def test_speed_row_that_crashes_fails_and_the_others_run():
    def crash():
        raise RuntimeError("boom")

    (row,) = gpu_speed.guarded("speed C=1", crash)
    assert row.status == "FAIL" and "boom" in row.reason


def test_missing_cuda_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(gpu_speed.torch.cuda, "is_available", lambda: False)
    assert gpu_speed.main(["--device", "cuda", "--out", "unused.json"]) == 2
    assert "CUDA requested but not available" in capsys.readouterr().err


def test_preflight_lists_every_module():
    found = gpu_check.preflight()
    assert set(found) >= {"pytorch_metric_learning", "pytest", "faiss"}
    assert found["pytest"] is not None


def test_default_tests_are_the_cuda_test_files():
    tests = gpu_check.default_tests()
    assert "tests/test_cuda_losses.py" in tests and "tests/test_cuda_sync.py" in tests
    assert all(Path(t).name.startswith("test_cuda_") for t in tests)


def test_one_command_runs_the_cuda_tests_then_the_speed_table(tmp_path, capsys):
    """``gpu_check.py`` as on a GPU machine, on the CPU: its pytest run collects the ``cuda``
    tests of one file, all SKIP with the reason, and the speed table follows."""
    argv = ["--out-dir", str(tmp_path), "--device", "cpu", "--sizes", "tiny"]
    rc = gpu_check.main([*argv, "--tests", "tests/test_cuda_sync.py"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = gpu_check.junit_rows(tmp_path / "cuda_tests.xml")
    assert len(rows) == 6  # the cuda parameter of each host-sync case; the cpu ones deselected
    assert all(r["test"].startswith("test_cuda_sync::test_training_step_has_no_host_sync[cuda-")
               for r in rows)  # fmt: skip
    assert {r["outcome"] for r in rows} == {"skipped"}
    assert all("needs CUDA" in r["measured / reason"] for r in rows)
    assert "| test | outcome |" in printed and "| check | status |" in printed
    report = json.loads((tmp_path / "gpu_speed.json").read_text())
    assert report["summary"]["FAIL"] == 0 and report["environment"]["device"] == "cpu"
    speed = report["rows"]
    # targets are for the GPU: the CPU ratios are measured and reported, every row SKIPs
    assert {r["status"] for r in speed} == {"SKIP"} and all(r["reason"] for r in speed)
    ratios = [r["data"]["ratio"] for r in speed if "ratio" in r["data"]]
    assert len(ratios) == 5 and all(r > 0 for r in ratios)
    assert speed[-1]["name"] == gpu_speed.RESNET_ROW
    assert "MPA-AP K=10 vs PML SoftTripleLoss" in printed


def test_junit_rows_show_failures_and_recorded_values(tmp_path):
    junit = tmp_path / "x.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_cuda_sync" name="t[cuda-a]" time="1.25">'
        '<properties><property name="measured" value="loss 1e-07 | x" /></properties>'
        "</testcase>"
        '<testcase classname="tests.test_cuda_sync" name="t[cuda-b]" time="0.5">'
        '<failure message="AssertionError: sync at x.py:3">trace</failure></testcase>'
        "</testsuite></testsuites>"
    )
    ok, bad = gpu_check.junit_rows(junit)
    assert ok == {"test": "test_cuda_sync::t[cuda-a]", "outcome": "passed", "s": "1.2",
                  "measured / reason": "measured: loss 1e-07 / x"}  # fmt: skip
    assert bad["outcome"] == "FAILED" and "sync at x.py:3" in bad["measured / reason"]
