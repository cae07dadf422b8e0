"""``tune`` workers on a shared storage: two worker processes on one PostgreSQL study, and a
worker SIGKILLed mid-trial (PostgreSQL and SQLite). The PostgreSQL server is
``$PML_PROXIES_TEST_POSTGRES_URL`` (``.ci/test`` starts one with ``.ci/postgres``); without it the
fixture starts its own throw-away cluster with ``.ci/postgres`` when server binaries exist, and
skips otherwise. A fast fake objective stands in for training: these tests are about the
storage and the workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from tune_helpers import REPO, popen, run, trials, wait_for  # noqa: E402

from pml_proxies.benchmark.tune.study import postgres_driver_url  # noqa: E402

pytestmark = pytest.mark.slow
URL_ENV = "PML_PROXIES_TEST_POSTGRES_URL"
S = optuna.trial.TrialState


def _server_binaries() -> bool:
    if shutil.which("pg_ctl") and shutil.which("initdb"):
        return True
    return any(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg2", reason="PostgreSQL storage needs psycopg2 (extra [postgres])")
    if os.environ.get(URL_ENV):
        yield os.environ[URL_ENV]
        return
    if not _server_binaries():
        pytest.skip(f"{URL_ENV} is unset and no PostgreSQL server binaries (pg_ctl, initdb) exist")
    state = tempfile.mkdtemp(prefix="pml-proxies-pg-")
    env = {**os.environ, "PML_PROXIES_PG_DIR": state}
    started = subprocess.run(
        ["bash", str(REPO / ".ci" / "postgres"), "start"], env=env, capture_output=True, text=True
    )
    if started.returncode != 0:
        shutil.rmtree(state, ignore_errors=True)
        pytest.fail(f".ci/postgres start failed: {started.stderr[-2000:]}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(REPO / ".ci" / "postgres"), "stop"], env=env)


def _storage(kind: str, request, tmp_path: Path) -> str:
    if kind == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'shared.sqlite3'}"


FAKE = ["--dataset", "digits", "--no-progress", "--startup-trials", "1",
        "--objective", "tune_fake_objective:quadratic"]  # fmt: skip


@pytest.mark.timeout(900)
def test_two_workers_share_one_study(postgres_url, tmp_path):
    name = f"two-{uuid.uuid4().hex[:8]}"
    losses = ["proxy_anchor", "proxy_nca"]
    common = [*FAKE, "--losses", ",".join(losses), "--trials", "5", "--storage", postgres_url,
              "--study-name", name, "--no-reproduce"]  # fmt: skip
    done = run([*common, "--workers", "2", "--output", str(tmp_path / "a")], timeout=400,
               FAKE_TRIAL_SLEEP="0.3")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = [(tmp_path / "a" / "logs" / f"worker_{i}.log").read_text() for i in range(2)]
    for i, log in enumerate(logs):
        assert f"[worker {i}] proxy_anchor:" in log
    command = optuna.load_study(
        study_name=f"{name}/proxy_anchor", storage=postgres_driver_url(postgres_url)
    ).user_attrs["command"]
    assert "--workers 2" in command and "--worker-only" not in command  # the command typed
    for loss in losses:
        all_trials = trials(postgres_url, f"{name}/{loss}")
        numbers = [t.number for t in all_trials]
        assert sorted(numbers) == list(range(len(numbers)))  # every number exactly once
        finished = [t for t in all_trials if t.state in (S.COMPLETE, S.PRUNED)]
        assert len(finished) == 5
        # only trials refused after the budget was taken may be extra, and they are marked
        for t in all_trials:
            if t not in finished:
                assert t.state == S.FAIL and t.user_attrs.get("surplus")
    # the report a single process writes from the same trials is the same
    single = run([*common, "--report-only", "--output", str(tmp_path / "b")], timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    report_a = (tmp_path / "a" / "tune_report.md").read_text()
    assert report_a == (tmp_path / "b" / "tune_report.md").read_text()
    assert "| proxy_anchor | done | 5 |" in report_a


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_worker_killed_mid_trial_is_failed_and_redone(kind, request, tmp_path):
    url = _storage(kind, request, tmp_path)
    name = f"kill-{uuid.uuid4().hex[:8]}"
    args = [*FAKE, "--losses", "proxy_nca", "--trials", "3", "--storage", url, "--study-name",
            name, "--heartbeat", "1", "--grace-period", "2"]  # fmt: skip
    victim = popen([*args, "--worker-only", "--output", str(tmp_path / "v")],
                   tmp_path / "victim.log", FAKE_TRIAL_SLEEP="5")  # fmt: skip
    try:
        running = wait_for(  # a running trial that has sampled its parameters
            lambda: [t for t in trials(url, f"{name}/proxy_nca", (S.RUNNING,)) if t.params],
            300,
            "a running trial",
            victim,
        )
        victim.kill()  # SIGKILL mid-trial: no chance to tell the storage anything
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
    killed = running[0].number
    assert trials(url, f"{name}/proxy_nca")[killed].state == S.RUNNING  # nobody knows yet
    done = run([*args, "--no-reproduce", "--output", str(tmp_path / "w")], timeout=400,
               FAKE_TRIAL_SLEEP="1")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    all_trials = trials(url, f"{name}/proxy_nca")
    assert all_trials[killed].state == S.FAIL
    finished = [t for t in all_trials if t.state in (S.COMPLETE, S.PRUNED)]
    assert len(finished) == 3
    retried = [
        t for t in finished if optuna.storages.RetryFailedTrialCallback.retried_trial_number(t)
        == killed
    ]  # fmt: skip
    assert len(retried) == 1 and retried[0].params == all_trials[killed].params
    numbers = [t.number for t in all_trials]
    assert sorted(numbers) == list(range(len(numbers)))
    report = (tmp_path / "w" / "tune_report.md").read_text()
    assert "| proxy_nca | done | 3 | 0 | 0 | 1 |" in report
    # trial time: the finished trials' own time; the killed trial's dead time (until another
    # worker found it stale) is not counted. Same sums in the same order: a rounding margin only
    (row,) = json.loads((tmp_path / "w" / "search.json").read_text())
    own = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished)
    assert row["trial_time_s"] == pytest.approx(own, rel=1e-12)
