"""Processes that open one storage or one study at the same time (``tune --workers``, a
dashboard or a second machine watching the storage): the loser of a race to create the schema
retries, a worker that finds a study whose creator is still writing its settings waits for them.
Both races made CI runs fail before they were handled."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

optuna = pytest.importorskip("optuna")
sqlalchemy = pytest.importorskip("sqlalchemy")

from pml_proxies.benchmark.tune import spaces as sp  # noqa: E402
from pml_proxies.benchmark.tune import study as st  # noqa: E402

SETTINGS = st.SearchSettings(n_trials=5, seed=0, startup_trials=1, protocol="p", command="c")
SPACE = sp.resolve_spaces(["proxy_anchor"])["proxy_anchor"]


def _schema_error(message: str) -> sqlalchemy.exc.IntegrityError:
    return sqlalchemy.exc.IntegrityError("INSERT ...", {}, Exception(message))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the stand-in has no new keyword
@pytest.mark.parametrize(
    "message",
    [
        "UNIQUE constraint failed: alembic_version.version_num",  # the CI failure (SQLite)
        'duplicate key value violates unique constraint "alembic_version_pkc"',  # PostgreSQL
        "table studies already exists",
    ],
)
def test_make_storage_retries_when_another_process_created_the_schema_first(
    tmp_path, monkeypatch, message
):
    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            real(url, **kwargs)  # "the other process" creates the schema ...
            raise _schema_error(message)  # ... and this one loses the race
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(st.time, "sleep", lambda s: None)
    storage = st.make_storage(st.default_storage(tmp_path))
    assert len(calls) == 2
    assert storage.get_all_studies() == []


def test_make_storage_does_not_retry_other_errors(tmp_path, monkeypatch):
    calls = []

    def broken(url, **kwargs):
        calls.append(url)
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(st.StorageError, match="cannot open the storage .*: disk I/O error"):
        st.make_storage(st.default_storage(tmp_path))
    assert len(calls) == 1


def _open_storage(url: str, barrier, queue) -> None:
    barrier.wait()
    try:
        st.make_storage(url)
        queue.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the test
        queue.put(f"{type(e).__name__}: {e}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_processes_creating_one_fresh_sqlite_schema_at_once_all_succeed(tmp_path):
    ctx = mp.get_context("spawn")
    for attempt in range(3):
        url = st.default_storage(tmp_path / str(attempt))
        (tmp_path / str(attempt)).mkdir()
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_storage, args=(url, barrier, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=240) for _ in procs]
        for p in procs:
            p.join(60)
        assert results == ["ok"] * 4


def _half_created(storage, keys=("loss", "space")):
    """A study as its creator leaves it after writing only ``keys`` of its settings."""
    study = optuna.create_study(storage=storage, study_name="t/proxy_anchor")
    full = {"loss": "proxy_anchor", "space": st.space_attr(SPACE), "n_trials": 5,
            "protocol": "p", "prune": False, "command": "c", "seed": 0, "startup_trials": 1,
            "protocol_fields": {}}  # fmt: skip
    for key in keys:
        study.set_user_attr(key, full[key])
    return study, full


def test_a_worker_waits_for_the_creator_to_finish_writing_the_settings(tmp_path):
    storage = st.make_storage(st.default_storage(tmp_path))
    study, full = _half_created(storage)

    def creator_goes_on():
        time.sleep(0.5)
        for key in ("n_trials", "protocol", "prune", "command", "seed", "startup_trials",
                    "protocol_fields"):  # fmt: skip
            study.set_user_attr(key, full[key])

    thread = threading.Thread(target=creator_goes_on)
    thread.start()
    try:
        opened = st.open_study(storage, "t", "proxy_anchor", SPACE, SETTINGS, wait_s=30)
    finally:
        thread.join()
    assert opened.user_attrs == full


def test_a_mismatch_written_by_the_creator_after_the_wait_began_is_still_refused(tmp_path):
    storage = st.make_storage(st.default_storage(tmp_path))
    study, full = _half_created(storage)

    def creator_goes_on():
        time.sleep(0.5)
        for key in ("n_trials", "protocol", "prune"):
            study.set_user_attr(key, 7 if key == "n_trials" else full[key])

    thread = threading.Thread(target=creator_goes_on)
    thread.start()
    try:
        with pytest.raises(ValueError, match="n_trials: 7 -> 5"):
            st.open_study(storage, "t", "proxy_anchor", SPACE, SETTINGS, wait_s=30)
    finally:
        thread.join()


def test_settings_left_unwritten_by_a_dead_creator_are_completed(tmp_path):
    storage = st.make_storage(st.default_storage(tmp_path))
    _, full = _half_created(storage)
    opened = st.open_study(storage, "t", "proxy_anchor", SPACE, SETTINGS, wait_s=0.3)
    assert opened.user_attrs == full
    again = st.open_study(storage, "t", "proxy_anchor", SPACE, SETTINGS, wait_s=0)
    assert again.user_attrs == full


def test_the_creator_writes_every_setting(tmp_path):
    storage = st.make_storage(st.default_storage(tmp_path))
    opened = st.open_study(storage, "t", "proxy_anchor", SPACE, SETTINGS)
    assert opened.user_attrs == {"loss": "proxy_anchor", "space": st.space_attr(SPACE),
                                 "n_trials": 5, "protocol": "p", "prune": False,
                                 "command": "c", "seed": 0, "startup_trials": 1,
                                 "protocol_fields": {}}  # fmt: skip
