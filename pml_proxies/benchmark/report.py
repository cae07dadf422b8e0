"""Tables (CSV, Markdown), the self-explaining ``report.md`` and the plots of a benchmark."""

from __future__ import annotations

import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .metrics import metric_label, metric_order
from .plots import plot_embedding_maps, plot_metric_bars, plot_training_curves  # noqa: F401
from .stats import mean_confidence_interval, paired_difference, paired_verdict

if TYPE_CHECKING:
    from .config import BenchmarkConfig
    from .data import BenchmarkData
    from .runner import RunInfo
    from .spec import RunSpec

#: fewer validation classes than this: model selection is noisy (a report caveat)
MIN_VAL_CLASSES = 5


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
) -> pd.DataFrame:
    """Per loss other than ``baseline``: the seed-paired difference to ``baseline`` of each of
    ``metrics`` (columns ``<metric>_diff``, ``<metric>_ci95``), the number of paired seeds and the
    verdict on ``metrics[0]`` (:func:`~pml_proxies.benchmark.stats.paired_verdict`). Empty when
    ``baseline`` was not run."""
    columns = ["loss", "paired_seeds", *[f"{m}_{k}" for m in metrics for k in ("diff", "ci95")]]
    if baseline not in set(runs["loss"]):
        return pd.DataFrame(columns=[*columns, "verdict"])
    base = runs[runs["loss"] == baseline].set_index("seed")
    rows = []
    for loss in [n for n in loss_order if n in set(runs["loss"]) and n != baseline]:
        sub = runs[runs["loss"] == loss].set_index("seed")
        row: dict[str, Any] = {"loss": loss}
        for m in metrics:
            mean, half, n = paired_difference(sub[m].to_dict(), base[m].to_dict(), confidence)
            row.setdefault("paired_seeds", n)  # of the first metric, the verdict's
            row.update({f"{m}_diff": mean, f"{m}_ci95": half})
        row["verdict"] = paired_verdict(row[f"{metrics[0]}_diff"], row[f"{metrics[0]}_ci95"])
        rows.append(row)
    return pd.DataFrame(rows, columns=[*columns, "verdict"])


def comparison_markdown(table: pd.DataFrame, metrics: list[str], baseline: str = BASELINE) -> str:
    """The paired comparison as a Markdown table with a sentence saying how to read it."""
    if table.empty:
        return f"(not computed: {baseline} was not run)"
    out = pd.DataFrame({"loss": table["loss"], "paired seeds": table["paired_seeds"]})
    for m in metrics:
        out[f"{metric_label(m)} - {baseline}"] = [
            _fmt_signed(a, b) for a, b in zip(table[f"{m}_diff"], table[f"{m}_ci95"])
        ]
    out[f"{metric_label(metrics[0])} verdict"] = table["verdict"]
    return "\n".join(
        [
            f"Each loss minus {baseline} on the same seeds (a seed fixes the initial network and "
            'the batches), x100, mean ± 95% CI half width over the seeds; "above" or '
            f'"below": the interval of {metric_label(metrics[0])} excludes 0.',
            "",
            to_markdown(out),
        ]
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


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no ``tabulate`` dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in row.tolist()) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ report.md
def config_record(config: BenchmarkConfig) -> dict:
    """The config as saved in ``config.json``."""
    return asdict(config)


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

    return f"cpu ({os.cpu_count()} logical cores; {platform.processor() or platform.machine()})"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def protocol_sentences(
    config: BenchmarkConfig, data: BenchmarkData, spec: RunSpec, results: list[dict]
) -> list[str]:
    """The protocol in plain sentences, with the values actually used."""
    geometry = sorted({(r["batch_size"], r["m_per_class"]) for r in results})
    batches = ", ".join(f"{b} images ({b // m} classes x {m} images)" for b, m in geometry)
    t = spec.trunk
    lines = [
        f"Data set `{config.dataset}`: the model trains on {len(data.train)} images of "
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
        "set (PML's AccuracyCalculator convention)."
    )
    return lines


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
    if "proxy_isa" in by_loss:
        out.append(
            "Proxy-ISA's training loss is about 100 times the others' in the first epochs: its "
            "eq. 13 divides the negative term by the mean negative weight (about 1/E_c before "
            "the memory starts). This is the paper's loss, not a bug; compare losses by their "
            "retrieval metrics, not by their loss values."
        )
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


RUN_FILES = ("result.json", "map_data.npz", "logs/", "tensorboard/")


def report_markdown(
    config: BenchmarkConfig,
    data: BenchmarkData,
    specs: list[RunSpec],
    results: list[dict],
    summary: pd.DataFrame,
    table_md: str,
    files: dict[str, Path],
    output: Path,
    info: RunInfo,
    comparison_md: str = "",
) -> str:
    """``report.md``: command, environment, protocol, results, selected epochs,
    hyper-parameters, caveats, plots, files (paths relative to the output folder)."""
    env = versions()
    commit = git_commit()
    start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.start))
    train_s = sum(float(r["train_time_s"]) for r in results)
    command = config.command or "(called from Python: run_benchmark)"
    rel = {k: Path(v).relative_to(output).as_posix() for k, v in files.items()}
    env_lines = [
        f"* versions: {', '.join(f'{k} {v}' for k, v in env.items())}",
        f"* git commit: {commit or 'not run from a git checkout'}",
        f"* device: {device_description(config.device)}; torch CPU threads: "
        f"{info.threads} per run; runs trained at once (--jobs): {info.jobs}",
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
    file_lines = [f"* `{p}`" for p in sorted({*rel.values(), "config.json", "protocol.json"})]
    file_lines += [
        f"* `runs/<loss>/seed_<s>/`: {', '.join(f'`{f}`' for f in RUN_FILES)} for each of the "
        f"{len(run_list)} runs: "
        + ", ".join(f"`runs/{loss}/seed_{seed}/`" for loss, seed in run_list)
    ]
    plots = [f"![{k}]({v})" for k, v in rel.items() if v.endswith(".png") and files[k].is_file()]
    return "\n".join(
        [
            f"# Benchmark report: {config.dataset}",
            "",
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
    output: Path,
    info: RunInfo,
) -> tuple[dict[str, Path], pd.DataFrame, pd.DataFrame]:
    """Write runs.csv, summary.csv, summary.md, the PNG plots and report.md; returns
    ``(files, runs, summary)`` (``files``: name -> path of every file written)."""
    output = Path(output)
    runs = runs_table(results)
    loss_order = list(dict.fromkeys(s.loss for s in specs))
    summary = summary_table(runs, loss_order)
    table_md = to_markdown(display_table(summary))
    metrics = comparison_metrics(config.primary_metric, runs)
    comparison = comparison_table(runs, loss_order, metrics)
    files = {
        "runs_csv": output / "runs.csv",
        "summary_csv": output / "summary.csv",
        "summary_md": output / "summary.md",
        "report_md": output / "report.md",
        "metrics_png": output / "metrics.png",
        "curves_png": output / "training_curves.png",
        "map_png": output / "embedding_maps.png",
    }
    runs.to_csv(files["runs_csv"], index=False)
    summary.to_csv(files["summary_csv"], index=False)
    files["summary_md"].write_text(table_md + "\n")
    comparison_md = ""
    if not comparison.empty:
        files["comparison_csv"] = output / "comparison.csv"
        comparison.to_csv(files["comparison_csv"], index=False)
        comparison_md = comparison_markdown(comparison, metrics)
    first_seed: dict[str, int] = {}
    for r in sorted(results, key=lambda r: config.seeds.index(r["seed"])):
        first_seed.setdefault(r["loss"], r["seed"])
    _plot(plot_metric_bars, summary, files["metrics_png"])
    _plot(plot_training_curves, results, loss_order, config.primary_metric, files["curves_png"])
    _plot(
        plot_embedding_maps,
        {loss: output / "runs" / loss / f"seed_{first_seed[loss]}" for loss in loss_order},
        files["map_png"],
        method=config.map_method,
    )
    files["report_md"].write_text(
        report_markdown(
            config, data, specs, results, summary, table_md, files, output, info, comparison_md
        )
    )
    return files, runs, summary


def _plot(function, *args, **kwargs) -> None:
    """Draw one plot; a failing plot is reported and never loses the tables and the report."""
    try:
        function(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        print(f"note: {function.__name__} failed ({type(e).__name__}: {e})", file=sys.stderr)
