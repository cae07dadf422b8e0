"""The run store: the one module that knows a benchmark's output folder.

Layout of an output folder (``--output``)::

    protocol.json              the protocol of every run in the folder (written once)
    config.json                the full configuration of the last command
    .lock                      held while a command runs on the folder (filelock)
    runs/<loss>/seed_<s>/      one run (a :class:`RunFolder`):
        result.json            its results (:class:`ResultRecord`, with the per-epoch
                               ``history``); written last and atomically: a run is finished
                               when it has one
        map_data.npz           the data of its 2-D embedding maps (the first seed of the
                               command that trained it only)
        model.pt, model.json   with ``--save-models``: the selected model's and the loss's state
                               dicts, and the run's resolved specification with the checksum
                               of ``model.pt`` (:meth:`RunFolder.save_model`); written before
                               ``result.json``
        logs/, tensorboard/    the record-keeper's logs
    runs.csv, summary.csv, summary.md, comparison.csv, report.md, metrics.png,
    training_curves.png, embedding_maps.png      the report (:data:`REPORT_FILES`)
    runs_by_category.csv       the runs' per-category metrics (test sets with categories)
    best_params.json           each loss's settings as constructor arguments, with the metric
                               they reached (:func:`write_best_params`)

Integrity rules (the files are checked against their schema, :mod:`.schema`, whenever they are
read):

* a folder holds runs of exactly one protocol, recorded in ``protocol.json`` when the folder is
  first used; another protocol, or a record that does not match :func:`protocol_schema`, is
  refused (:class:`ProtocolMismatch`, naming each setting) before anything is written;
* one command at a time: :class:`folder_lock` (:class:`FolderBusy` when another holds it);
* a damaged run (a ``result.json`` that is not JSON, does not match its schema, is of another
  loss or seed or lacks one of the protocol's metrics; an unreadable ``map_data.npz``; a run
  folder without a result) is named by :meth:`RunStore.plan` and trained again; a finished run of
  another fingerprint (other loss arguments) is refused.

Data flows one way: the runner plans the runs of its specs here, training writes each run
through its :class:`RunFolder`, the report and the plots read the results back from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypedDict

import numpy as np

from .config import NON_PROTOCOL_FIELDS, USER_DATA_FIELDS, BenchmarkConfig, config_record
from .schema import schema_problem

if TYPE_CHECKING:
    from filelock import BaseFileLock

    from .spec import RunSpec

RUNS_DIR = "runs"
RESULT_FILE = "result.json"
MAP_FILE = "map_data.npz"
LOGS_DIR = "logs"
TENSORBOARD_DIR = "tensorboard"
PROTOCOL_FILE = "protocol.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
COMPARISON_FILE = "comparison.csv"
#: the runs' per-category test metrics (only when the test set has categories)
CATEGORY_FILE = "runs_by_category.csv"
#: ``--save-models``: the state dicts of a run's selected model and loss (``torch.save``)
MODEL_FILE = "model.pt"
#: ``--save-models``: what :data:`MODEL_FILE` holds (:class:`ModelRecord`), written after it
MODEL_RECORD_FILE = "model.json"
#: the version of the :data:`MODEL_FILE` / :data:`MODEL_RECORD_FILE` pair
MODEL_FORMAT = 1
#: each loss's settings to paste, with the metric they reached (:func:`write_best_params`)
BEST_PARAMS_FILE = "best_params.json"
#: the files of one run, as the report lists them
RUN_FILES = (RESULT_FILE, MAP_FILE, f"{LOGS_DIR}/", f"{TENSORBOARD_DIR}/")
#: the report's files: name -> file name in the output folder (``comparison.csv`` only when the
#: baseline was run: :data:`COMPARISON_FILE`)
REPORT_FILES = {
    "runs_csv": "runs.csv",
    "summary_csv": "summary.csv",
    "summary_md": "summary.md",
    "report_md": "report.md",
    "metrics_png": "metrics.png",
    "curves_png": "training_curves.png",
    "map_png": "embedding_maps.png",
    "best_params_json": BEST_PARAMS_FILE,
}


class ProtocolMismatch(ValueError):
    """The output folder holds runs of a different protocol."""


class FolderBusy(RuntimeError):
    """Another benchmark holds the output folder's lock."""


# ------------------------------------------------------------------ atomic JSON
def json_default(o: Any) -> Any:
    """JSON form of numpy scalars and arrays and of paths (``json.dump``'s ``default``)."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary binary file beside it, which is
    synced, then renamed: a reader sees the old file or the whole new one (a failing ``write``
    leaves the old file and no temporary one)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented JSON, atomically (:func:`write_atomic`)."""
    text = json.dumps(obj, indent=2, default=json_default)
    write_atomic(path, lambda f: f.write(text.encode()))


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: numpy values and paths as :func:`json_default` writes them,
    any other object (a regulariser given as a loss argument) as its ``repr``."""

    def default(o: Any) -> Any:
        try:
            return json_default(o)
        except TypeError:
            return repr(o)

    return json.loads(json.dumps(obj, default=default))


def sha256_of(path: Path) -> str:
    """The SHA-256 of the file ``path`` (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ schemas
class _RequiredResultFields(TypedDict):
    """The fields every ``result.json`` has (:class:`ResultRecord`)."""

    loss: str
    seed: int
    best_epoch: int
    best_val_score: float | None
    train_time_s: float
    iterations: int
    batch_size: int
    m_per_class: int
    test: dict[str, float] | None  # None: not evaluated on the test classes (tuning trials)
    history: list[dict[str, float]]
    loss_kwargs: dict[str, str]
    config_fingerprint: str
    command: str


class ResultRecord(_RequiredResultFields, total=False):
    """The schema of a run's ``result.json`` (written by
    :func:`~pml_proxies.benchmark.train.train_and_evaluate`, checked by :meth:`RunFolder.inspect`
    whenever one is read): its fields and their JSON types."""

    world_size: int  # processes that trained the run (torchrun); absent in older folders: 1
    # category -> test metrics of its queries; only where the test set has categories
    test_by_category: dict[str, dict[str, float]]


class ModelTrunk(TypedDict):
    """The trunk recipe in a :class:`ModelSpec` (:class:`~pml_proxies.benchmark.spec.TrunkRecipe`)."""

    name: str
    pretrained: bool


class ModelSettings(TypedDict):
    """The settings of the run's configuration that build its network, in a :class:`ModelSpec`
    (the whole configuration is there)."""

    dataset: str
    pooling: str
    embedding_size: int


class ModelSpec(TypedDict):
    """The run's resolved specification in a :class:`ModelRecord`
    (:class:`~pml_proxies.benchmark.spec.RunSpec` as JSON): what is needed to rebuild the
    network and the loss is checked; the other fields are for the reader."""

    loss: str
    seed: int
    config: ModelSettings
    loss_overrides: dict
    channels: int
    image_size: int
    trunk: ModelTrunk


class ModelRecord(TypedDict):
    """The schema of a run's ``model.json`` (``--save-models``): ``format``
    (:data:`MODEL_FORMAT`), the state-dict file and its SHA-256, the run's ``best_epoch`` (the
    selected epoch the weights are from), the number of training classes (the loss's
    ``num_classes``), what the network takes (``in_channels``: the images' channels, or the
    features' width) and the run's resolved specification."""

    format: int
    file: str
    sha256: str
    best_epoch: int
    num_classes: int
    in_channels: int
    spec: ModelSpec


def protocol_schema() -> dict:
    """The schema of ``protocol.json`` (:mod:`~pml_proxies.benchmark.schema`):
    ``{"protocol": {setting: type}}``, every protocol setting of :class:`BenchmarkConfig` with
    the type of its field."""
    hints = typing.get_type_hints(BenchmarkConfig)
    settings = {f.name: hints[f.name] for f in fields(BenchmarkConfig)
                if f.name not in NON_PROTOCOL_FIELDS and f.name not in USER_DATA_FIELDS}  # fmt: skip
    return {"protocol": settings}


def user_data_schema() -> dict:
    """The schema of the settings a protocol of a user's data holds beyond
    :func:`protocol_schema`'s (:data:`~pml_proxies.benchmark.config.USER_DATA_FIELDS`; absent
    from the protocol of a named data set)."""
    hints = typing.get_type_hints(BenchmarkConfig)
    return {name: hints[name] for name in USER_DATA_FIELDS}


def protocol_differences(recorded: dict, current: dict) -> list[str]:
    """``"setting: old -> new"`` for each setting of ``current`` that ``recorded`` holds with
    another value (JSON-normalised: a tuple equals a list). ``recorded`` holds every setting of
    ``current`` (:func:`recorded_protocol` checks it); a setting it holds beyond them is left
    out."""
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731
    diffs = []
    for key in sorted(current):  # a user's data setting absent from a named set's record: None
        old, new = norm(recorded.get(key)), norm(current[key])
        if old != new:
            diffs.append(f"{key}: {old!r} -> {new!r}")
    return diffs


def recorded_protocol(output: Path) -> dict | None:
    """The protocol recorded in ``output`` (``protocol.json``; for folders written before it
    existed, the protocol fields of ``config.json``), or ``None`` for a fresh folder.

    Raises:
        ProtocolMismatch: the record does not match :func:`protocol_schema` (not JSON, a
            setting missing or of a wrong type, named): the runs' protocol is unknown.
    """
    output = Path(output)
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
            if problem is None and isinstance(settings, dict):  # a user's data: its settings
                present = {k: h for k, h in user_data_schema().items() if k in settings}
                problem = schema_problem(settings, present, "protocol" * (name == PROTOCOL_FILE))
        if problem is not None:
            raise ProtocolMismatch(
                f"{path} does not record the protocol of the runs in {output}: {problem}; use "
                "another --output folder, or restore the file"
            )
        protocol = data["protocol"] if name == PROTOCOL_FILE else data
        return {k: v for k, v in protocol.items() if k not in NON_PROTOCOL_FIELDS}
    return None


# ------------------------------------------------------------------ one run
class RunFolder:
    """The folder of one run (``runs/<loss>/seed_<s>/``): the handle through which training
    writes a run (:meth:`start`, :attr:`logs`, :attr:`tensorboard`, :meth:`save`) and through
    which a finished run is read back (:meth:`inspect`, :meth:`map_data`)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def logs(self) -> Path:
        """The record-keeper's log folder."""
        return self.path / LOGS_DIR

    @property
    def tensorboard(self) -> Path:
        """The record-keeper's tensorboard folder."""
        return self.path / TENSORBOARD_DIR

    def start(self) -> None:
        """Empty the folder for a new attempt (an unfinished earlier attempt's records would be
        duplicated) and create it."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def save(self, result: dict, map_data: Mapping[str, np.ndarray] | None = None) -> None:
        """Write the run's ``map_data.npz`` (when given), then its ``result.json`` atomically:
        its presence marks the run as finished."""
        if map_data is not None:
            arrays: dict[str, Any] = dict(map_data)
            np.savez_compressed(self.path / MAP_FILE, **arrays)
        write_json_atomic(self.path / RESULT_FILE, result)

    def save_model(self, state: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        """``--save-models``: write ``state`` (``{"model": state dict, "loss": state dict}``)
        to ``model.pt``, then ``record`` (:class:`ModelRecord` less ``format``, ``file`` and
        ``sha256``, which are added) to ``model.json``, each atomically; call before
        :meth:`save` (a finished run's model is complete)."""
        import torch

        path = self.path / MODEL_FILE
        write_atomic(path, lambda f: torch.save(dict(state), f))
        full = {"format": MODEL_FORMAT, "file": MODEL_FILE, "sha256": sha256_of(path), **record}
        write_json_atomic(self.path / MODEL_RECORD_FILE, jsonable(full))

    def model_record(self) -> tuple[dict | None, str | None]:
        """``(record, problem)`` of the saved model: its :class:`ModelRecord` and ``None``, or
        ``None`` and why it cannot be used, naming the file: no ``model.json`` (a run trained
        without ``--save-models``); one that is not JSON, does not match :class:`ModelRecord` or
        is of another format; a ``model.pt`` missing or whose SHA-256 differs from the
        record's (damaged or replaced)."""
        path = self.path / MODEL_RECORD_FILE
        if not path.is_file():
            return None, (
                f"{self.path} holds no saved model (no {MODEL_RECORD_FILE}): its run was trained "
                "without --save-models; run the same command again with --save-models (the "
                "runs without a model are trained again)"
            )
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, f"{path} is not valid JSON ({e})"
        problem = schema_problem(record, ModelRecord)
        if problem is None and record["format"] != MODEL_FORMAT:
            problem = f"'format' is {record['format']!r}, this version reads {MODEL_FORMAT}"
        if problem is not None:
            return None, f"{path}: {problem}"
        weights = self.path / record["file"]
        if record["file"] != MODEL_FILE or not weights.is_file():
            return None, f"{path} names {record['file']!r}, which is not in {self.path}"
        if sha256_of(weights) != record["sha256"]:
            return None, (
                f"{weights} is damaged (its SHA-256 differs from the one {MODEL_RECORD_FILE} "
                "recorded)"
            )
        return record, None

    def load_model_state(self) -> tuple[dict, dict]:
        """``(record, state)``: the checked :meth:`model_record` and the state dicts of
        ``model.pt`` (``{"model": ..., "loss": ...}``, tensors on the CPU; read with
        ``weights_only``: no code is run).

        Raises:
            ValueError: the problem :meth:`model_record` names, or a ``model.pt`` that is not
                such a pair of state dicts.
        """
        import torch

        record, problem = self.model_record()
        if record is None:
            raise ValueError(problem)
        path = self.path / MODEL_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a damaged model
            raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
        if not (
            isinstance(state, dict)
            and all(isinstance(state.get(k), dict) for k in ("model", "loss"))
        ):
            raise ValueError(f"{path} does not hold the state dicts 'model' and 'loss'")
        return record, state

    def inspect(self, spec: RunSpec | None = None) -> tuple[dict | None, str | None]:
        """``(result, problem)``: the finished run's result dict and ``None``, or ``None`` and
        why the run is not finished or is damaged, naming the file (``None`` when the folder
        does not exist): no ``result.json``; a ``result.json`` that is not JSON, does not match
        :class:`ResultRecord` (a missing field, a wrong type) or has no test metrics; with
        ``spec``, one of another loss or seed or lacking one of ``spec``'s metrics; a
        ``map_data.npz`` that cannot be read (none is fine: only a command's first seed has
        one); with a ``spec`` whose configuration asks for
        ``--save-models``, a missing or damaged saved model (:meth:`model_record`). (The
        protocol fingerprint is the caller's to compare.)"""
        path = self.path / RESULT_FILE
        if not path.is_file():
            if self.path.exists():
                return None, f"{self.path} has no {RESULT_FILE} (an unfinished run)"
            return None, None
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, f"{path} is not valid JSON ({e})"
        problem = schema_problem(result, ResultRecord)
        if problem is None and result["test"] is None:
            problem = "'test' is null (no test metrics)"
        if problem is None and spec is not None:
            problem = _spec_problem(result, spec)
        if problem is not None:
            return None, f"{path}: {problem}"
        npz = self.path / MAP_FILE  # optional: only a command's first seed keeps map data
        try:
            if npz.exists():
                with np.load(npz) as z:
                    for key in z.files:
                        z[key]
        except Exception as e:  # noqa: BLE001 - any unreadable archive is a damaged run
            return None, f"{npz} cannot be read ({type(e).__name__}: {e})"
        if spec is not None and spec.config.save_models:
            _, problem = self.model_record()
            if problem is not None:
                return None, problem
        return result, None

    def map_data(self) -> dict[str, np.ndarray] | None:
        """The arrays of ``map_data.npz`` (see
        :func:`~pml_proxies.benchmark.plots.plot_embedding_maps`), or ``None`` without one."""
        path = self.path / MAP_FILE
        if not path.is_file():
            return None
        with np.load(path) as z:
            return {k: z[k] for k in z.files}


def _spec_problem(result: dict, spec: RunSpec) -> str | None:
    """Why a schema-valid ``result`` is not a run of ``spec`` (another loss or seed, a metric
    missing), or ``None``."""
    for key in ("loss", "seed"):
        if result[key] != getattr(spec, key):
            return f"'{key}' is {result[key]!r}, expected {getattr(spec, key)!r}"
    missing = [m for m in spec.metric_names if m not in result["test"]]
    if missing:
        return f"'test' lacks the metric(s) {', '.join(missing)}"
    return None


def run_folder(run: RunFolder | Path | str) -> RunFolder:
    """``run`` as a :class:`RunFolder` (a path is the run's folder)."""
    return run if isinstance(run, RunFolder) else RunFolder(run)


def run_dir(output: Path, loss_name: str, seed: int | str) -> Path:
    """The folder of the run of ``loss_name`` with ``seed`` in the output folder ``output``
    (``run_dir(output, "<loss>", "<s>")``: the pattern, as the report names it)."""
    return Path(output) / RUNS_DIR / loss_name / f"seed_{seed}"


def inspect_run(directory: Path, spec: RunSpec | None = None) -> tuple[dict | None, str | None]:
    """:meth:`RunFolder.inspect` of the run folder ``directory``."""
    return RunFolder(directory).inspect(spec)


def load_result(output: Path, loss_name: str, seed: int) -> dict | None:
    """The finished run's results, or ``None`` if the run has not finished or is damaged
    (:meth:`RunFolder.inspect`; no check against a spec)."""
    return inspect_run(run_dir(output, loss_name, seed))[0]


def write_best_params(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write ``best_params.json`` (:data:`BEST_PARAMS_FILE`) atomically: ``{"losses":
    records}``, one record per loss (see
    :func:`~pml_proxies.benchmark.snippets.best_params_record`)."""
    write_json_atomic(path, {"losses": jsonable(list(records))})


# ------------------------------------------------------------------ the folder
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


@dataclass
class RunInfo:
    """What one invocation did with the folder, for the report: start time, total time, threads
    (per run), jobs (runs trained at once), runs trained and reused, and the damaged or
    unfinished runs trained again (paths relative to the folder)."""

    start: float = field(default_factory=time.time)
    total_s: float = 0.0
    threads: int = 1
    jobs: int = 1
    trained: int = 0
    reused: int = 0
    redone: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What to do with the runs of ``specs`` in a store (:meth:`RunStore.plan`): ``finished``
    (index in ``specs`` -> result of the finished run, reused), ``todo`` (indices of the runs to
    train, in order) and ``problems`` (index -> why that run, to be trained again, is damaged or
    unfinished; a run never started has none)."""

    specs: list[RunSpec]
    finished: dict[int, dict] = field(default_factory=dict)
    todo: list[int] = field(default_factory=list)
    problems: dict[int, str] = field(default_factory=dict)


class RunStore:
    """An output folder (see the module's docstring for its layout)."""

    def __init__(self, output: Path | str) -> None:
        self.path = Path(output)

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    def run(self, loss: str, seed: int | str) -> RunFolder:
        """The folder of the run of ``loss`` with ``seed``."""
        return RunFolder(run_dir(self.path, loss, seed))

    def run_of(self, spec: RunSpec) -> RunFolder:
        """The folder of the run of ``spec``."""
        return self.run(spec.loss, spec.seed)

    def file(self, name: str) -> Path:
        """The path of the report's file ``name`` (a key of :data:`REPORT_FILES`)."""
        return self.path / REPORT_FILES[name]

    def relative(self, path: Path) -> str:
        """``path`` relative to the folder, with ``/``."""
        return Path(path).relative_to(self.path).as_posix()

    def has_runs(self) -> bool:
        """Whether the folder holds a run folder (finished or not)."""
        return (self.path / RUNS_DIR).exists()

    def lock(self) -> folder_lock:
        """The folder's exclusive lock (:class:`folder_lock`)."""
        return folder_lock(self.path)

    # -------------------------------------------------------------- protocol
    def recorded_protocol(self) -> dict | None:
        """:func:`recorded_protocol` of this folder."""
        return recorded_protocol(self.path)

    def check(self, config: BenchmarkConfig, specs: Sequence[RunSpec]) -> None:
        """Refuse, reading only, a folder of another protocol than ``config``'s (whatever runs
        it holds), one whose protocol record is damaged or lacks a setting, or one holding a
        finished run of one of ``specs`` with another fingerprint (:meth:`plan`).

        Raises:
            ProtocolMismatch: naming each differing setting, or the run.
        """
        recorded = self.recorded_protocol()
        if recorded is not None:
            diffs = protocol_differences(recorded, config.protocol())
            if diffs:
                raise ProtocolMismatch(
                    f"{self.path} holds runs of a different protocol ({'; '.join(diffs)}); use "
                    "another --output folder, or the same settings to add losses or seeds"
                )
        self.plan(specs)

    def record(self, config: BenchmarkConfig) -> None:
        """Record ``config``'s protocol (``protocol.json``, once: never rewritten) and its full
        configuration (``config.json``, each time)."""
        path = self.path / PROTOCOL_FILE
        if not path.is_file():
            write_json_atomic(path, {"protocol": config.protocol()})
        with open(self.path / CONFIG_FILE, "w") as f:
            json.dump(config_record(config), f, indent=2, default=str)

    # -------------------------------------------------------------- runs
    def plan(self, specs: Sequence[RunSpec]) -> Plan:
        """Which runs of ``specs`` are finished (reused) and which are to be trained (never
        started, unfinished or damaged: :meth:`RunFolder.inspect` against the spec). Reads only.

        Raises:
            ProtocolMismatch: a finished run of a spec has another fingerprint (other loss
                arguments).
        """
        plan = Plan(list(specs))
        for i, spec in enumerate(plan.specs):
            folder = self.run_of(spec)
            result, problem = folder.inspect(spec)
            if result is None:
                plan.todo.append(i)
                if problem is not None:
                    plan.problems[i] = problem
            elif result["config_fingerprint"] != spec.fingerprint:
                raise ProtocolMismatch(
                    f"{folder.path} holds a finished run of a different protocol (other "
                    f"arguments of loss {spec.loss!r}?); use another --output folder or delete "
                    "that run"
                )
            else:
                plan.finished[i] = result
        return plan

    def map_data(self, runs: Mapping[str, Sequence[int]]) -> dict[str, dict[str, np.ndarray]]:
        """``{loss: map data}``: for each ``loss -> seeds`` of ``runs``, the map data of the run
        of the first of ``seeds`` that has one (:meth:`RunFolder.map_data`; only the first seed
        of a command keeps map data, so a folder grown by several commands may hold it for a
        later seed); a loss without any is left out. In the order of ``runs``."""
        out = {}
        for loss, seeds in runs.items():
            for seed in seeds:
                data = self.run(loss, seed).map_data()
                if data is not None:
                    out[loss] = data
                    break
        return out


__all__ = [
    "RunStore",
    "RunFolder",
    "Plan",
    "RunInfo",
    "ResultRecord",
    "ProtocolMismatch",
    "FolderBusy",
    "folder_lock",
    "protocol_schema",
    "recorded_protocol",
    "protocol_differences",
    "inspect_run",
    "load_result",
    "run_dir",
    "run_folder",
    "write_json_atomic",
    "write_atomic",
    "write_best_params",
    "ModelRecord",
    "MODEL_FILE",
    "MODEL_RECORD_FILE",
    "BEST_PARAMS_FILE",
    "RUN_FILES",
    "REPORT_FILES",
    "CATEGORY_FILE",
]
