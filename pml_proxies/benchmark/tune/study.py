"""Optuna studies of the tuned benchmark: storage, equal budgets, workers, stale trials.

One study per loss (``<study name>/<loss>``) in one RDB storage (SQLite file by default,
PostgreSQL for many workers). A worker walks the losses in order and, for each, runs trials
until the study holds ``n_trials`` COMPLETE + PRUNED trials (the budget). A trial whose worker
died stops sending heartbeats: once its grace period is over, the next worker to look marks it
FAIL and Optuna's ``RetryFailedTrialCallback`` re-enqueues its parameters as a new trial, so
the budget is still met and no result is lost or counted twice. A worker that finds the
remaining budget taken by RUNNING trials waits for them (and fails them if they go stale).
"""

from __future__ import annotations

import inspect
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..interrupt import check as check_interrupt
from .spaces import SpaceEntry
from .trial import Objective, TrialConfig

#: user attribute of a trial a worker started when the budget was already taken (concurrency)
SURPLUS_ATTR = "surplus"
#: user attribute holding the error of a trial whose objective raised
ERROR_ATTR = "error"


MACHINE_ATTR = "machine"


def machine() -> str:
    """A one-line description of this machine (CPU model, cores, accelerator)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}"


def optuna_or_exit():
    """Import optuna, or raise ``ImportError`` naming the extra to install."""
    try:
        import optuna
    except ImportError:
        raise ImportError(
            "tuning needs Optuna: pip install 'pml-proxies[tune]' "
            "(and 'pml-proxies[postgres]' for a PostgreSQL storage)"
        ) from None
    return optuna


def default_storage(output: str | Path) -> str:
    """The default storage: an SQLite file in the output folder."""
    return f"sqlite:///{Path(output).resolve() / 'tune.sqlite3'}"


def postgres_driver_url(url: str) -> str:
    """``url`` with an explicit driver for a plain ``postgresql://`` URL: SQLAlchemy 2.1 picks
    psycopg (3) for it, the ``[postgres]`` extra installs psycopg2; the one installed is used.

    Raises:
        ImportError: a PostgreSQL URL and neither driver installed (names the extra).
    """
    import importlib.util

    if not url.startswith(("postgresql://", "postgres://")):
        return url
    rest = url.split("://", 1)[1]
    for module, dialect in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}://{rest}"
    raise ImportError("a PostgreSQL storage needs psycopg2: pip install 'pml-proxies[postgres]'")


def make_storage(
    url: str, heartbeat_interval: int = 10, grace_period: int = 30, max_retry: int = 3
):
    """An Optuna ``RDBStorage`` with heartbeats: a RUNNING trial without a heartbeat for
    ``grace_period`` s is failed and retried (at most ``max_retry`` times)."""
    optuna = optuna_or_exit()
    from optuna import storages
    from optuna.storages import RDBStorage

    url = postgres_driver_url(url)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna >= 4.9 renamed failed_trial_callback to heartbeat_stale_trial_callback
    params = inspect.signature(RDBStorage.__init__).parameters
    key = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in params
        else "failed_trial_callback"
    )
    retry = getattr(storages, "RetryHeartbeatStaleTrialCallback", None)
    retry = retry or storages.RetryFailedTrialCallback
    kwargs: dict[str, Any] = dict(
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        **{key: retry(max_retry=max_retry)},
    )
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return RDBStorage(url, **kwargs)
        except Exception as e:  # noqa: BLE001 - two processes creating a fresh schema at once
            if attempt == SCHEMA_ATTEMPTS - 1 or not _schema_race(e):
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


#: how often ``make_storage`` tries to open a storage whose schema another process is creating
SCHEMA_ATTEMPTS = 5
#: messages of the errors two processes get when they create one fresh Optuna schema at once
#: (a table, Optuna's version row or Alembic's revision row written by the other one first)
_SCHEMA_RACE_MESSAGES = ("already exists", "UNIQUE constraint failed", "duplicate key value")


def _schema_race(error: BaseException) -> bool:
    """Whether ``error`` is another process winning the race to create the schema (a retry
    then finds the schema complete)."""
    return any(m in str(error) for m in _SCHEMA_RACE_MESSAGES)


#: how long a worker waits for the creator of a study to write its settings
SETTINGS_WAIT_S = 30.0


def _settings_of(study, keys: list[str], wait_s: float, poll_s: float = 0.2) -> dict:
    """``study``'s user attributes once all of ``keys`` are written, or after ``wait_s`` s."""
    deadline = time.monotonic() + wait_s
    while True:
        attrs = study.user_attrs
        if all(key in attrs for key in keys) or time.monotonic() >= deadline:
            return attrs
        time.sleep(poll_s)


def _write_attrs(study, attrs: dict) -> None:
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def study_name(prefix: str, loss: str) -> str:
    return f"{prefix}/{loss}"


def space_attr(entries: list[SpaceEntry]) -> list[list]:
    return [[e.name, e.low, e.high, e.kind] for e in entries]


@dataclass(frozen=True)
class SearchSettings:
    """Everything of a search that must be equal for every worker of a study.

    Attributes:
        n_trials: budget per loss (COMPLETE + PRUNED trials).
        seed: TPE sampler seed (worker ``i`` uses ``seed + 1000 * i``).
        prune: Optuna's MedianPruner on the per-epoch validation metric.
        startup_trials: random trials before TPE (and before the pruner prunes).
        protocol: fingerprint of the benchmark protocol (a resumed study must match it).
        command: the command that created the study (reported).
    """

    n_trials: int
    seed: int = 0
    prune: bool = False
    startup_trials: int = 2
    protocol: str = ""
    command: str = ""


def open_study(
    storage,
    prefix: str,
    loss: str,
    space: list[SpaceEntry],
    s: SearchSettings,
    wait_s: float = SETTINGS_WAIT_S,
):
    """Create or load the study of ``loss``; refuse one created with another space, budget or
    protocol (it would mix trials of two searches).

    Workers started at once race to create the study: the one whose ``create_study`` succeeds
    writes the settings, the others wait (at most ``wait_s`` seconds) until every setting is
    written before comparing; settings still missing then (the creator died) are written."""
    optuna = optuna_or_exit()
    name = study_name(prefix, loss)
    expected = {
        "loss": loss,
        "space": space_attr(space),
        "n_trials": s.n_trials,
        "protocol": s.protocol,
        "prune": s.prune,
    }
    written = {**expected, "command": s.command, "seed": s.seed}
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
    else:  # this process created it: only the creator writes the settings
        _write_attrs(study, written)
        return study
    attrs = _settings_of(study, list(expected), wait_s)
    _write_attrs(study, {k: v for k, v in written.items() if k not in attrs})  # creator died
    for key, value in expected.items():
        if key in attrs and attrs[key] != value:
            raise ValueError(
                f"study {name!r} in this storage was created with {key}={attrs.get(key)!r}, "
                f"not {value!r}: use another --study-name (or --output) for a new search"
            )
    return study


def counts(study) -> dict[str, int]:
    """Trial counts of ``study`` by state (surplus trials apart)."""
    optuna = optuna_or_exit()
    S = optuna.trial.TrialState
    out = {"complete": 0, "pruned": 0, "running": 0, "waiting": 0, "errors": 0, "fail": 0}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(SURPLUS_ATTR):
            continue
        if t.state == S.COMPLETE:
            out["complete"] += 1
        elif t.state == S.PRUNED:
            out["pruned"] += 1
        elif t.state == S.RUNNING:
            out["running"] += 1
        elif t.state == S.WAITING:
            out["waiting"] += 1
        elif t.state == S.FAIL:
            out["fail"] += 1
            out["errors"] += ERROR_ATTR in t.user_attrs
    out["done"] = out["complete"] + out["pruned"]
    return out


class _Surplus(Exception):
    pass


class _OptunaReporter:
    def __init__(self, trial, prune: bool) -> None:
        self.trial, self.prune = trial, prune

    def report(self, value: float, step: int) -> None:
        optuna = optuna_or_exit()
        self.trial.report(value, step)
        if self.prune and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (value {value:.4f})")


def suggest(trial, entries: list[SpaceEntry]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in entries:
        if e.kind == "int":
            out[e.name] = trial.suggest_int(e.name, int(e.low), int(e.high))
        else:
            out[e.name] = trial.suggest_float(e.name, e.low, e.high, log=e.log)
    return out


def run_worker(
    storage,
    prefix: str,
    spaces: dict[str, list[SpaceEntry]],
    settings: SearchSettings,
    objective: Objective,
    trials_dir: Path,
    worker_index: int = 0,
    poll_s: float = 2.0,
    log: Callable[[str], None] = print,
) -> None:
    """Work on the studies of ``spaces`` (losses in order) until each meets its budget (or
    failed as often as its budget: a broken search is not retried forever). Losses without a
    space get no trials."""
    optuna = optuna_or_exit()
    n = settings.n_trials
    for loss, space in spaces.items():
        if not space:
            continue
        study = open_study(storage, prefix, loss, space, settings)
        sampler = optuna.samplers.TPESampler(
            seed=settings.seed + 1000 * worker_index,
            n_startup_trials=settings.startup_trials,
            constant_liar=True,
        )
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials, n_warmup_steps=1)
            if settings.prune
            else optuna.pruners.NopPruner()
        )
        study = optuna.load_study(
            study_name=study.study_name, storage=storage, sampler=sampler, pruner=pruner
        )

        def wrapped(trial, loss: str = loss, space: list[SpaceEntry] = space, study=study):
            S = optuna.trial.TrialState
            live = (S.COMPLETE, S.PRUNED, S.RUNNING)
            ahead = [
                t
                for t in study.get_trials(deepcopy=False, states=live)
                if t.number < trial.number and not t.user_attrs.get(SURPLUS_ATTR)
            ]
            if len(ahead) >= n:  # another worker took the last slot meanwhile
                trial.set_user_attr(SURPLUS_ATTR, True)
                raise _Surplus
            trial.set_user_attr(MACHINE_ATTR, machine())
            params = suggest(trial, space)
            config = TrialConfig(loss, params, trial.number, trials_dir / loss / f"{trial.number}")
            try:
                return objective(config, _OptunaReporter(trial, settings.prune))
            except optuna.TrialPruned:
                raise
            except Exception as e:
                trial.set_user_attr(ERROR_ATTR, f"{type(e).__name__}: {e}"[:500])
                raise

        while True:
            check_interrupt()  # between trials: a Ctrl-C a finalizer swallowed
            optuna.storages.fail_stale_trials(study)
            c = counts(study)
            if c["done"] >= n:
                log(f"[worker {worker_index}] {loss}: budget met ({c['done']}/{n})")
                break
            if c["errors"] >= n:
                log(f"[worker {worker_index}] {loss}: search failed ({c['errors']} errors)")
                break
            if c["done"] + c["running"] >= n:
                time.sleep(poll_s)  # the rest is running elsewhere; retry it if it goes stale
                continue
            study.optimize(
                wrapped,
                n_trials=1,
                catch=(Exception,),
                gc_after_trial=True,
                callbacks=[
                    lambda _, t, loss=loss: log(
                        f"[worker {worker_index}] {loss}: trial {t.number} {t.state.name} "
                        f"value={t.value}"
                    )
                ],
            )
