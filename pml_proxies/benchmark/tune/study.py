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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..interrupt import check as check_interrupt
from .errors import StorageError, UsageError
from .spaces import SpaceEntry
from .trial import Objective, TrialConfig

#: user attribute of a trial a worker started when the budget was already taken (concurrency)
SURPLUS_ATTR = "surplus"
#: user attribute holding the error of a trial whose objective raised
ERROR_ATTR = "error"


MACHINE_ATTR = "machine"
#: study attribute holding the protocol's settings (``"protocol"`` holds their fingerprint)
PROTOCOL_FIELDS_ATTR = "protocol_fields"
#: the settings a worker must share with a study to join it
WORKER_KEYS = ("loss", "space", "n_trials", "protocol", "prune")
#: the settings that must match for a report (the re-runs train under this protocol); the
#: budget and the sampler are read from the study
REPORT_KEYS = ("loss", "space", "protocol")


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


def check_storage_url(url: str) -> None:
    """Refuse, before anything is written, a ``--storage`` URL that cannot hold a search: not a
    database URL, an in-memory SQLite database (lost when the command ends, and private to one
    process: the report would find no study), an SQLite file in a folder that does not exist.

    Raises:
        UsageError: naming ``--storage`` and the URL.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise UsageError(
            f"--storage {url!r} is not a database URL ({e}); e.g. sqlite:///path/tune.sqlite3 "
            "or postgresql://user@host:5432/db"
        ) from None
    if parsed.get_backend_name() != "sqlite":
        return
    database = parsed.database or ""
    if database in ("", ":memory:") or "mode=memory" in url or database.startswith("file::memory"):
        raise UsageError(
            f"--storage {url!r} is an in-memory SQLite database: the studies would be lost when "
            "the command ends; give a file (sqlite:///path/tune.sqlite3) or leave --storage out "
            "(OUTPUT/tune.sqlite3)"
        )
    folder = Path(database).parent
    if not folder.is_dir():
        raise UsageError(f"--storage {url!r}: the folder {folder} does not exist")


def shown_url(url: str) -> str:
    """``url`` with its password hidden (for messages)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: shown as given
        return url


def _one_line(error: BaseException) -> str:
    """The first line of ``error``'s message (a database driver's own, not SQLAlchemy's)."""
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
    ``grace_period`` s is failed and retried (at most ``max_retry`` times).

    Raises:
        StorageError: the storage cannot be opened (one line naming the URL, password hidden,
            and the database's own message).
    """
    optuna = optuna_or_exit()
    from optuna import storages
    from optuna.storages import RDBStorage

    try:
        url = postgres_driver_url(url)
    except ImportError as e:
        raise StorageError(str(e)) from None
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
                raise StorageError(
                    f"cannot open the storage {shown_url(url)}: {_one_line(e)}"
                ) from e
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
        protocol_fields: the settings behind ``protocol`` (a refusal names the differing ones).
    """

    n_trials: int
    seed: int = 0
    prune: bool = False
    startup_trials: int = 2
    protocol: str = ""
    command: str = ""
    protocol_fields: dict[str, Any] = field(default_factory=dict)

    def expected(self, loss: str, space: list[SpaceEntry]) -> dict[str, Any]:
        """The study attributes of ``loss`` a worker must share (:data:`WORKER_KEYS`)."""
        return {
            "loss": loss,
            "space": space_attr(space),
            "n_trials": self.n_trials,
            "protocol": self.protocol,
            "prune": self.prune,
        }

    def written(self, loss: str, space: list[SpaceEntry]) -> dict[str, Any]:
        """Every study attribute the creator of the study of ``loss`` writes."""
        return {
            **self.expected(loss, space),
            "command": self.command,
            "seed": self.seed,
            "startup_trials": self.startup_trials,
            PROTOCOL_FIELDS_ATTR: self.protocol_fields,
        }


def _fmt_space(entries: dict[str, list]) -> str:
    return ", ".join(f"{n}={lo:g}:{hi:g}:{kind}" for n, (lo, hi, kind) in entries.items())


def settings_differences(attrs: dict, expected: dict, protocol_fields: dict) -> list[str]:
    """``"setting: stored -> expected"`` for each setting of ``expected`` that the study
    attributes ``attrs`` hold with another value; a protocol difference names the differing
    protocol settings (``epochs: 2 -> 3``), a space difference the differing entries."""
    from ..runner import protocol_differences

    diffs = []
    for key, value in expected.items():
        if key not in attrs or attrs[key] == value:
            continue
        old = attrs[key]
        if key == "protocol":
            stored = attrs.get(PROTOCOL_FIELDS_ATTR)
            named = protocol_differences(stored, protocol_fields) if stored else []
            diffs += named or [f"protocol: fingerprint {old} -> {value} (settings not recorded)"]
        elif key == "space":
            before = {e[0]: e[1:] for e in old}
            after = {e[0]: e[1:] for e in value}
            gone = {k: v for k, v in before.items() if after.get(k) != v}
            new = {k: v for k, v in after.items() if before.get(k) != v}
            diffs.append(f"space: {_fmt_space(gone) or '-'} -> {_fmt_space(new) or '-'}")
        else:
            diffs.append(f"{key}: {old!r} -> {value!r}")
    return diffs


def _refuse(name: str, diffs: list[str]):
    from ..runner import ProtocolMismatch

    return ProtocolMismatch(
        f"study {name!r} in this storage was searched with other settings ({'; '.join(diffs)}); "
        "use the study's settings, or another --study-name (or --output) for a new search"
    )


def check_studies(
    storage,
    prefix: str,
    spaces: dict[str, list[SpaceEntry]],
    s: SearchSettings,
    keys: tuple[str, ...] = WORKER_KEYS,
) -> None:
    """Refuse (``ProtocolMismatch``, naming each differing setting) a command whose ``keys``
    settings differ from those of an existing study of ``spaces``; creates nothing."""
    optuna = optuna_or_exit()
    names = {x.study_name: x for x in optuna.get_all_study_summaries(storage)}
    for loss, space in spaces.items():
        summary = names.get(study_name(prefix, loss))
        if summary is None or not space:
            continue
        expected = {k: v for k, v in s.expected(loss, space).items() if k in keys}
        diffs = settings_differences(summary.user_attrs, expected, s.protocol_fields)
        if diffs:
            raise _refuse(summary.study_name, diffs)


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
    expected = s.expected(loss, space)
    written = s.written(loss, space)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
    else:  # this process created it: only the creator writes the settings
        _write_attrs(study, written)
        return study
    attrs = _settings_of(study, list(expected), wait_s)
    _write_attrs(study, {k: v for k, v in written.items() if k not in attrs})  # creator died
    diffs = settings_differences(attrs, expected, s.protocol_fields)
    if diffs:
        raise _refuse(name, diffs)
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
            try:  # an error anywhere, sampling included, counts toward the error budget
                trial.set_user_attr(MACHINE_ATTR, machine())
                params = suggest(trial, space)
                path = trials_dir / loss / f"{trial.number}"
                return objective(TrialConfig(loss, params, trial.number, path),
                                 _OptunaReporter(trial, settings.prune))  # fmt: skip
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
