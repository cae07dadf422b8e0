"""PNG plots of a finished benchmark: metric bars, training curves, embedding maps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .metrics import metric_label


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(summary: pd.DataFrame, path: Path) -> None:
    """One panel per metric: a bar per loss (mean over seeds) with its 95% CI."""
    plt = _plt()
    metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    x = np.arange(len(summary))
    colors = plt.cm.tab10(np.arange(len(summary)) % 10)
    for ax, m in zip(axes.ravel(), metrics):
        mean = 100 * summary[f"{m}_mean"].to_numpy()
        err = 100 * np.nan_to_num(summary[f"{m}_ci95"].to_numpy(), nan=0.0)
        ax.bar(x, mean, yerr=err, color=colors, capsize=3)
        ax.set_xticks(x, summary["loss"], rotation=60, ha="right", fontsize=8)
        ax.set_title(metric_label(m))
        lo = np.nanmin(mean - err) if len(mean) else 0
        ax.set_ylim(max(0.0, lo - 10), min(100.0, np.nanmax(mean + err) + 5) if len(mean) else 100)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(metrics) :]:
        ax.axis("off")
    fig.suptitle("Test metrics (x100): mean and 95% CI over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(results: list[dict], loss_order: list[str], primary: str, path: Path):
    """Training loss and validation ``primary`` metric per epoch (mean over seeds)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for i, loss in enumerate(loss_order):
        hs = [pd.DataFrame(r["history"]) for r in results if r["loss"] == loss]
        if not hs:
            continue
        h = pd.concat(hs).groupby("epoch").mean(numeric_only=True)
        color = plt.cm.tab10(i % 10)
        ax1.plot(h.index, h["train_loss"], label=loss, color=color)
        col = f"val_{primary}"
        if col in h:
            ax2.plot(
                h[col].dropna().index, 100 * h[col].dropna(), label=loss, color=color, marker="."
            )
    ax1.set(xlabel="epoch", ylabel="training loss (mean over the epoch)", title="Training loss")
    ax1.set_yscale("symlog", linthresh=1e-2)
    ax2.set(
        xlabel="epoch",
        ylabel=f"validation {metric_label(primary)} (x100)",
        title=f"Validation {metric_label(primary)} (model selection)",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _project(points: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = max(2.0, min(30.0, (len(points) - 1) / 3.0))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    from sklearn.decomposition import PCA

    return PCA(2, random_state=seed).fit_transform(points)


def plot_embedding_maps(run_dirs: dict[str, Path], path: Path, method: str = "pca") -> None:
    """One panel per loss: a 2-D map (PCA or t-SNE, fitted jointly on both point sets) of the
    L2-normalised test embeddings (coloured by class) and the L2-normalised learned proxies of
    the training classes (black crosses; VCPA proxies as circles whose radius is their
    uncertainty)."""
    plt = _plt()
    items = [(n, d / "map_data.npz") for n, d in run_dirs.items() if (d / "map_data.npz").is_file()]
    if not items:
        return
    ncols = min(4, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 4 * nrows), squeeze=False)
    for ax, (name, f) in zip(axes.ravel(), items):
        z = np.load(f)
        emb, labels = z["embeddings"], z["labels"]
        pts = [emb]
        if "proxies" in z:
            p = z["proxies"]
            pts.append(p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12))
        xy = _project(np.concatenate(pts), method)
        e_xy = xy[: len(emb)]
        ax.scatter(e_xy[:, 0], e_xy[:, 1], c=labels, cmap="tab20", s=5, alpha=0.6, linewidths=0)
        if "proxies" in z:
            p_xy = xy[len(emb) :]
            if "proxy_uncertainty" in z:
                u = z["proxy_uncertainty"]
                span = np.ptp(xy, axis=0).max() or 1.0
                radius = 0.08 * span * u / max(float(u.max()), 1e-12)
                for (px, py), r in zip(p_xy, radius):
                    ax.add_patch(plt.Circle((px, py), r, fill=False, color="k", lw=0.8))
                ax.scatter(
                    p_xy[:, 0],
                    p_xy[:, 1],
                    c="k",
                    marker="x",
                    s=18,
                    label="proxies (circle: uncertainty)",
                )
            else:
                ax.scatter(p_xy[:, 0], p_xy[:, 1], c="k", marker="x", s=18, label="proxies")
            ax.legend(fontsize=6, loc="lower right")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(items) :]:
        ax.axis("off")
    fig.suptitle(f"Test embeddings ({method.upper()}) and learned proxies (training classes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
