"""Run every (loss, seed) of a benchmark, resuming finished runs, and write the report.

Integrity rules of an output folder:

* it holds runs of exactly one protocol, recorded in ``protocol.json`` when the folder is first
  used; a command with another protocol is refused (:class:`ProtocolMismatch`, naming each
  differing setting) before anything is trained or written;
* one benchmark at a time: an exclusive lock (``.lock``, :mod:`filelock`) is held for the whole
  run; a second command on the same folder is refused (:class:`FolderBusy`);
* the files are checked against their schema whenever they are read
  (:class:`~pml_proxies.benchmark.train.ResultRecord`, :func:`protocol_schema`); a
  ``protocol.json`` that does not match (a setting missing or of a wrong type) is refused like
  another protocol, naming the setting;
* a damaged run (a ``result.json`` that is not JSON, does not match its schema, is of another
  loss or seed or lacks one of the protocol's metrics; an unreadable ``map_data.npz``; a run
  folder without a result) is reported with its path and trained again.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import traceback
import typing
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import distributed as ddp
from .config import NON_PROTOCOL_FIELDS, BenchmarkConfig, ConfigError, config_record
from .data import BenchmarkData, load_config_data
from .losses import build_loss
from .parallel import RunFailure, train_parallel
from .progress import is_terminal, progress_bar
from .schema import schema_problem
from .spec import RunSpec, build_run_spec
from .train import inspect_run, run_dir, torch_threads, train_and_evaluate

if TYPE_CHECKING:
    from filelock import BaseFileLock

PROTOCOL_FILE = "protocol.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"


class ProtocolMismatch(ValueError):
    """The output folder holds runs of a different protocol."""


class FolderBusy(RuntimeError):
    """Another benchmark holds the output folder's lock."""


@dataclass
class RunInfo:
    """Facts of one invocation for the report: start time, total time, threads (per run),
    jobs (runs trained at once)."""

    start: float = field(default_factory=time.time)
    total_s: float = 0.0
    threads: int = 1
    jobs: int = 1
    trained: int = 0
    reused: int = 0
    redone: list[str] = field(default_factory=list)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def run_benchmark(config: BenchmarkConfig, report_only: bool = False) -> dict:
    """Train and evaluate every loss x seed of ``config``, then write the report.

    The runs to train are trained ``config.jobs_for(n)`` at a time (worker processes,
    :mod:`~pml_proxies.benchmark.parallel`; the results do not depend on it). Finished runs
    (``runs/<loss>/seed_<s>/result.json`` with a matching protocol fingerprint) are reused: an interrupted benchmark resumes where it stopped. ``report_only`` trains nothing and
    rebuilds the report and plots from the finished runs (missing ones are left out).

    Returns:
        ``{"runs": DataFrame, "summary": DataFrame, "files": {name: path}, "skipped": n}``
        (``skipped``: finished runs reused).

    Raises:
        ConfigError: no loss, a loss argument its constructor rejects, or ``report_only`` with
            an output folder that does not exist (nothing is created).
        ProtocolMismatch: the output folder holds runs of another protocol, or its protocol
            record is damaged or lacks a setting.
        FolderBusy: another benchmark is running on the output folder.
        RunsFailed: some runs raised (each is noted with its loss and seed when it fails); the
            other runs were trained and the report written first.

    Under ``torchrun`` (:mod:`~pml_proxies.benchmark.distributed`) every process calls it: each
    run is trained by all of them (DDP); rank 0 alone writes the folder and returns the above,
    the other ranks return ``{}``. A run that raises there stops the job.
    """
    config = ddp.setup(config)
    specs = resolve_specs(config)
    if not ddp.is_main():
        return ddp.follow(config, specs)
    with ddp.leading() as send:
        return _run_benchmark(config, specs, report_only, send)


def _run_benchmark(
    config: BenchmarkConfig,
    specs: list[RunSpec],
    report_only: bool,
    send: Callable[[list[tuple[str, int]]], None],
) -> dict:
    output = Path(config.output)
    if report_only and not output.is_dir():
        raise ConfigError(
            "output", f"{output} is not a folder: --report-only reports the finished runs of an "
            "existing output folder"
        )  # fmt: skip
    check_folder(config, specs, output)  # reads only: nothing is written on refusal
    fresh = not output.exists()
    try:
        with torch_threads(config), folder_lock(output):
            check_folder(config, specs, output)  # again, under the lock
            return _run(config, specs, output, report_only, send)
    except BaseException:
        if fresh and not (output / "runs").exists():  # e.g. the data set failed to load
            shutil.rmtree(output, ignore_errors=True)
        raise


def resolve_specs(config: BenchmarkConfig) -> list[RunSpec]:
    """The run specs of ``config`` (losses outer, seeds inner), each loss built once on a toy
    problem so that a bad loss argument fails before anything is written."""
    if not config.losses:
        raise ConfigError("losses", "name at least one loss")
    specs = []
    for loss in config.losses:
        loss_specs = [build_run_spec(config, loss, seed) for seed in config.seeds]
        try:
            build_loss(
                loss, 3, 4, dataset=config.dataset, overrides=dict(loss_specs[0].loss_overrides)
            )
        except (TypeError, ValueError) as e:
            raise ConfigError("loss_params", f"loss {loss!r}: {e}") from None
        specs += loss_specs
    return specs


# ------------------------------------------------------------------ folder integrity
def protocol_schema() -> dict:
    """The schema of ``protocol.json`` (:mod:`~pml_proxies.benchmark.schema`):
    ``{"protocol": {setting: type}}``, every protocol setting of :class:`BenchmarkConfig` with
    the type of its field."""
    hints = typing.get_type_hints(BenchmarkConfig)
    settings = {f.name: hints[f.name] for f in fields(BenchmarkConfig)
                if f.name not in NON_PROTOCOL_FIELDS}  # fmt: skip
    return {"protocol": settings}


def recorded_protocol(output: Path) -> dict | None:
    """The protocol recorded in ``output`` (``protocol.json``; for folders written before it
    existed, the protocol fields of ``config.json``), or ``None`` for a fresh folder.

    Raises:
        ProtocolMismatch: the record does not match :func:`protocol_schema` (not JSON, a
            setting missing or of a wrong type, named): the runs' protocol is unknown.
    """
    schema = protocol_schema()
    for name in (PROTOCOL_FILE, CONFIG_FILE):
        path = output / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problem: str | None = f"not valid JSON ({e})"
        else:  # config.json holds the settings at its top level
            settings = data.get("protocol") if isinstance(data, dict) else None
            settings = settings if name == PROTOCOL_FILE else data
            if isinstance(settings, dict):  # recorded before the version existed: version 1
                settings.setdefault("pipeline_version", 1)
            problem = schema_problem(data, schema if name == PROTOCOL_FILE else schema["protocol"])
        if problem is not None:
            raise ProtocolMismatch(
                f"{path} does not record the protocol of the runs in {output}: {problem}; use "
                "another --output folder, or restore the file"
            )
        protocol = data["protocol"] if name == PROTOCOL_FILE else data
        return {k: v for k, v in protocol.items() if k not in NON_PROTOCOL_FIELDS}
    return None


def protocol_differences(recorded: dict, current: dict) -> list[str]:
    """``"setting: old -> new"`` for each setting of ``current`` that ``recorded`` holds with
    another value (JSON-normalised: a tuple equals a list). ``recorded`` holds every setting of
    ``current`` (:func:`recorded_protocol` checks it); a setting it holds beyond them is left
    out."""
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731
    diffs = []
    for key in sorted(current):
        old, new = norm(recorded[key]), norm(current[key])
        if old != new:
            diffs.append(f"{key}: {old!r} -> {new!r}")
    return diffs


def check_folder(config: BenchmarkConfig, specs: list[RunSpec], output: Path) -> None:
    """Refuse, before anything is trained or written, an output folder of another protocol
    (whatever losses the command names), one whose protocol record is damaged or lacks a
    setting, or one holding a finished run of one of ``specs`` with another fingerprint (other
    loss arguments)."""
    recorded = recorded_protocol(output)
    if recorded is not None:
        diffs = protocol_differences(recorded, config.protocol())
        if diffs:
            raise ProtocolMismatch(
                f"{output} holds runs of a different protocol ({'; '.join(diffs)}); use another "
                "--output folder, or the same settings to add losses or seeds"
            )
    for spec in specs:
        result, _ = inspect_run(run_dir(output, spec.loss, spec.seed), spec)
        if result is not None and result["config_fingerprint"] != spec.fingerprint:
            raise ProtocolMismatch(
                f"{run_dir(output, spec.loss, spec.seed)} holds a finished run of a different "
                f"protocol (other arguments of loss {spec.loss!r}?); use another --output "
                "folder or delete that run"
            )


class folder_lock:  # noqa: N801 - used as a context manager
    """Exclusive lock of an output folder for the whole benchmark (creates the folder)."""

    def __init__(self, output: Path) -> None:
        self.output = Path(output)
        self._lock: BaseFileLock | None = None

    def __enter__(self) -> folder_lock:
        from filelock import FileLock, Timeout

        self.output.mkdir(parents=True, exist_ok=True)
        path = self.output / LOCK_FILE
        self._lock = FileLock(str(path), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            raise FolderBusy(
                f"another benchmark is running on {self.output} (lock {path}); wait for it to "
                "finish or use another --output folder"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()


def _record_protocol(config: BenchmarkConfig, output: Path) -> None:
    path = output / PROTOCOL_FILE
    if not path.is_file():
        from .train import _write_json_atomic

        _write_json_atomic(path, {"protocol": config.protocol()})


# ------------------------------------------------------------------ the runs
class RunsFailed(RuntimeError):
    """Some runs raised; the others finished and are in the report. ``failures``: one
    :class:`~pml_proxies.benchmark.parallel.RunFailure` per failed run."""

    def __init__(self, failures: list[RunFailure]) -> None:
        super().__init__(
            f"{len(failures)} run(s) failed (the report holds the others; the same command "
            "trains the failed ones again): " + "; ".join(str(f) for f in failures)
        )
        self.failures = failures


def _run(
    config: BenchmarkConfig,
    specs: list[RunSpec],
    output: Path,
    report_only: bool,
    send: Callable[[list[tuple[str, int]]], None],
) -> dict:
    info = RunInfo(threads=torch.get_num_threads())
    # the data sets' own tqdm bars only on a terminal
    data = load_config_data(config, progress=config.progress and is_terminal())
    _record_protocol(config, output)
    with open(output / CONFIG_FILE, "w") as f:
        json.dump(config_record(config), f, indent=2, default=str)

    results: dict[int, dict] = {}
    todo = []
    for i, spec in enumerate(specs):
        result = _finished(spec, output, info, report_only)
        if result is not None:
            results[i] = result
        elif not report_only:
            todo.append(i)
    info.jobs = config.jobs_for(len(todo)) if todo else 1
    # under torchrun the other ranks train these runs with this process
    send([(specs[i].loss, specs[i].seed) for i in todo])
    failures = []
    outcomes = train_runs(
        [specs[i] for i in todo], data, output, config, info.jobs, on_wait=lambda: bar.refresh()
    )
    bar = progress_bar(
        outcomes, desc="benchmark", enabled=config.progress, total=len(todo), each_item=True
    )
    with contextlib.closing(outcomes):  # an interruption stops the workers
        for k, outcome in bar:
            spec = specs[todo[k]]
            if isinstance(outcome, RunFailure):
                _note(f"{outcome} (the other runs go on)")
                failures.append(outcome)
            else:
                info.trained += 1
                results[todo[k]] = outcome
            status = "failed" if isinstance(outcome, RunFailure) else "done"
            bar.set_postfix_str(f"{spec.loss} seed {spec.seed} {status}")
    info.total_s = time.time() - info.start
    if not results:
        if failures:
            raise RunsFailed(failures)
        raise ValueError(f"{output} holds no finished run of these losses and seeds to report")
    order = sorted(results)
    from .report import write_report  # pandas, matplotlib, scipy: only once there is a report

    files, runs, summary = write_report(
        config, data, [specs[i] for i in order], [results[i] for i in order], output, info
    )
    if failures:
        raise RunsFailed(failures)
    return {"runs": runs, "summary": summary, "files": files, "skipped": info.reused}


def _finished(spec: RunSpec, output: Path, info: RunInfo, report_only: bool) -> dict | None:
    """The finished run of ``spec``, or ``None`` (a damaged or unfinished one is noted: left out
    with ``report_only``, else trained again)."""
    directory = run_dir(output, spec.loss, spec.seed)
    result, problem = inspect_run(directory, spec)
    if result is not None:  # its fingerprint was checked by check_folder
        info.reused += 1
        return result
    if problem is not None:
        if report_only:
            _note(f"{problem}: left out of the report")
        else:
            _note(f"{problem}: the run is trained again")
            info.redone.append(str(directory.relative_to(output)))
    return None


def train_runs(
    specs: list[RunSpec],
    data: BenchmarkData | None,
    output: Path,
    config: BenchmarkConfig,
    jobs: int,
    on_wait: Callable[[], None] | None = None,
) -> Generator[tuple[int, dict | RunFailure], None, None]:
    """Train ``specs``; yields ``(index in specs, result or RunFailure)`` as runs finish:
    in this process with ``jobs == 1`` (on ``data``), else in ``jobs`` worker processes that
    load the data themselves (:func:`~pml_proxies.benchmark.parallel.train_parallel`, the same
    results). Closing the generator stops the workers."""
    if jobs > 1:
        runs = [(s, run_dir(output, s.loss, s.seed)) for s in specs]
        yield from train_parallel(config, runs, jobs, on_wait)
        return
    if data is None:
        raise ValueError("train_runs needs the data to train in this process (jobs == 1)")
    for i, spec in enumerate(specs):
        try:
            result = train_and_evaluate(
                spec, data, run_dir(output, spec.loss, spec.seed), position=1
            )
        except Exception as e:  # noqa: BLE001 - reported with its run; the others go on
            if ddp.world_size() > 1:  # the other ranks cannot go on alone: stop the job
                raise
            yield (
                i,
                RunFailure(
                    spec.loss, spec.seed, f"{type(e).__name__}: {e}", traceback.format_exc()
                ),
            )
        else:
            yield i, result
