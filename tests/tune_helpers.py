"""Helpers of the tuning tests that run ``tune`` in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), e.get("PYTHONPATH", "")])
    e["OMP_WAIT_POLICY"] = "PASSIVE"
    e.update(extra)
    return e


def tune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pml_proxies.benchmark.tune", *args]


def popen(args: list[str], log: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        tune_cmd(*args), env=env(**extra), stdout=open(log, "w"), stderr=subprocess.STDOUT
    )


def run(args: list[str], timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        tune_cmd(*args), env=env(**extra), capture_output=True, text=True, timeout=timeout
    )


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    start = time.time()
    while time.time() - start < timeout:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def trials(url: str, name: str, states=None):
    """The trials of study ``name`` (empty while it does not exist yet)."""
    import optuna

    from pml_proxies.benchmark.tune.study import postgres_driver_url

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.load_study(study_name=name, storage=postgres_driver_url(url))
    except KeyError:
        return []
    except Exception:  # the database is being created by the subprocess
        return []
    return study.get_trials(deepcopy=False, states=states)
