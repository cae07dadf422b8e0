"""Read powerful-benchmarker's Bayesian-optimisation reports into one pandas table.

A finished ``pml-proxies-mlrc ... --bayes_opt_iters N --reproductions R`` run writes, in its
experiment folder, ``report_MeanAggregator_*.yaml`` (the "separated" result: the mean over the
fold models of the 128-d embeddings) and ``report_ConcatenateEmbeddings_*.yaml`` (the
"concatenated" result: the fold models' embeddings concatenated, 512-d with 4 folds), each with the
mean and 95% confidence interval over the reproductions. ``pml-proxies-mlrc-report EXP [EXP ...]``
prints them side by side, one row per experiment (loss).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

METRICS = {
    "precision_at_1": "P@1",
    "r_precision": "RP",
    "mean_average_precision_at_r": "MAP@R",
}
EVAL_TYPES = {"MeanAggregator": "separated", "ConcatenateEmbeddings": "concatenated"}


def _metric_name(key: str) -> str | None:
    for metric, short in METRICS.items():
        if key == metric or key.startswith(metric + "_level"):
            return short
    return None


def read_report_rows(
    experiment_folder: str | os.PathLike[str], trained_status: str = "trained"
) -> list[dict[str, Any]]:
    """Long-format rows (experiment, embedding, metric, mean, ci_low, ci_high, ci_width)."""
    import yaml

    folder = Path(experiment_folder)
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("report_*.yaml")):
        eval_type = next((v for k, v in EVAL_TYPES.items() if path.name[7:].startswith(k)), None)
        if eval_type is None:
            continue
        report = yaml.safe_load(path.read_text()) or {}
        for key, stats in (report.get(trained_status) or {}).items():
            metric = _metric_name(str(key))
            if metric is None or not isinstance(stats, dict):
                continue
            low, high = stats.get("95%_confidence_interval", (None, None))
            rows.append(
                {
                    "experiment": folder.name,
                    "embedding": eval_type,
                    "metric": metric,
                    "mean": stats.get("mean"),
                    "ci_low": low,
                    "ci_high": high,
                    "ci_width": stats.get("95%_confidence_interval_width"),
                }
            )
    return rows


def read_reports(
    experiment_folders: Iterable[str | os.PathLike[str]],
    trained_status: str = "trained",
    long: bool = False,
) -> pd.DataFrame:
    """A pandas DataFrame comparing the experiments (one per loss) of several MLRC runs.

    Args:
        experiment_folders: the runs' folders (``<root_experiment_folder>/<experiment_name>``).
        trained_status: ``"trained"`` (default), ``"untrained_trunk"`` or
            ``"untrained_trunk_and_embedder"``.
        long: return the long format (one row per experiment, embedding and metric) instead of
            the wide table (rows: experiments; columns: (embedding, metric) means, in percent).

    Raises:
        ValueError: if a folder has no report (the run has not finished).
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for folder in experiment_folders:
        found = read_report_rows(folder, trained_status)
        if not found:
            raise ValueError(f"no report_*.yaml with {trained_status!r} results in {folder}")
        rows.extend(found)
    table = pd.DataFrame(rows)
    if long:
        return table
    wide = table.pivot_table(index="experiment", columns=["embedding", "metric"], values="mean")
    order = [
        (e, m) for e in EVAL_TYPES.values() for m in METRICS.values() if (e, m) in wide.columns
    ]
    return (wide[order] * 100).round(2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pml-proxies-mlrc-report",
        description="Compare finished MLRC runs (report_*.yaml) in one table (percent).",
    )
    parser.add_argument("experiment_folders", nargs="+")
    parser.add_argument("--trained_status", default="trained")
    parser.add_argument("--long", action="store_true", help="one row per metric, with CIs")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    table = read_reports(args.experiment_folders, args.trained_status, long=args.long)
    if args.csv:
        table.to_csv(args.csv)
    print(table.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
