"""``examples/cub200_recipe.py`` under ``torchrun`` (gloo, 2 processes, the digits: no
augmentation, a small CNN with frozen BatchNorm): the same results as one process with the same
global batch, and a rank killed mid-epoch leaves a checkpoint that 1 process resumes from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "cub200_recipe.py"
ARGS = ["--quick", "--device", "cpu", "--dataset", "digits", "--loss", "proxy_isa"]
#: kills the process of rank 1 (SIGKILL, no clean-up) after its 5th optimizer step: epoch 2 of
#: the quick run's 3 steps per epoch, after the checkpoint of epoch 1
KILLER = """
import os, runpy, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
steps = 0
def hook(optimizer, args, kwargs):
    global steps
    steps += 1
    if os.environ.get("RANK") == "1" and steps == 5:
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(hook)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def launch(
    out: Path, nproc: int, *extra: str, script: Path = RECIPE
) -> subprocess.CompletedProcess:
    """The recipe with ``nproc`` processes (``torchrun --standalone``: a free port) or plain
    ``python``; a timeout so that a hung rank cannot hang the tests."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    if nproc == 1:
        command = [sys.executable, str(script)]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*torchrun, "--nproc-per-node", str(nproc), str(script)]
    if script != RECIPE:
        command.append(str(RECIPE))
    command += [*ARGS, "--output-dir", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def history(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["history"]


def assert_same_history(actual: list[dict], expected: list[dict]) -> None:
    assert [r["epoch"] for r in actual] == [r["epoch"] for r in expected]
    for a, e in zip(actual, expected):
        # float32 sums in another order (gathered batch, DDP average): the losses agree to
        # rounding grown over 6 Adam steps; the retrieval metrics are counts of neighbours, equal
        # unless a near-tie flips
        assert a["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        for key in e:
            if key not in ("epoch", "train_loss"):
                assert a[key] == pytest.approx(e[key], abs=1e-5), key


@pytest.mark.slow  # three to four launches of 1-2 processes
@pytest.mark.timeout(900)
def test_two_processes_match_one_and_a_killed_rank_resumes(tmp_path):
    single = launch(tmp_path / "one", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = history(tmp_path / "one")
    assert json.loads((tmp_path / "one" / "results.json").read_text())["world_size"] == 1

    double = launch(tmp_path / "two", 2)
    assert double.returncode == 0, double.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "results.json").read_text())["world_size"] == 2
    assert_same_history(history(tmp_path / "two"), expected)

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    killed = launch(tmp_path / "killed", 2, script=killer)
    assert killed.returncode != 0
    output = killed.stdout + killed.stderr
    # torchrun's summary names the killed rank; rank 0 names the checkpoint when the broken
    # gloo connection (or torchrun's SIGTERM) reaches it before torchrun kills it
    assert "exitcode  : -9" in output and "SIGKILL" in output, output[-3000:]
    if "last checkpoint" in output:
        assert "epoch 1), is intact: rerun with --resume" in output
    assert not (tmp_path / "killed" / "results.json").exists()
    checkpoint = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["world_size"] == 2
    assert_same_history(checkpoint["history"], expected[:1])

    shutil.copytree(tmp_path / "killed", tmp_path / "killed2")
    resumed = launch(tmp_path / "killed2", 2, "--resume")  # continues on the same world size
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_history(history(tmp_path / "killed2"), expected)
    resumed = launch(tmp_path / "killed", 1, "--resume")  # and on another one
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(epoch 1, 2 process(es))" in resumed.stdout
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["world_size"] == 1
    assert_same_history(history(tmp_path / "killed"), expected)
