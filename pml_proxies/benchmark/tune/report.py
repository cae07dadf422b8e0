"""Report of a tuned benchmark: the search (budget, time, pruned and failed trials, best
hyper-parameters, Optuna's plots per loss) and the tuned test table beside the paper-defaults
table. The search part is a function of the stored trials only, so every worker (or a later
``--report-only`` call) writes the same text from the same study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .. import report as bench_report
from ..config import BenchmarkConfig
from ..metrics import metric_label
from .spaces import PROXY_LR, SpaceEntry
from .study import (
    ERROR_ATTR,
    MACHINE_ATTR,
    SURPLUS_ATTR,
    SearchSettings,
    counts,
    optuna_or_exit,
    study_name,
)

#: fewest COMPLETE trials of a study for which the parameter importances are drawn: fANOVA fits
#: a random forest to the (parameters, value) pairs of the complete trials, and with fewer than
#: about ten points per study its importances are noise (they change with the forest's seed)
MIN_IMPORTANCE_TRIALS = 10


def _fmt_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def fmt_params(params: dict, lr: float | None = None) -> str:
    parts = []
    for key, value in params.items():
        text = f"{key}={_fmt_value(value)}"
        if key == PROXY_LR and lr:
            text += f" (x{value / lr:.3g} trunk lr)"
        parts.append(text)
    return ", ".join(parts) or "paper defaults (no space)"


def load_studies(storage, prefix: str, losses: list[str]) -> dict:
    """``{loss: study or None}`` (``None``: no study in the storage)."""
    optuna = optuna_or_exit()
    out = {}
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    for loss in losses:
        name = study_name(prefix, loss)
        out[loss] = optuna.load_study(study_name=name, storage=storage) if name in names else None
    return out


def stored_settings(studies: dict, command: SearchSettings) -> dict[str, Any]:
    """The budget and sampler settings the studies were searched with (``n_trials``, ``seed``,
    ``startup_trials``, ``prune``), read from the studies; ``command``'s where no study records
    one (none exists, or it was created by an older version). Values that differ between the
    studies are joined (``"2 / 3"``)."""
    out: dict[str, Any] = {}
    for key in ("n_trials", "seed", "startup_trials", "prune"):
        values = [s.user_attrs[key] for s in studies.values() if s and key in s.user_attrs]
        distinct = list(dict.fromkeys(values)) or [getattr(command, key)]
        out[key] = distinct[0] if len(distinct) == 1 else " / ".join(map(str, distinct))
    return out


def _own_time(trial, states) -> float | None:
    """Seconds ``trial`` ran, for a trial that ended itself (complete, pruned, errored);
    ``None`` for a stale or interrupted one: its end is when another worker marked it failed,
    and its retry counts its own time."""
    if trial.state not in states and ERROR_ATTR not in trial.user_attrs:
        return None
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def best_trial(study):
    """The best COMPLETE trial (``None`` when there is none)."""
    optuna = optuna_or_exit()
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.value is not None
    ]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def search_summary(studies: dict, spaces: dict[str, list[SpaceEntry]], n_trials: int) -> list:
    """One dict per loss: status, counts, times, best value and parameters. A study's status
    is judged against the budget it records (``n_trials`` for a study that records none).
    Trial time counts the trials that ended themselves (a stale trial's dead time is not
    counted; its retry counts its own); wall time spans every trial."""
    optuna = optuna_or_exit()
    S = optuna.trial.TrialState
    rows: list[dict[str, Any]] = []
    for loss, space in spaces.items():
        study = studies.get(loss)
        if not space:
            rows.append(dict(loss=loss, status="no space: paper defaults", params={}))
            continue
        if study is None:
            rows.append(dict(loss=loss, status="not started", params={}))
            continue
        c = counts(study)
        budget = study.user_attrs.get("n_trials", n_trials)
        trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]
        timed = [t for t in trials if t.datetime_start and t.datetime_complete]
        done = [t for t in timed if t.state in (S.COMPLETE, S.PRUNED)]
        best = best_trial(study)
        if c["done"] >= budget and best is not None:
            status = "done"
        elif c["errors"] >= budget and best is None:
            status = "search failed (every trial errored)"
        elif best is None and c["done"]:
            status = "every trial pruned"
        else:
            status = f"incomplete ({c['done']}/{budget})"
        errors = sorted({t.user_attrs[ERROR_ATTR] for t in trials if ERROR_ATTR in t.user_attrs})
        own = [_own_time(t, (S.COMPLETE, S.PRUNED)) for t in timed]
        total = sum(x for x in own if x is not None)
        span = (
            (max(t.datetime_complete for t in timed) - min(t.datetime_start for t in timed))
            if timed
            else None
        )
        rows.append(
            dict(
                loss=loss,
                status=status,
                complete=c["complete"],
                pruned=c["pruned"],
                errors=c["errors"],
                other_failed=c["fail"] - c["errors"],
                best_value=None if best is None else best.value,
                best_number=None if best is None else best.number,
                params={} if best is None else dict(best.params),
                trial_time_s=total,
                time_per_trial_s=(
                    sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
                    / len(done)
                    if done
                    else None
                ),
                wall_s=None if span is None else span.total_seconds(),
                machines=sorted({t.user_attrs.get(MACHINE_ATTR, "?") for t in trials}),
                error_messages=errors,
            )
        )
    return rows


def _num(value, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def search_markdown(
    rows: list[dict],
    spaces: dict[str, list[SpaceEntry]],
    settings: dict,
    plots: dict[str, dict[str, str]],
    lr: float,
) -> str:
    """The search part of the report (a function of the trials: no time stamps)."""
    metric = metric_label(settings["primary_metric"])
    folds = settings["folds"]
    lines = [
        f"* budget: {settings['n_trials']} trials per loss (COMPLETE + PRUNED count; failed "
        "trials are retried), one study per loss",
        f"* sampler: Optuna TPE, seed {settings['seed']} (worker i: seed + 1000 i), "
        f"{settings['startup_trials']} random start-up trial(s); pruning: "
        + ("MedianPruner on the per-epoch validation metric" if settings["prune"] else "none"),
        f"* objective: best validation {metric} over epochs on held-out training classes "
        + (
            f"(mean over {folds} class-disjoint folds of all training classes)"
            if folds > 1
            else "(the benchmark's validation split)"
        )
        + f"; trial seed {settings['trial_seed']}; the test classes are never used in a trial",
        f"* machine(s): {'; '.join(sorted({m for r in rows for m in r.get('machines', [])}))}",
        "",
        f"| loss | status | complete | pruned | errored | stale/interrupted | best val {metric} "
        "| best trial | trial time (s) | time/trial (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['status']} | {r.get('complete', 0)} | {r.get('pruned', 0)} | "
            f"{r.get('errors', 0)} | {r.get('other_failed', 0)} | "
            f"{_num(r.get('best_value'), '.4f')} | {_num(r.get('best_number'), 'd')} | "
            f"{_num(r.get('trial_time_s'))} | {_num(r.get('time_per_trial_s'))} | "
            f"{_num(r.get('wall_s'))} |"
        )
    total = sum(r.get("trial_time_s") or 0 for r in rows)
    lines += ["", f"Total trial time: {total:.0f} s.", "", "### Best hyper-parameters", ""]
    lines += ["| loss | best trial's hyper-parameters |", "|---|---|"]
    for r in rows:
        lines.append(f"| {r['loss']} | {fmt_params(r['params'], lr)} |")
    errors = [(r["loss"], m) for r in rows for m in r.get("error_messages", [])]
    if errors:
        lines += ["", "### Errors", ""] + [f"* {loss}: `{m}`" for loss, m in errors]
    lines += ["", "### Search spaces", ""]
    for loss, entries in spaces.items():
        desc = "; ".join(e.describe() for e in entries) or "no space"
        lines.append(f"* {loss}: {desc}")
    if plots:
        lines += ["", "### Optuna plots", ""]
        few = [r for r in rows if 0 < r.get("complete", 0) < MIN_IMPORTANCE_TRIALS]
        if few:
            lines += [
                "Parameter importances are drawn from "
                f"{MIN_IMPORTANCE_TRIALS} complete trials on (fewer give noise), not for: "
                + ", ".join(f"{r['loss']} ({r['complete']})" for r in few)
                + ".",
                "",
            ]
        for loss, files in plots.items():
            for kind, rel in files.items():
                lines.append(f"![{loss} {kind}]({rel})")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_plots(studies: dict, folder: Path) -> dict[str, dict[str, str]]:
    """Optuna's matplotlib optimisation history and parameter importances (for a study with at
    least :data:`MIN_IMPORTANCE_TRIALS` complete trials) per loss (PNG); returns
    ``{loss: {kind: path relative to folder's parent}}``."""
    optuna = optuna_or_exit()
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, str]] = {}
    S = optuna.trial.TrialState
    for loss, study in studies.items():
        if study is None:
            continue
        complete = study.get_trials(deepcopy=False, states=(S.COMPLETE,))
        if not complete:
            continue
        files = {}
        for kind, draw in (
            ("history", lambda s: ovm.plot_optimization_history(s)),
            (
                "importances",
                lambda s: ovm.plot_param_importances(
                    s, evaluator=FanovaImportanceEvaluator(seed=0)
                ),
            ),
        ):
            if kind == "importances" and len(complete) < MIN_IMPORTANCE_TRIALS:
                continue
            try:
                ax = draw(study)
            except (ValueError, RuntimeError):  # e.g. too few distinct trials for importances
                continue
            for loc in ("left", "center"):  # Optuna's title (left-aligned in recent versions)
                if ax.get_title(loc=loc):
                    ax.set_title(f"{loss}: {ax.get_title(loc=loc)}", loc=loc)
            if kind == "history":
                from matplotlib.ticker import MaxNLocator

                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            path = folder / f"{loss}_{kind}.png"
            figure = ax.figure
            assert isinstance(figure, Figure)  # Optuna draws on a figure of its own
            figure.set_size_inches(7, 4.5)
            figure.tight_layout()
            figure.savefig(path, dpi=90)
            plt.close(figure)
            files[kind] = f"{folder.name}/{path.name}"
        out[loss] = files
    return out


def results_table(results: list[dict], losses: list[str]) -> tuple[pd.DataFrame, str]:
    """(summary DataFrame, Markdown display table) of reproduction runs."""
    runs = bench_report.runs_table(results)
    summary = bench_report.summary_table(runs, [n for n in losses if n in set(runs["loss"])])
    return summary, bench_report.to_markdown(bench_report.display_table(summary))


def best_settings(
    config: BenchmarkConfig, rows: list[dict], results: list[dict], folds: int, output: Path
) -> str:
    """The "Settings to paste" section of ``tune_report.md``: for each loss whose search is done
    (or that has no space), the winning trial's settings as code
    (:mod:`~pml_proxies.benchmark.snippets`, built from the run spec its re-runs use), and
    ``best_params.json`` in ``output``, each loss's record holding the winning trial's
    validation value and, when the best trials were re-run (``results``: the ``tuned/`` runs),
    their mean test value. ``""`` (and no file) when no loss has settings."""
    from ..snippets import best_params_record, loss_settings, snippets_markdown
    from ..store import RunStore, write_best_params
    from .trial import load_data, trial_spec

    chosen = [r for r in rows if r["status"] == "done" or r["status"].startswith("no space")]
    if not chosen:
        return ""
    num_classes = load_data(config).train.num_classes
    primary = config.primary_metric
    label = metric_label(primary)
    settings, achieved, records = [], {}, []
    for r in chosen:
        loss = r["loss"]
        s = loss_settings(trial_spec(config, loss, r["params"], config.seeds[0]), num_classes)
        metrics: list[dict[str, Any]] = []
        text = []
        if r.get("best_value") is not None:
            where = f"mean over {folds} folds" if folds > 1 else "held-out training classes"
            metrics.append({"name": primary, "split": "validation", "value": r["best_value"],
                            "trial": r["best_number"], "folds": folds})  # fmt: skip
            text.append(
                f"Best trial {r['best_number']}: validation {label} {100 * r['best_value']:.1f} "
                f"({where})."
            )
        else:
            text.append("Not searched (no space): the paper defaults.")
        tested = [x for x in results if x["loss"] == loss and x.get("test")]
        if tested:
            value = sum(x["test"][primary] for x in tested) / len(tested)
            seeds = sorted(int(x["seed"]) for x in tested)
            metrics.append({"name": primary, "split": "test", "value": value, "seeds": seeds,
                            "runs": "tuned/"})  # fmt: skip
            text.append(
                f"Re-run with seed(s) {', '.join(map(str, seeds))}: test {label} "
                f"{100 * value:.1f} (mean)."
            )
        settings.append(s)
        achieved[loss] = " ".join(text)
        records.append(best_params_record(s, metrics, searched=list(r["params"])))
    write_best_params(RunStore(output).file("best_params_json"), records)
    return "## Settings to paste (best trial per loss)\n\n" + snippets_markdown(settings, achieved)
