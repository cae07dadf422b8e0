"""The CPU mode of ``benchmarks/gpu_check.py`` (issue 14), so that the GPU check cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load()
PARTS = gpu_check.PARTS


def _checks(report: dict, part: str) -> list[dict]:
    return report["parts"][part]["checks"]


def test_cpu_mode_parts_1_to_4(tmp_path):
    out = tmp_path / "gpu_check.json"
    argv = ["--device", "cpu", "--sizes", "tiny", "--out", str(out)]
    rc = gpu_check.main([*argv, "--parts", "equality,sync,speed,evaluation"])
    report = json.loads(out.read_text())
    failed = [
        (c["name"], c["measured"], c["reason"])
        for part in report["parts"].values()
        for c in part["checks"]
        if c["status"] == "FAIL"
    ]
    assert failed == [] and rc == 0
    assert list(report["parts"]) == ["equality", "sync", "speed", "evaluation"]
    for name, part in report["parts"].items():
        assert part["checks"], name
        assert {c["status"] for c in part["checks"]} <= {"PASS", "SKIP"}
        assert part["elapsed_s"] <= part["budget_s"] or name == "speed"
        for c in part["checks"]:
            assert c["status"] != "SKIP" or c["reason"], c["name"]
    # every loss in every mode was compared, with finite errors
    equality = _checks(report, "equality")
    assert len(equality) == 3 * len(gpu_check.equality_cases(gpu_check.SIZES["tiny"]))
    assert all(c["status"] == "PASS" and c["data"]["state_errors"] for c in equality)
    assert any("Proxy-ISA" in c["name"] and "memory_class_sums" in c["data"]["state_errors"]
               for c in equality)  # fmt: skip
    assert all(c["status"] == "PASS" for c in _checks(report, "sync"))
    # speed: targets are for the GPU, the CPU ratios are measured and reported
    speed = _checks(report, "speed")
    assert all(c["status"] == "SKIP" for c in speed)
    assert all(c["data"]["ratio"] > 0 for c in speed if "ratio" in c["data"])
    assert sum("ratio" in c["data"] for c in speed) == 5
    evaluation = _checks(report, "evaluation")
    assert any("equality with the CPU" in c["name"] or "== CPU" in c["name"] for c in evaluation)
    assert report["summary"]["FAIL"] == 0
    assert set(report["environment"]["modules"]) >= {"pytorch_metric_learning", "faiss"}


class _DtypeDependent(torch.nn.Module):
    """A 'loss' that is wrong in float32 only: the equality check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4))

    def forward(self, embeddings, labels):
        offset = 1e-3 if embeddings.dtype != torch.float64 else 0.0
        return (embeddings.float().double().sum(1).mean() + offset) * self.weight.sum()


def test_equality_check_detects_a_wrong_computation():
    sizes = gpu_check.SIZES["tiny"]
    part = gpu_check.Part("equality", 60)
    case = gpu_check.Case(_DtypeDependent, sizes.steps)
    gpu_check._equality_row(part, "wrong", case, "float32", torch.device("cpu"), sizes)
    (check,) = part.checks
    assert check.status == "FAIL"
    assert check.data["loss_error"] > gpu_check.TOL_FLOAT32


def test_compare_state_integer_buffers_must_match_exactly():
    from pml_proxies.losses import ProxyISALoss

    a = ProxyISALoss(3, 4, memory_size=5)
    b = ProxyISALoss(3, 4, memory_size=5)
    b.load_state_dict(a.state_dict())
    assert max(gpu_check.compare_state(a, b).values()) == 0.0
    b.memory_labels[0] = 1
    assert gpu_check.compare_state(a, b)["memory_labels"] == float("inf")


def test_noise_tape_replays_the_recorded_draws_and_restores_torch():
    normal, randn = torch.Tensor.normal_, torch.randn
    tape: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(3)
    with gpu_check.noise_tape(tape, replay=False):
        a = torch.empty(2, 3).normal_(generator=gen)
        b = torch.randn((4,), generator=gen)
        unrecorded = torch.randn(5)  # no generator: not recorded
    assert len(tape) == 2 and unrecorded.shape == (5,)
    with gpu_check.noise_tape(tape, replay=True):
        a2 = torch.empty(2, 3, dtype=torch.float64).normal_(generator=torch.Generator())
        b2 = torch.randn((4,), generator=torch.Generator(), dtype=torch.float64)
    assert tape == [] and a2.dtype == torch.float64
    assert torch.equal(a2.float(), a) and torch.equal(b2.float(), b)
    assert torch.Tensor.normal_ is normal and torch.randn is randn


def test_host_read_preview_finds_host_reads_and_their_site():
    from pml_proxies.losses import ProxyISALoss

    item = torch.Tensor.item
    loss_fn = ProxyISALoss(4, 8, memory_size=20, memory_start_epoch=1)
    loss_fn.sync_free_memory_updates = False  # the CPU's host-size update reads sizes
    x, labels = torch.randn(6, 8), torch.arange(6) % 4
    sites: list[str] = []
    with gpu_check.host_read_log(sites):
        torch.ones(()).item()
        loss_fn(x, labels)
    assert any("test_gpu_check.py" in s and s.startswith("item") for s in sites)
    assert any("pml_proxies/utils/class_memory_bank.py" in s for s in sites)
    assert torch.Tensor.item is item  # restored


def test_omniglot_root_falls_back_to_the_bundled_zips(tmp_path, monkeypatch):
    bundled = sorted((REPO / "pml_proxies" / "datasets" / "data").glob("*small*.zip"))
    if not bundled:
        pytest.skip("the small Omniglot zips are not bundled")
    monkeypatch.setenv("PML_PROXIES_DATA", str(tmp_path / "empty"))
    root = gpu_check.omniglot_root(None, tmp_path)
    if root is None:  # get_dataset("omniglot", ...) finds the bundled data by itself
        return
    assert sorted(p.name for p in (Path(root) / "omniglot").iterdir()) == [p.name for p in bundled]
    assert gpu_check.omniglot_root("/explicit", tmp_path / "other") in ("/explicit", None)


def test_finished_runs_reads_the_runs_a_timed_out_benchmark_left(tmp_path):
    run = tmp_path / "runs" / "mpa" / "seed_0"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"test": {"precision_at_1": 0.5}}))
    (tmp_path / "runs" / "vcpa" / "seed_0").mkdir(parents=True)  # interrupted: no result.json
    assert gpu_check._finished_runs(tmp_path) == {"mpa": {"precision_at_1": 0.5}}


@pytest.mark.slow
def test_cpu_mode_main_job_subprocess(tmp_path):
    """The script as CI runs it (a subprocess, exit code), with part 5: the benchmark CLI on
    digits with the small CNN, every loss, one seed."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--sizes", "tiny"]
    cmd += ["--parts", "main_job", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (check,) = _checks(report, "main_job")
    assert check["status"] == "PASS", check
    results = report["main_job_results"]["small_cnn"]
    losses = {row["loss"] for row in results["summary"]}
    assert losses == set(gpu_check._expected_losses())
    assert "--device cpu" in results["command"] and "--dataset digits" in results["command"]
    assert "| main_job |" in proc.stdout  # the printed table


@pytest.mark.slow  # three recipe launches
def test_ddp_part_row_on_the_cpu_with_gloo():
    """Part 6's row, run with gloo on the CPU (the part itself SKIPs without 2 CUDA devices)."""
    part = gpu_check.Part("ddp", 300)
    gpu_check._ddp_row(part, "ddp row", "proxy_isa", "cpu")
    (check,) = part.checks
    assert check.status == "PASS", check
    assert "--nproc-per-node 2" in check.data["commands"][1]
    skipped = gpu_check.Part("ddp", 300)
    gpu_check.part_ddp(skipped, torch.device("cpu"), gpu_check.SIZES["tiny"])
    assert {c.status for c in skipped.checks} == {"SKIP"}
