"""The tuned benchmark end to end: search, re-run the best trials with the seeds, report."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import BenchmarkConfig
from ..data import data_notes
from ..report import report_title
from . import report as tune_report
from .errors import UsageError
from .spaces import SpaceEntry
from .study import (
    REPORT_KEYS,
    SearchSettings,
    check_studies,
    default_storage,
    make_storage,
    run_worker,
    shown_url,
)
from .trial import BenchmarkObjective, Objective, load_data, trial_spec


@dataclass(frozen=True)
class TuneOptions:
    """The search's settings (see ``pml-proxies-benchmark tune --help``)."""

    n_trials: int = 20
    prune: bool = False
    folds: int = 1
    sampler_seed: int = 0
    trial_seed: int = 0
    startup_trials: int = 5
    storage: str | None = None
    study_name: str = "tune"
    worker_index: int = 0
    heartbeat: int = 10
    grace_period: int = 60
    max_retry: int = 3
    reproduce: bool = True
    with_defaults: bool = False


def storage_url(config: BenchmarkConfig, options: TuneOptions) -> str:
    return options.storage or default_storage(config.output)


def settings_of(config: BenchmarkConfig, options: TuneOptions) -> SearchSettings:
    protocol = f"{config.fingerprint()}-folds{options.folds}-trialseed{options.trial_seed}"
    return SearchSettings(
        n_trials=options.n_trials,
        seed=options.sampler_seed,
        prune=options.prune,
        startup_trials=options.startup_trials,
        protocol=protocol,
        command=config.command,
        protocol_fields={
            **config.protocol(),
            "folds": options.folds,
            "trial_seed": options.trial_seed,
        },
    )


def _storage(config: BenchmarkConfig, options: TuneOptions, create: bool = True):
    """The storage of ``config``'s search; ``create=False``: nothing is created (an SQLite file
    that does not exist is a ``UsageError``)."""
    url = storage_url(config, options)
    if not create:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
            raise UsageError(
                f"--report-only: no search to report in {config.output} (no {parsed.database})"
            )
    else:
        Path(config.output).mkdir(parents=True, exist_ok=True)
    return make_storage(url, options.heartbeat, options.grace_period, options.max_retry)


def check_report_only(
    config: BenchmarkConfig, spaces: dict[str, list[SpaceEntry]], options: TuneOptions
) -> None:
    """Refuse ``--report-only`` before anything is created: no storage file, no study of the
    losses in the storage (``UsageError``), or studies searched under another protocol or space
    (``ProtocolMismatch``)."""
    storage = _storage(config, options, create=False)
    studies = tune_report.load_studies(storage, options.study_name, list(spaces))
    if all(study is None for loss, study in studies.items() if spaces[loss]):
        names = ", ".join(f"{options.study_name}/{loss}" for loss in spaces if spaces[loss])
        raise UsageError(
            f"--report-only: no study {names or '(no loss has a space)'} in "
            f"{shown_url(storage_url(config, options))}: nothing to report"
        )
    check_studies(storage, options.study_name, spaces, settings_of(config, options), REPORT_KEYS)


def check_search(
    config: BenchmarkConfig,
    spaces: dict[str, list[SpaceEntry]],
    options: TuneOptions,
    objective: Objective | None = None,
) -> Objective:
    """What every trial would fail on, checked before the first: the studies' settings
    (``ProtocolMismatch``), the data and ``--folds`` of the benchmark's objective
    (``UsageError``). Returns the objective (the benchmark's, its data loaded, for ``None``)."""
    settings = settings_of(config, options)
    check_studies(_storage(config, options), options.study_name, spaces, settings)
    if objective is None:
        objective = BenchmarkObjective(config, options.folds, options.trial_seed)
        if any(spaces.values()):
            objective.check()
    return objective


def search(
    config: BenchmarkConfig,
    spaces: dict[str, list[SpaceEntry]],
    options: TuneOptions,
    objective: Objective | None = None,
) -> None:
    """Run this process's share of the search (one worker).

    Raises:
        ProtocolMismatch: a study of ``spaces`` was searched with other settings.
        UsageError: the benchmark's objective cannot run (no validation classes, too many folds).
    """
    objective = check_search(config, spaces, options, objective)
    run_worker(
        _storage(config, options),
        options.study_name,
        spaces,
        settings_of(config, options),
        objective,
        Path(config.output) / "trials",
        worker_index=options.worker_index,
    )


def _reproduce(config: BenchmarkConfig, best: list[tuple[str, dict]], output: Path) -> list[dict]:
    """The untuned protocol with each ``(loss, best parameters)`` of ``best``: every seed of
    ``config``, test classes evaluated once at the epoch selected on validation. Finished runs of
    the same spec in ``output`` are reused, the others trained as the benchmark trains them: the
    benchmark's own plan and resume step (:func:`~pml_proxies.benchmark.runner.resume_runs`).
    Results: losses outer, seeds inner.

    Raises:
        ProtocolMismatch: a run folder holds a run of another protocol (nothing is trained).
        RunsFailed: some runs raised (the others were trained and are kept).
    """
    from ..runner import RunsFailed, resume_runs
    from ..store import RunInfo, RunStore
    from ..train import torch_threads

    specs = [
        trial_spec(config, loss, params, seed) for loss, params in best for seed in config.seeds
    ]
    with torch_threads(config):  # Ctrl-C stops the workers (resume_runs closes them)
        results, failures = resume_runs(
            specs, RunStore(output), config, lambda: load_data(config, config.progress), RunInfo()
        )
    if failures:
        raise RunsFailed(failures)
    return [results[i] for i in sorted(results)]


def run_tune(
    config: BenchmarkConfig, spaces: dict[str, list[SpaceEntry]], options: TuneOptions
) -> dict:
    """After the search: re-run each loss's best trial with ``config.seeds`` (unless
    ``options.reproduce`` is off), optionally the paper defaults, and write the report.

    Returns ``{"report_md": path, "search_md": path, "search": rows}``.
    """
    out = Path(config.output)
    storage = _storage(config, options)
    losses = list(spaces)
    command = settings_of(config, options)
    check_studies(storage, options.study_name, spaces, command, REPORT_KEYS)
    studies = tune_report.load_studies(storage, options.study_name, losses)
    rows = tune_report.search_summary(studies, spaces, options.n_trials)
    plots = tune_report.write_plots(studies, out / "plots")
    settings = dict(
        **tune_report.stored_settings(studies, command),
        folds=options.folds,
        trial_seed=options.trial_seed,
        primary_metric=config.primary_metric,
    )
    search_md = tune_report.search_markdown(rows, spaces, settings, plots, config.lr_or_default)
    created = next(
        (s.user_attrs.get("command") for s in studies.values() if s is not None), config.command
    )
    header = [
        f"# {report_title(config, 'Tuned benchmark report')}",
        "",
        *[f"{note}\n" for note in data_notes(config)],
        "Search command (the command that created the studies):",
        "",
        "```",
        created or "(called from Python)",
        "```",
        "",
        "## Search",
        "",
        "",
    ]
    (out / "search.md").write_text(search_md)
    body = ["\n".join(header) + search_md]
    if options.with_defaults and not (out / "defaults" / "summary.md").exists():
        from ..runner import run_benchmark

        run_benchmark(dataclasses.replace(config, output=str(out / "defaults")))
    results: list[dict] = []
    if options.reproduce:
        best = [
            (r["loss"], r["params"])
            for r in rows
            if r["status"] == "done" or r["status"].startswith("no space")
        ]
        results = _reproduce(config, best, out / "tuned")
        if results:
            body.append(_tuned_section(config, results, losses, out))
    pasted = tune_report.best_settings(config, rows, results, options.folds, out)
    if pasted:
        body.append(pasted)
    defaults = out / "defaults" / "summary.md"
    if defaults.exists():
        body.append(
            "## Test results: paper defaults (x100, same protocol, `defaults/`)\n\n"
            + defaults.read_text().strip()
            + "\n"
        )
    report_md = out / "tune_report.md"
    report_md.write_text("\n".join(body))
    with open(out / "search.json", "w") as f:
        json.dump(rows, f, indent=2, default=str)
    return {"report_md": report_md, "search_md": out / "search.md", "search": rows}


def _tuned_section(config: BenchmarkConfig, results: list[dict], losses: list[str], out: Path):
    from .. import report as bench_report
    from ..store import COMPARISON_FILE, RunStore

    summary, table = tune_report.results_table(results, losses)
    tuned = RunStore(out / "tuned")  # the re-runs' output folder
    tuned.path.mkdir(parents=True, exist_ok=True)
    runs = bench_report.runs_table(results)
    runs.to_csv(tuned.file("runs_csv"), index=False)
    comparison_md = bench_report.write_comparison(
        config, runs, list(summary["loss"]), tuned.path / COMPARISON_FILE
    )
    compared = []
    if comparison_md:
        compared = [
            f"### Tuned against tuned {bench_report.BASELINE} (seed-paired differences)",
            "",
            comparison_md,
            "",
        ]
    summary.to_csv(tuned.file("summary_csv"), index=False)
    tuned.file("summary_md").write_text(table + "\n")
    bench_report.plot_metric_bars(summary, tuned.file("metrics_png"))
    bench_report.plot_training_curves(
        results, list(summary["loss"]), config.primary_metric, tuned.file("curves_png")
    )
    return "\n".join(
        [
            f"## Test results: tuned (x100, mean ± 95% CI over seeds {config.seeds}; best "
            "trial per loss re-run under the untuned protocol, test classes evaluated once)",
            "",
            table,
            "",
            *compared,
            "![tuned metrics](tuned/metrics.png)",
            "",
            "![tuned curves](tuned/training_curves.png)",
            "",
        ]
    )
