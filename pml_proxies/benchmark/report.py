"""Tables (CSV, Markdown) and PNG plots of a finished benchmark."""

from __future__ import annotations

import math

import pandas as pd

from .metrics import metric_label, metric_order
from .plots import plot_embedding_maps, plot_metric_bars, plot_training_curves  # noqa: F401
from .stats import mean_confidence_interval


def runs_table(results: list[dict]) -> pd.DataFrame:
    """One row per (loss, seed): test metrics, selected epoch, training time."""
    rows = []
    for r in results:
        row = {
            "loss": r["loss"],
            "seed": r["seed"],
            "best_epoch": r["best_epoch"],
            "train_time_s": round(r["train_time_s"], 2),
        }
        row.update(r["test"])
        rows.append(row)
    df = pd.DataFrame(rows)
    metrics = metric_order({m for r in results for m in r["test"]})
    return df[["loss", "seed", "best_epoch", "train_time_s", *metrics]]


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


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no ``tabulate`` dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in row.tolist()) + " |")
    return "\n".join(lines)
