"""Run every (loss, seed) of a benchmark, resuming finished runs, and write the report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import report
from .config import BenchmarkConfig
from .data import load_benchmark_data
from .losses import LOSSES, build_loss, effective_kwargs
from .spec import build_run_spec
from .train import load_result, run_dir, train_and_evaluate


def _check_losses(config: BenchmarkConfig) -> None:
    for name in config.losses:
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
        build_loss(name, 3, 4, dataset=config.dataset, overrides=config.loss_params.get(name))


def run_benchmark(config: BenchmarkConfig) -> dict:
    """Train and evaluate every loss x seed of ``config``, then write the report.

    Finished runs (``runs/<loss>/seed_<s>/result.json`` with a matching protocol fingerprint) are
    reused: an interrupted benchmark resumes where it stopped.

    Returns:
        ``{"runs": DataFrame, "summary": DataFrame, "files": {name: path}, "skipped": n}``
        (``skipped``: finished runs reused).
    """
    _check_losses(config)
    threads = torch.get_num_threads()
    if config.threads_or_default is not None:
        torch.set_num_threads(config.threads_or_default)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _check_previous_runs(config: BenchmarkConfig, output: Path) -> None:
    """Refuse, before anything is trained or written, a folder holding a finished run of another
    protocol (so no run of the new protocol is added beside it and config.json stays true)."""
    for loss in config.losses:
        for seed in config.seeds:
            previous = load_result(output, loss, seed)
            if previous is not None and previous.get("config_fingerprint") != config.fingerprint(
                loss
            ):
                raise ValueError(
                    f"{run_dir(output, loss, seed)} holds a finished run of a different "
                    "protocol; use another --output folder or delete that run"
                )


def _run(config: BenchmarkConfig) -> dict:
    output = Path(config.output)
    _check_previous_runs(config, output)
    output.mkdir(parents=True, exist_ok=True)
    data = load_benchmark_data(
        config.dataset,
        root=config.root,
        image_size=config.image_size,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
        download=config.download,
        max_train_classes=config.max_train_classes,
        channels=config.channels,
        dataset_kwargs=config.dataset_kwargs,
        progress=config.progress,
    )
    with open(output / "config.json", "w") as f:
        json.dump(config.__dict__, f, indent=2, default=str)

    jobs = [(loss, seed) for loss in config.losses for seed in config.seeds]
    results, skipped = [], 0
    bar = tqdm(jobs, desc="benchmark", disable=not config.progress)
    for loss, seed in bar:
        bar.set_postfix_str(f"{loss} seed {seed}")
        previous = load_result(output, loss, seed)
        if previous is not None:  # its protocol was checked by _check_previous_runs
            results.append(previous)
            skipped += 1
            continue
        spec = build_run_spec(config, loss, seed)
        results.append(train_and_evaluate(spec, data, run_dir(output, loss, seed), position=1))
    files = write_report(config, data, results, output)
    summary = files.pop("_summary")
    runs = files.pop("_runs")
    return {"runs": runs, "summary": summary, "files": files, "skipped": skipped}


def write_report(config: BenchmarkConfig, data, results: list[dict], output: Path) -> dict:
    """Write runs.csv, summary.csv, summary.md, report.md and the PNG plots."""
    runs = report.runs_table(results)
    summary = report.summary_table(runs, config.losses)
    display = report.display_table(summary)
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
    table_md = report.to_markdown(display)
    files["summary_md"].write_text(table_md + "\n")
    report.plot_metric_bars(summary, files["metrics_png"])
    report.plot_training_curves(results, config.losses, config.primary_metric, files["curves_png"])
    first_seed = config.seeds[0]
    report.plot_embedding_maps(
        {loss: run_dir(output, loss, first_seed) for loss in config.losses},
        files["map_png"],
        method=config.map_method,
    )
    files["report_md"].write_text(_report_markdown(config, data, table_md, files, results))
    files["_summary"], files["_runs"] = summary, runs
    return files


def _report_markdown(
    config: BenchmarkConfig, data, table_md: str, files: dict, results: list[dict]
) -> str:
    geometry = sorted({(r["batch_size"], r["m_per_class"]) for r in results})
    batch_s = ", ".join(f"batch {b} = {b // m} classes x m={m}" for b, m in geometry)
    params = [
        "| loss | hyper-parameters | source |",
        "|---|---|---|",
    ]
    for loss in config.losses:
        kw = effective_kwargs(loss, config.dataset, config.loss_params.get(loss))
        kw_s = ", ".join(f"{k}={v}" for k, v in kw.items()) or "class defaults"
        params.append(f"| {loss} | {kw_s} | {LOSSES[loss].source} |")
    protocol = [
        f"* dataset: `{config.dataset}`: {len(data.train.labels)} training images of "
        f"{data.train.num_classes} classes, {len(data.val.labels)} validation images of "
        f"{data.val.num_classes} held-out training classes (model selection), "
        f"{len(data.test.labels)} test images of {data.test.num_classes} unseen classes",
        f"* trunk `{config.trunk}` (pretrained: {config.pretrained}), pooling `{config.pooling}`, "
        f"linear embedder to {config.embedding_size}-d; image size "
        f"{config.image_size if config.image_size else 'dataset default'}",
        f"* MPerClassSampler: {batch_s} (asked: batch {config.batch_size}, m="
        f"{config.m_per_class}; m grows when there are too few classes), "
        f"{config.epochs} epochs x {config.iterations_per_epoch} iterations",
        f"* {config.optimizer} lr {config.lr_or_default:g}, weight decay {config.weight_decay:g}, "
        f"loss parameters (proxies) lr x{config.proxy_lr_mult:g}, warm-up "
        f"{config.warmup_epochs_or_default} epoch(s) with frozen trunk, frozen BatchNorm: "
        f"{config.freeze_bn_or_default}, step decay every {config.lr_decay_epochs} epochs "
        f"(0 = none) x{config.lr_decay_gamma:g}, gradient clipping {config.grad_clip:g} (0 = none)",
        (
            f"* model selection: best validation `{config.primary_metric}` over epochs; "
            "test metrics of that epoch"
            if len(data.val) > 0
            else "* no validation split (--val-fraction 0): test metrics of the last epoch"
        )
        + f"; seeds {config.seeds}; mean ± 95% CI (Student t)",
    ]
    rel = {k: Path(v).name for k, v in files.items() if isinstance(v, Path)}
    return "\n".join(
        [
            f"# Benchmark report: {config.dataset}",
            "",
            f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. Command:",
            "",
            "```",
            config.command or "(called from Python)",
            "```",
            "",
            "## Protocol",
            "",
            *protocol,
            "",
            "## Test results (x100, mean ± 95% CI half width over seeds)",
            "",
            table_md,
            "",
            "## Loss hyper-parameters",
            "",
            *params,
            "",
            "## Plots",
            "",
            f"![metrics]({rel['metrics_png']})",
            "",
            f"![curves]({rel['curves_png']})",
            "",
            f"![maps]({rel['map_png']})",
            "",
            f"Per-run logs (record-keeper CSV + SQLite, tensorboard): `runs/<loss>/seed_<s>/` "
            f"under `{os.fspath(config.output)}`.",
            "",
        ]
    )
