"""Tables (CSV, Markdown), the self-explaining ``report.md`` and the plots of a benchmark."""

from __future__ import annotations

import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .config import DEFAULT_EQUIVALENCE_MARGIN, DEFAULT_SEEDS, config_record  # noqa: F401
from .data import data_notes
from .metrics import metric_label, metric_order
from .plots import plot_embedding_maps, plot_metric_bars, plot_training_curves  # noqa: F401
from .stats import (
    holm,
    mean_confidence_interval,
    paired_difference,
    paired_differences,
    paired_t_tests,
    seeds_needed,
    verdict,
)
from .store import (
    CATEGORY_FILE,
    COMPARISON_FILE,
    CONFIG_FILE,
    PROTOCOL_FILE,
    REPORT_FILES,
    RUN_FILES,
    RunInfo,
    RunStore,
    write_best_params,
)

if TYPE_CHECKING:
    from .config import BenchmarkConfig
    from .data import BenchmarkData
    from .spec import RunSpec

#: fewer validation classes than this: model selection is noisy (a report caveat)
MIN_VAL_CLASSES = 5


def runs_table(results: list[dict]) -> pd.DataFrame:
    """One row per (loss, seed): test metrics, selected epoch, training time."""
    rows = [_run_row(r, r["test"]) for r in results]
    return _ordered(pd.DataFrame(rows), ["loss", "seed"], [r["test"] for r in results])


def category_runs_table(results: list[dict]) -> pd.DataFrame | None:
    """One row per (loss, seed, category): :func:`runs_table`'s columns and ``category`` (after
    ``seed``), the metrics of that category's queries (``test_by_category``); ``None`` when no
    run has per-category metrics."""
    rows, tests = [], []
    for r in results:
        for category, metrics in sorted(r.get("test_by_category", {}).items()):
            rows.append({**_run_row(r, metrics), "category": category})
            tests.append(metrics)
    if not rows:
        return None
    return _ordered(pd.DataFrame(rows), ["loss", "seed", "category"], tests)


def _run_row(result: dict, metrics: dict[str, float]) -> dict:
    row = {
        "loss": result["loss"],
        "seed": result["seed"],
        "best_epoch": result["best_epoch"],
        "train_time_s": round(result["train_time_s"], 2),
    }
    row.update(metrics)
    return row


def _ordered(df: pd.DataFrame, keys: list[str], tests: list[dict]) -> pd.DataFrame:
    metrics = metric_order({m for test in tests for m in test})
    return df[[*keys, "best_epoch", "train_time_s", *metrics]]


def summary_table(runs: pd.DataFrame, loss_order: list[str], confidence: float = 0.95):
    """Per loss: number of seeds, and for each metric its mean and CI half width
    (columns ``<metric>_mean``, ``<metric>_ci95``), in ``loss_order``."""
    metrics = [c for c in runs.columns if c not in ("loss", "seed", "best_epoch", "train_time_s")]
    rows = []
    for loss in [n for n in loss_order if n in set(runs["loss"])]:
        sub = runs[runs["loss"] == loss]
        row = {
            "loss": loss,
            "seeds": len(sub),
            "train_time_s": round(sub["train_time_s"].mean(), 2),
        }
        for m in metrics:
            mean, half, _, _ = mean_confidence_interval(sub[m].to_numpy(), confidence)
            row[f"{m}_mean"] = mean
            row[f"{m}_ci95"] = half
        rows.append(row)
    return pd.DataFrame(rows)


#: the loss every other loss is compared with, seed by seed, when it is among the run's losses
BASELINE = "proxy_anchor"


def comparison_metrics(primary: str, runs: pd.DataFrame) -> list[str]:
    """The metrics of the paired comparison: the primary (model-selection) metric, then P@1."""
    return [m for m in dict.fromkeys([primary, "precision_at_1"]) if m in runs.columns]


def comparison_table(
    runs: pd.DataFrame,
    loss_order: list[str],
    metrics: list[str],
    baseline: str = BASELINE,
    confidence: float = 0.95,
    margin: float = DEFAULT_EQUIVALENCE_MARGIN,
) -> pd.DataFrame:
    """Per loss other than ``baseline``: the seed-paired difference to ``baseline`` of each of
    ``metrics`` (columns ``<metric>_diff``, ``<metric>_ci95``: mean and t-interval half width,
    raw metric units) and the tests and verdict on ``metrics[0]``. Empty when ``baseline`` was
    not run.

    The tests (:func:`~pml_proxies.benchmark.stats.paired_t_tests`, level ``alpha = 1 -
    confidence``): ``p_difference`` (two-sided paired t-test of "no difference") and
    ``p_equivalence`` (TOST of "differs by ``margin`` or more"; ``margin`` in the report's
    units, metric x100: 1.0 is one MAP@R point), and their adjusted values ``*_holm``: one Holm
    family of the ``2 m`` hypotheses of the ``m`` tested losses; a loss's two hypotheses cannot
    both be true, so the step-down multiplier counts losses, not hypotheses
    (:func:`~pml_proxies.benchmark.stats.holm` with groups): the family-wise error rate of every
    "better", "worse" and "equivalent" of the table together is at most ``alpha``. The verdict
    (:func:`~pml_proxies.benchmark.stats.verdict`) follows from the adjusted p-values.
    ``seeds_for_difference`` / ``seeds_for_equivalence``: the seeds a test at level ``alpha / m``
    (Holm's first step) would need for 80% power at the observed mean and SD of the differences
    (:func:`~pml_proxies.benchmark.stats.seeds_needed`). ``equivalence_margin``: ``margin``."""
    tests = ["p_difference", "p_difference_holm", "p_equivalence", "p_equivalence_holm",
             "seeds_for_difference", "seeds_for_equivalence", "equivalence_margin"]  # fmt: skip
    columns = ["loss", "paired_seeds", *[f"{m}_{k}" for m in metrics for k in ("diff", "ci95")]]
    columns += [*tests, "verdict"]
    if baseline not in set(runs["loss"]):
        return pd.DataFrame(columns=columns)
    alpha, raw_margin = 1.0 - confidence, margin / 100.0
    base = runs[runs["loss"] == baseline].set_index("seed")
    rows, spreads = [], []
    for loss in [n for n in loss_order if n in set(runs["loss"]) and n != baseline]:
        sub = runs[runs["loss"] == loss].set_index("seed")
        row: dict[str, Any] = {"loss": loss}
        for m in metrics:
            mean, half, n = paired_difference(sub[m].to_dict(), base[m].to_dict(), confidence)
            row.setdefault("paired_seeds", n)  # of the first metric, the tested one
            row.update({f"{m}_diff": mean, f"{m}_ci95": half})
        diffs = paired_differences(sub[metrics[0]].to_dict(), base[metrics[0]].to_dict())
        row["p_difference"], row["p_equivalence"] = paired_t_tests(diffs, raw_margin)
        spreads.append(float(diffs.std(ddof=1)) if diffs.size > 1 else math.nan)
        rows.append(row)
    table = pd.DataFrame(rows, columns=columns)
    if table.empty:
        return table
    n_rows = len(table)
    adjusted = holm([*table["p_difference"], *table["p_equivalence"]], [*table["loss"]] * 2)
    table["p_difference_holm"], table["p_equivalence_holm"] = adjusted[:n_rows], adjusted[n_rows:]
    level = alpha / max(1, int(table["p_difference"].notna().sum()))
    mean = table[f"{metrics[0]}_diff"].to_numpy(dtype=np.float64)
    table["seeds_for_difference"] = [seeds_needed(abs(d), s, level) for d, s in zip(mean, spreads)]
    table["seeds_for_equivalence"] = [
        seeds_needed(raw_margin - abs(d), s, level, sides=1) for d, s in zip(mean, spreads)
    ]
    table["equivalence_margin"] = margin
    table["verdict"] = [
        verdict(d, p, q, f"{margin:g}", alpha)
        for d, p, q in zip(mean, table["p_difference_holm"], table["p_equivalence_holm"])
    ]
    return table


#: what the report says of reproducibility
REPRODUCIBILITY = (
    "runs are bit-reproducible on one machine only (on another CPU model, or under another torch "
    "kernel choice such as `ATEN_CPU_CAPABILITY`, float rounding differs, training amplifies it, "
    "and every number moves by about the spread between seeds)"
)


def comparison_markdown(table: pd.DataFrame, metrics: list[str], baseline: str = BASELINE) -> str:
    """The paired comparison as a Markdown table with the sentences saying how to read it."""
    if table.empty:
        return f"(not computed: {baseline} was not run)"
    label = metric_label(metrics[0])
    margin = float(table["equivalence_margin"].iloc[0])
    out = pd.DataFrame({"loss": table["loss"], "paired seeds": table["paired_seeds"]})
    for m in metrics:  # the tested metric's p-values beside its interval
        out[f"{metric_label(m)} - {baseline}"] = [
            _fmt_signed(a, b) for a, b in zip(table[f"{m}_diff"], table[f"{m}_ci95"])
        ]
        if m == metrics[0]:
            out["Holm p (difference)"] = table["p_difference_holm"].map(_fmt_p)
            out[f"Holm p (equivalence ±{margin:g})"] = table["p_equivalence_holm"].map(_fmt_p)
    out[f"{label} verdict"] = [
        v if v != "inconclusive" else f"inconclusive ({_seeds_text(a, b, margin)})"
        for v, a, b in zip(
            table["verdict"], table["seeds_for_difference"], table["seeds_for_equivalence"]
        )
    ]
    tested = int(table["p_difference"].notna().sum())
    tests = (
        f"Tests on {label} (paired t-tests over the seeds, 5% family-wise error rate): "
        f'"better" / "worse": the difference from {baseline} is significant; "equivalent '
        f'within ±{margin:g}": both one-sided tests (TOST) show that it lies within '
        f'±{margin:g} {label} point(s) (`--equivalence-margin`); "inconclusive": neither, '
        "with the seeds a test would need to decide at the observed mean and spread (80% "
        f"power at level 0.05/{tested}, t approximation; a rough guide). The p-values are "
        f"Holm-adjusted over the {2 * tested} tests of the {tested} loss(es) (a loss cannot be "
        "both equal to and farther than the margin from the baseline, so the step-down counts "
        "losses: Shaffer's constrained Holm test)."
        if tested
        else "No test: a difference needs two paired seeds or more."
    )
    untested = ", ".join(metric_label(m) for m in metrics[1:])
    return "\n".join(
        [
            f"Each loss minus {baseline} on the same seeds (a seed fixes the initial network and "
            f"the batches), x100, mean ± 95% t-interval half width over the seeds. {tests}"
            + (f" {untested}: the intervals only, untested." if untested else ""),
            "",
            to_markdown(out),
            "",
            "A verdict is claimed only when the adjusted tests reject, so that float rounding does "
            "not decide it: runs are bit-reproducible on one machine only, and on another the "
            "numbers move by about the spread between seeds." + _few_seeds_note(table),
        ]
    )


def _few_seeds_note(table: pd.DataFrame) -> str:
    """A warning when the comparison has fewer paired seeds than the default (``''`` else)."""
    fewest = int(table["paired_seeds"].min())
    if not 2 <= fewest < len(DEFAULT_SEEDS):
        return ""
    return (
        f" With {fewest} seeds (the default is {len(DEFAULT_SEEDS)}), a verdict whose adjusted "
        "p-value is near 0.05 can be 'inconclusive' on another machine: on the bundled "
        "Omniglot's default protocol, 2 of 10 verdicts did so at 5 seeds, none at 10."
    )


def write_comparison(
    config: BenchmarkConfig, runs: pd.DataFrame, loss_order: list[str], path: Path
) -> str:
    """Compare every loss of ``runs`` with :data:`BASELINE` (:func:`comparison_table` on
    :func:`comparison_metrics`, ``config.equivalence_margin``), write the table to ``path``
    (CSV) and return its Markdown; without the baseline, ``""`` (and no file at ``path``: a stale
    one is removed)."""
    metrics = comparison_metrics(config.primary_metric, runs)
    table = comparison_table(runs, loss_order, metrics, margin=config.equivalence_margin)
    if table.empty:
        Path(path).unlink(missing_ok=True)
        return ""
    table.to_csv(path, index=False)
    return comparison_markdown(table, metrics)


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _seeds_text(difference: float, equivalence: float, margin: float) -> str:
    """How many seeds would decide, e.g. ``"difference: ~12 seeds; equivalence: ~7 seeds"``."""

    def one(n: float, never: str) -> str:
        if math.isnan(n):
            return "-"
        return f"never ({never})" if math.isinf(n) else f"~{int(n)} seeds"

    return (
        f"difference: {one(difference, 'mean 0')}; "
        f"equivalence: {one(equivalence, f'mean beyond ±{margin:g}')}"
    )


def _fmt_signed(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "-"
    value = 100 * mean if abs(100 * mean) >= 0.05 else 0.0  # no "-0.0"
    if math.isnan(half):
        return f"{value:+.1f}"
    return f"{value:+.1f} ± {100 * half:.1f}"


def _fmt(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(half):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Human table: metrics x100 as ``mean ± 95% CI half width``."""
    metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    out = pd.DataFrame({"loss": summary["loss"], "seeds": summary["seeds"]})
    for m in metrics:
        out[metric_label(m)] = [
            _fmt(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_ci95"])
        ]
    out["time/run (s)"] = summary["train_time_s"].map(lambda t: f"{t:.1f}")
    return out


def category_markdown(by_category: pd.DataFrame, loss_order: list[str]) -> str:
    """One table per category (sorted) of :func:`category_runs_table`'s rows, as the test
    results' table (:func:`summary_table`, :func:`display_table`)."""
    sections = []
    for category in sorted(set(by_category["category"])):
        runs = by_category[by_category["category"] == category].drop(columns="category")
        table = to_markdown(display_table(summary_table(runs, loss_order)))
        sections += [f"### {category}", "", table, ""]
    return "\n".join(sections).rstrip("\n")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no ``tabulate`` dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in row.tolist()) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ report.md
def versions() -> dict[str, str]:
    """Versions of this package, torch, PML, faiss, numpy and Python."""
    import numpy
    import pytorch_metric_learning
    import torch

    from .. import __version__

    out = {
        "pml-proxies": __version__,
        "torch": torch.__version__,
        "pytorch-metric-learning": pytorch_metric_learning.__version__,
    }
    try:
        import faiss

        out["faiss"] = getattr(faiss, "__version__", "unknown")
    except ImportError:
        out["faiss"] = "not installed"
    out["numpy"] = numpy.__version__
    out["python"] = platform.python_version()
    return out


def git_commit() -> str | None:
    """The git commit of the checkout this package runs from (``+ local changes`` when the
    work tree differs), or ``None`` outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + (" + local changes" if dirty else "")


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    import os

    # torch's kernel choice (ATEN_CPU_CAPABILITY) decides the rounding: part of what a run is
    kernels = torch.backends.cpu.get_cpu_capability()
    machine = platform.processor() or platform.machine()
    return f"cpu ({os.cpu_count()} logical cores; {machine}; torch kernels: {kernels})"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def dataset_argument(config: BenchmarkConfig) -> str:
    """The data set as the command gave it: ``--dataset NAME`` with its ``--dataset-arg`` and
    ``--root`` options (the loader's name alone would misname a user's own folder)."""
    parts = [f"--dataset {shlex.quote(config.dataset)}"]
    parts += [f"--dataset-arg {shlex.quote(f'{k}={v}')}" for k, v in config.dataset_kwargs.items()]
    if config.root is not None:
        parts.append(f"--root {shlex.quote(str(config.root))}")
    return " ".join(parts)


def report_title(config: BenchmarkConfig, kind: str = "Benchmark report") -> str:
    """The report's title: ``kind`` and the data set as given (:func:`dataset_argument`),
    after the file or folder name of a user's own data."""
    if config.is_user_data:
        name = Path(config.dataset.partition(":")[2]).expanduser().name
        return f"{kind}: {name} ({dataset_argument(config)})"
    return f"{kind} ({dataset_argument(config)})"


def protocol_sentences(
    config: BenchmarkConfig, data: BenchmarkData, spec: RunSpec, results: list[dict]
) -> list[str]:
    """The protocol in plain sentences, with the values actually used."""
    geometry = sorted({(r["batch_size"], r["m_per_class"]) for r in results})
    batches = ", ".join(f"{b} images ({b // m} classes x {m} images)" for b, m in geometry)
    t = spec.trunk
    lines = [
        f"Data set (`{dataset_argument(config)}`): the model trains on {len(data.train)} images of "
        f"{data.train.num_classes} training classes; {len(data.val)} images of "
        f"{data.val.num_classes} other training-split classes are held out for model selection "
        f"(validation); the test set has {len(data.test)} images of {data.test.num_classes} "
        "classes never seen in training.",
        f"Network: the `{t.name}` trunk ({'ImageNet-pretrained' if t.pretrained else 'trained from scratch'}), "
        f"`{config.pooling}` pooling and a linear embedder to {config.embedding_size} dimensions; "
        f"images of {spec.image_size} x {spec.image_size} pixels with {spec.channels} "
        f"channel(s); embeddings are L2-normalised for retrieval.",
        f"Training: {config.epochs} epochs of {config.iterations_per_epoch} iterations; each batch "
        f"holds {batches} drawn by PML's MPerClassSampler; the same batches and the same "
        "initial network for every loss of a seed.",
        f"Optimiser: {config.optimizer} with learning rate {t.lr:g} for the trunk and the "
        f"embedder and {t.lr * spec.proxy_lr_mult:g} ({spec.proxy_lr_mult:g} x) for the loss "
        f"parameters (proxies), weight decay {config.weight_decay:g}"
        + (
            f"; the learning rate is multiplied by {config.lr_decay_gamma:g} every "
            f"{config.lr_decay_epochs} epochs"
            if config.lr_decay_epochs > 0
            else "; constant learning rate"
        )
        + (
            f"; gradients clipped to norm {config.grad_clip:g}"
            if config.grad_clip > 0
            else "; no gradient clipping"
        )  # fmt: skip
        + (
            f"; the trunk is frozen for the first {t.warmup_epochs} epoch(s)"
            if t.warmup_epochs > 0
            else ""
        )
        + f"; BatchNorm frozen: {_yes_no(t.freeze_bn)}.",
    ]
    if len(data.val) > 0:
        lines.append(
            f"Model selection: after every {config.eval_every} epoch(s) (and the last) the "
            f"validation {metric_label(config.primary_metric)} is computed; each run's test "
            "metrics are those of its best validation epoch."
        )
    else:
        lines.append(
            "Model selection: none (no validation classes); test metrics of the last epoch."
        )
    seeds = ", ".join(str(s) for s in config.seeds)
    lines.append(
        f"Statistics: seeds {seeds}; tables show the mean over seeds and the half width of the "
        "95% Student-t confidence interval, metrics x100; retrieval is leave-one-out on the test "
        f"set (PML's AccuracyCalculator convention); {REPRODUCIBILITY}."
    )
    return lines


#: a loss whose training loss is at least this many times the others' gets a caveat
LOSS_RATIO_CAVEAT = 10.0


def loss_value_ratio(results: list[dict], loss: str) -> tuple[float, int] | None:
    """The largest ratio, over the epochs, of ``loss``'s training loss to the median of the
    other losses' (each the mean over seeds of the epoch's mean training loss recorded in the
    runs' ``history``, absolute values), and its epoch; ``None`` without ``loss``, another loss
    or a recorded training loss."""
    per_epoch: dict[tuple[str, int], list[float]] = {}
    for r in results:
        for row in r.get("history") or []:
            value = row.get("train_loss")
            if isinstance(value, (int, float)) and math.isfinite(value):
                per_epoch.setdefault((r["loss"], int(row["epoch"])), []).append(abs(value))
    best = None
    for epoch in sorted({e for n, e in per_epoch if n == loss}):
        others = [float(np.mean(v)) for (n, e), v in per_epoch.items() if e == epoch and n != loss]
        median = float(np.median(others)) if others else 0.0
        if median > 0:
            ratio = float(np.mean(per_epoch[loss, epoch])) / median
            if best is None or ratio > best[0]:
                best = (ratio, epoch)
    return best


def chance_precision(labels) -> float:
    """The precision of a random ranking on a leave-one-out set with these labels: the chance
    that another sample shares a random query's class, ``sum_c n_c (n_c - 1) / (N (N - 1))``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64)).astype(np.float64)
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1))) if n > 1 else math.nan


def validation_gap(config: BenchmarkConfig, data: BenchmarkData, results: list[dict]) -> str | None:
    """The caveat explaining a validation score above the test score by the sizes of the two
    sets (computed from the runs' selected validation scores and the splits' class counts), or
    ``None`` when validation is not above test or the validation set is not the smaller."""
    primary = config.primary_metric
    val = [r["best_val_score"] for r in results if r.get("best_val_score") is not None]
    test = [r["test"][primary] for r in results if (r.get("test") or {}).get(primary) is not None]
    if not val or not test or len(data.val) < 2 or len(data.test) < 2:
        return None
    val_mean, test_mean = float(np.mean(val)), float(np.mean(test))
    if val_mean <= test_mean or data.val.num_classes >= data.test.num_classes:
        return None
    label = metric_label(primary)
    return (
        f"Validation {label} (mean of the runs' selected epochs, {100 * val_mean:.1f}) is above "
        f"test {label} ({100 * test_mean:.1f}), as the sizes of the two sets lead one to expect: "
        f"{data.val.num_classes} classes ({len(data.val)} images) against "
        f"{data.test.num_classes} ({len(data.test)} images) on test. A retrieval score falls as "
        "the gallery holds more classes, since every query then has more images of other classes "
        "that can outrank its own: a random ranking's precision is "
        f"{100 * chance_precision(data.val.labels):.2f}% on the validation set and "
        f"{100 * chance_precision(data.test.labels):.2f}% on the test set. The validation score "
        "is also the best of the validated epochs (an upward-biased pick). Compare validation "
        "scores only with each other; they select the epoch."
    )


def caveats(
    config: BenchmarkConfig, data: BenchmarkData, results: list[dict], summary: pd.DataFrame
) -> list[str]:
    """Warnings computed from the run (each a sentence)."""
    out = []
    expected = len(config.losses) * len(config.seeds)
    if len(results) < expected:
        done = {(r["loss"], r["seed"]) for r in results}
        missing = [
            f"{n} seed {s}" for n in config.losses for s in config.seeds if (n, s) not in done
        ]
        out.append(
            f"Only {len(results)} of the {expected} runs are finished (missing: "
            f"{', '.join(missing)}): the tables cover the finished runs only."
        )
    if 0 < data.val.num_classes < MIN_VAL_CLASSES:
        out.append(
            f"Only {data.val.num_classes} validation classes (fewer than {MIN_VAL_CLASSES}): "
            "model selection is noisy."
        )
    if len(data.val) == 0:
        out.append("No validation classes: the last epoch is reported, nothing was selected.")
    first_validated = min(config.eval_every, config.epochs)
    by_loss: dict[str, list[int]] = {}
    for r in results:
        by_loss.setdefault(r["loss"], []).append(int(r["best_epoch"]))
    early = [
        n for n, eps in by_loss.items() if sum(e == first_validated for e in eps) * 2 > len(eps)
    ]
    if len(data.val) > 0 and len(early) * 2 > len(by_loss):
        out.append(
            f"The best validation epoch is the first validated one (epoch {first_validated}) "
            f"for most losses ({', '.join(early)}): the budget overfits or the learning rate "
            "is too high; later epochs only got worse on the validation classes."
        )
    late = [n for n, eps in by_loss.items() if sum(e == config.epochs for e in eps) * 2 > len(eps)]
    if len(data.val) > 0 and config.epochs > 1 and len(late) * 2 > len(by_loss):
        out.append(
            f"The best validation epoch is the last one (epoch {config.epochs}) for most losses "
            f"({', '.join(late)}): they were still improving, a longer budget would likely score "
            "higher and could rank them differently."
        )
    seeds = summary["seeds"].min() if len(summary) else 0
    if seeds <= 1:
        out.append(
            "A single seed: no confidence interval, differences between losses are not tested."
        )
    else:
        primary = config.primary_metric
        mean, half = summary[f"{primary}_mean"].to_numpy(), summary[f"{primary}_ci95"].to_numpy()
        if len(mean) > 1:
            best = int(mean.argmax())
            overlap = [
                summary["loss"].iloc[i]
                for i in range(len(mean))
                if i != best and mean[i] + half[i] >= mean[best] - half[best]
            ]
            if overlap:
                out.append(
                    f"The 95% intervals of test {metric_label(primary)} of "
                    f"{summary['loss'].iloc[best]} (the highest mean) and of "
                    f"{', '.join(overlap)} overlap: this run supports no ranking among them."
                )
    ratio = loss_value_ratio(results, "proxy_isa")
    if ratio is not None and ratio[0] >= LOSS_RATIO_CAVEAT:
        out.append(
            f"Proxy-ISA's training loss is {ratio[0]:.0f} times the median of the other losses' "
            f"in epoch {ratio[1]} (the largest ratio of this run's per-epoch training losses, "
            "mean over seeds): its eq. 13 divides the negative term by the mean negative weight "
            "(about 1/E_c before the memory starts). This is the paper's loss, not a bug; compare "
            "losses by their retrieval metrics, not by their loss values."
        )
    gap = validation_gap(config, data, results)
    if gap is not None:
        out.append(gap)
    return out


def selected_epochs_table(specs: list[RunSpec], results: list[dict], config: BenchmarkConfig):
    """Per loss: the selected (best validation) epoch of each seed."""
    by = {(r["loss"], r["seed"]): r for r in results}
    losses = list(dict.fromkeys(s.loss for s in specs))
    rows = []
    for loss in losses:
        row: dict[str, Any] = {"loss": loss}
        for seed in config.seeds:
            r = by.get((loss, seed))
            row[f"seed {seed}"] = "-" if r is None else f"{r['best_epoch']} / {config.epochs}"
        rows.append(row)
    return pd.DataFrame(rows)


def hyper_parameter_lines(specs: list[RunSpec]) -> list[str]:
    lines = ["| loss | hyper-parameters used | source |", "|---|---|---|"]
    seen = set()
    for spec in specs:
        if spec.loss in seen:
            continue
        seen.add(spec.loss)
        kw = ", ".join(f"{k}={v!r}" for k, v in spec.effective_loss_kwargs.items())
        lines.append(f"| {spec.loss} | {kw or 'class defaults'} | {spec.source} |")
    return lines


# ------------------------------------------------------------------ settings to paste
def settings_to_paste(
    config: BenchmarkConfig, data: BenchmarkData, specs: list[RunSpec], results: list[dict]
) -> tuple[str, list[dict]]:
    """``(markdown, records)``: the "Settings to paste" section (per loss with a finished run,
    its constructor call and ``create_loss`` form, :mod:`.snippets`) and the records of
    ``best_params.json`` (the test primary metric: mean over the finished seeds)."""
    from .snippets import best_params_record, loss_settings, snippets_markdown

    primary = config.primary_metric
    label = metric_label(primary)
    done: dict[str, list[dict]] = {}
    for r in results:
        done.setdefault(r["loss"], []).append(r)
    firsts = {spec.loss: spec for spec in reversed(specs) if spec.loss in done}
    settings, achieved, records = [], {}, []
    for loss in dict.fromkeys(s.loss for s in specs):
        if loss not in firsts:
            continue
        s = loss_settings(firsts[loss], data.train.num_classes)
        runs = done[loss]
        value = float(np.mean([r["test"][primary] for r in runs]))
        seeds = sorted(int(r["seed"]) for r in runs)
        achieved[loss] = (
            f"Test {label} {100 * value:.1f} (mean over seed(s) {', '.join(map(str, seeds))})."
        )
        metric = {"name": primary, "split": "test", "value": value, "seeds": seeds}
        settings.append(s)
        records.append(best_params_record(s, [metric]))
    return snippets_markdown(settings, achieved), records


def world_sizes_text(results: list[dict]) -> str:
    """``"processes per run (world size, torchrun / --nproc-per-node): 2"`` from the runs'
    ``world_size`` (1 where a result predates it), each size with its runs' count when they
    differ."""
    sizes = [int(r.get("world_size", 1)) for r in results]
    counts = {n: sizes.count(n) for n in sorted(set(sizes))}
    text = ", ".join(str(n) if len(counts) == 1 else f"{n} ({c} runs)" for n, c in counts.items())
    return f"processes per run (world size, torchrun / --nproc-per-node): {text or 1}"


def report_markdown(
    config: BenchmarkConfig,
    data: BenchmarkData,
    specs: list[RunSpec],
    results: list[dict],
    summary: pd.DataFrame,
    table_md: str,
    files: dict[str, Path],
    output: RunStore | Path,
    info: RunInfo,
    comparison_md: str = "",
    category_md: str = "",
    settings_md: str = "",
) -> str:
    """``report.md``: command, environment, protocol, results (per category too with
    ``category_md``, :func:`category_markdown`), selected epochs, hyper-parameters (and the
    settings to paste, ``settings_md``), caveats, plots, files (paths relative to the output
    folder)."""
    env = versions()
    commit = git_commit()
    start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.start))
    train_s = sum(float(r["train_time_s"]) for r in results)
    command = config.command or "(called from Python: run_benchmark)"
    store = output if isinstance(output, RunStore) else RunStore(output)
    rel = {k: store.relative(v) for k, v in files.items()}
    env_lines = [
        f"* versions: {', '.join(f'{k} {v}' for k, v in env.items())}",
        f"* git commit: {commit or 'not run from a git checkout'}",
        f"* device: {device_description(config.device)}; torch CPU threads: "
        f"{info.threads} per run; runs trained at once (--jobs): {info.jobs}; "
        f"{world_sizes_text(results)}",
        f"* started {start}; this invocation took {info.total_s:.0f} s ({info.trained} run(s) "
        f"trained, {info.reused} finished run(s) reused); training time of all reported runs: "
        f"{train_s:.0f} s",
    ]
    trained_by = sorted({r["command"] for r in results if r.get("command")} - {command})
    if trained_by:
        env_lines.append("* the runs were trained by: " + "; ".join(f"`{c}`" for c in trained_by))
    if info.redone:
        env_lines.append(f"* damaged or unfinished runs trained again: {', '.join(info.redone)}")
    caveat_lines = [f"* {c}" for c in caveats(config, data, results, summary)] or [
        "* none triggered by this run"
    ]
    epochs_md = to_markdown(selected_epochs_table(specs, results, config))
    run_list = sorted({(r["loss"], r["seed"]) for r in results})
    file_lines = [f"* `{p}`" for p in sorted({*rel.values(), CONFIG_FILE, PROTOCOL_FILE})]
    run_folders = [f"`{store.relative(store.run(loss, seed).path)}/`" for loss, seed in run_list]
    file_lines += [
        f"* `{store.relative(store.run('<loss>', '<s>').path)}/`: "
        f"{', '.join(f'`{f}`' for f in RUN_FILES)} for each of the {len(run_list)} runs: "
        + ", ".join(run_folders)
    ]
    plots = [f"![{k}]({v})" for k, v in rel.items() if v.endswith(".png") and files[k].is_file()]
    return "\n".join(
        [
            f"# {report_title(config)}",
            "",
            *[f"{note}\n" for note in data_notes(config)],
            "Command, as typed:",
            "",
            "```",
            command,
            "```",
            "",
            *env_lines,
            "",
            "## Protocol",
            "",
            *[f"* {s}" for s in protocol_sentences(config, data, specs[0], results)],
            "",
            "## Test results (x100, mean ± 95% CI half width over seeds)",
            "",
            table_md,
            "",
            *(
                [
                    "## Test results per category (x100, mean ± 95% CI half width over seeds; "
                    "each category's queries against the whole gallery)",
                    "",
                    category_md,
                    "",
                ]
                if category_md
                else []
            ),
            *(
                [f"## Against {BASELINE} (seed-paired differences)", "", comparison_md, ""]
                if comparison_md
                else []
            ),  # fmt: skip
            "## Selected epochs (best validation epoch / epochs trained)",
            "",
            epochs_md,
            "",
            "## Loss hyper-parameters used",
            "",
            *hyper_parameter_lines(specs),
            "",
            *(["## Settings to paste", "", settings_md] if settings_md else []),
            "## Caveats",
            "",
            *caveat_lines,
            "",
            "## Plots",
            "",
            *(f"{p}\n" for p in plots),
            "## Files (relative to this folder)",
            "",
            *file_lines,
            "",
        ]
    )


def write_report(
    config: BenchmarkConfig,
    data: BenchmarkData,
    specs: list[RunSpec],
    results: list[dict],
    output: RunStore | Path,
    info: RunInfo,
) -> tuple[dict[str, Path], pd.DataFrame, pd.DataFrame]:
    """Write runs.csv, summary.csv, summary.md, the PNG plots and report.md (and
    runs_by_category.csv where the runs have per-category metrics) into the output
    folder ``output`` (:class:`~pml_proxies.benchmark.store.RunStore` or its path; the map
    data read from it); returns ``(files, runs, summary)`` (``files``: name -> path of every
    file written)."""
    store = output if isinstance(output, RunStore) else RunStore(output)
    runs = runs_table(results)
    loss_order = list(dict.fromkeys(s.loss for s in specs))
    summary = summary_table(runs, loss_order)
    table_md = to_markdown(display_table(summary))
    files = {name: store.file(name) for name in REPORT_FILES}
    runs.to_csv(files["runs_csv"], index=False)
    summary.to_csv(files["summary_csv"], index=False)
    files["summary_md"].write_text(table_md + "\n")
    comparison_md = write_comparison(config, runs, loss_order, store.path / COMPARISON_FILE)
    if comparison_md:
        files["comparison_csv"] = store.path / COMPARISON_FILE
    category_md = ""
    by_category = category_runs_table(results)
    if by_category is not None:
        files["category_csv"] = store.path / CATEGORY_FILE
        by_category.to_csv(files["category_csv"], index=False)
        category_md = category_markdown(by_category, loss_order)
    seeds_of: dict[str, list[int]] = {}  # each loss's seeds in the command's order
    for r in sorted(results, key=lambda r: config.seeds.index(r["seed"])):
        seeds_of.setdefault(r["loss"], []).append(r["seed"])
    _plot(plot_metric_bars, summary, files["metrics_png"])
    _plot(plot_training_curves, results, loss_order, config.primary_metric, files["curves_png"])
    _plot(
        plot_embedding_maps,
        lambda: store.map_data({loss: seeds_of[loss] for loss in loss_order}),
        files["map_png"],
        method=config.map_method,
    )
    settings_md, best_params = settings_to_paste(config, data, specs, results)
    write_best_params(files["best_params_json"], best_params)
    files["report_md"].write_text(
        report_markdown(
            config,
            data,
            specs,
            results,
            summary,
            table_md,
            files,
            store,
            info,
            comparison_md,
            category_md,
            settings_md,
        )
    )
    return files, runs, summary


def _plot(function, *args, **kwargs) -> None:
    """Draw one plot; a failing plot is reported and never loses the tables and the report. An
    argument given as a function without arguments is called here (read data: its failure is
    the plot's)."""
    try:
        function(*[a() if callable(a) else a for a in args], **kwargs)
    except Exception as e:  # noqa: BLE001
        print(f"note: {function.__name__} failed ({type(e).__name__}: {e})", file=sys.stderr)
