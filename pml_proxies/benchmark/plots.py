"""PNG plots of a finished benchmark: test metrics, training curves and 2-D embedding maps.

Each function writes its PNG and returns the :class:`matplotlib.figure.Figure` it drew, so that
callers (and tests) can inspect the axes. Figures are built without ``pyplot`` (no global state,
no backend switch, nothing to close).

* :func:`plot_metric_bars` (``metrics.png``): a dot-and-interval panel per metric, this package's
  losses grouped apart from PML's baselines.
* :func:`plot_training_curves` (``training_curves.png``): training loss and validation metric
  per epoch, one legend for both panels.
* :func:`plot_embedding_maps` (``embedding_maps.png``): per loss a column with the training
  embeddings and their proxies above, the test embeddings below, each in its own 2-D map.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..functional.validation import check_choice, check_int, check_real
from .metrics import metric, metric_label, metric_order

#: colours of the two loss groups of ``metrics.png``: (this package's losses, PML's baselines)
GROUP_COLORS = ("#1f77b4", "#d95f02")
#: their names in legends
GROUP_NAMES = ("pml-proxies losses", "PML baselines")
#: smallest y-range of a metric panel, in points (metrics x100): differences of a few points
#: must not fill the panel
MIN_SPAN = 10.0
#: radius range (fraction of a map's extent) that a loss's range of proxy uncertainties maps to
UNCERTAINTY_RADII = (0.015, 0.09)
#: map methods of :func:`plot_embedding_maps` and their names in titles
MAP_METHODS = {"pca": "PCA", "tsne": "t-SNE"}
#: t-SNE maps: a proxy is drawn at the mean position of this many most similar embeddings
TSNE_NEIGHBOURS = 5
DPI = 110


def own_loss_names() -> set[str]:
    """Names of the benchmark's losses implemented in this package (the others are PML's), read
    from the loss registry (``LossSpec.target``)."""
    from .losses import LOSSES

    return {name for name, spec in LOSSES.items() if spec.target.startswith("pml_proxies.")}


def _own(own_losses: Iterable[str] | None) -> set[str]:
    return own_loss_names() if own_losses is None else set(own_losses)


def _save(fig: Figure, path: Path | str) -> Figure:
    fig.savefig(path, dpi=DPI)
    return fig


# ------------------------------------------------------------------ metrics.png
def panel_metrics(names: Iterable[str]) -> list[str]:
    """``names`` in display order, without a metric equal to another present one by definition
    (R@1 is P@1)."""
    names = list(names)
    present = set(names)
    return [n for n in metric_order(names) if _same_as(n) not in present]


def _same_as(name: str) -> str | None:
    try:
        return metric(name).same_as
    except ValueError:  # not a benchmark metric: never a duplicate
        return None


def metric_limits(low: float, high: float, min_span: float = MIN_SPAN) -> tuple[float, float]:
    """y-limits (points) showing ``[low, high]`` (every interval end) unclipped, at least
    ``min_span`` wide so that small differences look small; the window stays inside
    ``[0, 100]`` when the data do (apart from a small margin)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return 0.0, 100.0
    lo, hi = low, high
    if hi - lo < min_span:
        centre = (lo + hi) / 2
        lo, hi = centre - min_span / 2, centre + min_span / 2
        if hi > 100.0 >= high:
            lo, hi = lo - (hi - 100.0), 100.0
        if lo < 0.0 <= low:
            lo, hi = 0.0, hi - lo
    margin = 0.06 * (hi - lo)
    return lo - margin, hi + margin


def _loss_positions(losses: list[str], own: set[str]) -> tuple[list[str], np.ndarray, int]:
    """Losses reordered as (own..., baselines...), their x positions (a gap between the groups)
    and the number of own losses."""
    first = [n for n in losses if n in own]
    second = [n for n in losses if n not in own]
    gap = 0.8 if first and second else 0.0
    x = np.concatenate([np.arange(len(first)), len(first) + gap + np.arange(len(second))])
    return first + second, x, len(first)


def _seeds_phrase(seeds: np.ndarray) -> str:
    if len(seeds) == 0:
        return "no finished run"
    if seeds.max() <= 1:
        return "one seed (no confidence interval)"
    if seeds.min() == seeds.max():
        return f"mean and 95% CI over {int(seeds.max())} seeds"
    return f"mean over {int(seeds.min())}-{int(seeds.max())} seeds (95% CI where more than one)"


def plot_metric_bars(
    summary: pd.DataFrame,
    path: Path | str,
    *,
    own_losses: Iterable[str] | None = None,
    min_span: float = MIN_SPAN,
    max_columns: int = 4,
) -> Figure:
    """``metrics.png``: one dot-and-interval panel per test metric (x100), a dot per loss (mean
    over seeds) with its 95% confidence interval.

    Args:
        summary: ``report.summary_table`` (columns ``loss``, ``seeds``, ``<metric>_mean``,
            ``<metric>_ci95``); a metric equal to another by definition (R@1 = P@1) gets no panel.
        path: the PNG to write.
        own_losses: this package's losses, drawn first in their colour, apart from PML's
            baselines; default :func:`own_loss_names`.
        min_span: smallest y-range of a panel, in points.
        max_columns: panels per row.
    """
    min_span = check_real("min_span", min_span, low=0.0)
    max_columns = check_int("max_columns", max_columns, low=1)
    own = _own(own_losses)
    metrics = panel_metrics(c[: -len("_mean")] for c in summary.columns if c.endswith("_mean"))
    losses, x, n_own = _loss_positions(list(summary["loss"]), own)
    rows = summary.set_index("loss").loc[losses] if losses else summary.set_index("loss")
    colors = np.array([GROUP_COLORS[0 if n in own else 1] for n in losses])
    ncols = max(1, min(max_columns, len(metrics)))
    nrows = max(1, math.ceil(len(metrics) / ncols))
    width = max(3.0, 0.3 * len(losses) + 1.2)
    fig = Figure(figsize=(width * ncols, 3.4 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, m in zip(axes, metrics):
        mean = 100 * rows[f"{m}_mean"].to_numpy(dtype=float)
        half = 100 * rows[f"{m}_ci95"].to_numpy(dtype=float)
        has_ci = np.isfinite(half)
        err = np.where(has_ci, half, 0.0)
        for group in (0, 1):
            sel = (np.arange(len(losses)) < n_own) == (group == 0)
            if not sel.any():
                continue
            ax.errorbar(
                x[sel],
                mean[sel],
                yerr=np.where(has_ci[sel], err[sel], np.nan) if has_ci[sel].any() else None,
                fmt="o",
                color=GROUP_COLORS[group],
                ecolor=GROUP_COLORS[group],
                elinewidth=1.6,
                capsize=4,
                markersize=6,
            )
        ends = np.concatenate([mean - err, mean + err])
        ends = ends[np.isfinite(ends)]
        lo, hi = (ends.min(), ends.max()) if len(ends) else (math.nan, math.nan)
        ax.set_ylim(*metric_limits(float(lo), float(hi), min_span))
        if ax.get_ylim()[1] > 100.0:
            ax.axhline(100.0, color="0.5", lw=0.8, ls=":", zorder=0)
        if 0 < n_own < len(losses):
            ax.axvline((x[n_own - 1] + x[n_own]) / 2, color="0.6", lw=1.0, ls="--")
        ax.set_xticks(x, losses, rotation=55, ha="right", rotation_mode="anchor", fontsize=8)
        for tick, color in zip(ax.get_xticklabels(), colors):
            tick.set_color(color)
        ax.set_xlim(x.min() - 0.6 if len(x) else -1, x.max() + 0.6 if len(x) else 1)
        ax.set_title(metric_label(m), fontsize=10, fontweight="bold")
        ax.set_ylabel(f"test {metric_label(m)} (x100)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_label(f"metric {m}")
    for ax in axes[len(metrics) :]:
        ax.axis("off")
    seeds = summary["seeds"].to_numpy() if "seeds" in summary else np.ones(len(summary))
    fig.suptitle(f"Test metrics (x100): {_seeds_phrase(seeds)}")
    _group_legend(fig, [g for g, here in zip((0, 1), (n_own > 0, n_own < len(losses))) if here])
    return _save(fig, path)


def _group_legend(fig: Figure, groups: list[int]) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=GROUP_COLORS[g], marker="o", lw=1.6, label=GROUP_NAMES[g])
        for g in groups
    ]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)


# ------------------------------------------------------------------ training_curves.png
def _loss_colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_training_curves(
    results: list[dict],
    loss_order: list[str],
    primary: str,
    path: Path | str,
    *,
    own_losses: Iterable[str] | None = None,
) -> Figure:
    """``training_curves.png``: training loss (mean over the epoch; log scale, symmetric log
    when a loss is negative) and the validation ``primary`` metric (x100, model selection) per
    epoch, both averaged over seeds; one legend for both panels (solid lines: this package's
    losses, dashed: PML's baselines).

    Args:
        results: the runs' result dicts (``loss``, ``history``: rows with ``epoch``,
            ``train_loss`` and ``val_<metric>``).
        loss_order: the losses to draw, in legend order.
        primary: the model-selection metric (its ``val_`` column is drawn).
        path: the PNG to write.
        own_losses: this package's losses; default :func:`own_loss_names`.
    """
    from matplotlib.ticker import MaxNLocator

    own = _own(own_losses)
    fig = Figure(figsize=(13, 4.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    colors = _loss_colors(len(loss_order))
    handles, seed_counts = [], []
    col = f"val_{primary}"
    for color, loss in zip(colors, loss_order):
        hs = [pd.DataFrame(r["history"]) for r in results if r["loss"] == loss and r["history"]]
        if not hs:
            continue
        seed_counts.append(len(hs))
        h = pd.concat(hs).groupby("epoch").mean(numeric_only=True)
        style = "-" if loss in own else "--"
        (line,) = ax1.plot(h.index, h["train_loss"], style, color=color, label=loss)
        handles.append(line)
        if col in h:
            val = h[col].dropna()
            ax2.plot(val.index, 100 * val, style, color=color, marker="o", markersize=3.5)
    ax1.set(xlabel="epoch", ylabel="training loss (mean over the epoch)", title="Training loss")
    values = np.concatenate([line.get_ydata() for line in handles]) if handles else np.ones(1)
    if np.all(values[np.isfinite(values)] > 0):  # log scale: losses differ by orders of magnitude
        ax1.set_yscale("log")
        ax1.yaxis.set_major_formatter(_plain_log_formatter(True))
        ax1.yaxis.set_minor_formatter(_plain_log_formatter(False))
    else:
        ax1.set_yscale("symlog", linthresh=1e-2)
    label = metric_label(primary)
    ax2.set(
        xlabel="epoch",
        ylabel=f"validation {label} (x100)",
        title=f"Validation {label} (model selection)",
    )
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(
            handles=handles,
            loc="outside right upper",
            fontsize=8,
            title="solid: pml-proxies\ndashed: PML",
            title_fontsize=8,
        )
    if seed_counts:
        lo, hi = min(seed_counts), max(seed_counts)
        seeds = "one seed" if hi == 1 else f"mean over {lo if lo == hi else f'{lo}-{hi}'} seeds"
        fig.suptitle(f"Training curves ({seeds})")
    return _save(fig, path)


def _plain_log_formatter(label_only_base: bool):
    """Log-axis labels as plain numbers (``6``, ``0.5``) where matplotlib would label a tick."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(labelOnlyBase=label_only_base)


# ------------------------------------------------------------------ embedding_maps.png
def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D PCA of ``points`` (N, D): ``(mean (D,), components (2, D), explained variance ratio
    (2,))``; component signs fixed (largest loading positive) so maps do not flip at random.
    Eigen-decomposition of the smaller of the covariance (D, D) and Gram (N, N) matrices: a few
    times faster than an SVD of the points."""
    points = np.asarray(points, dtype=np.float64)
    n, d = points.shape
    mean = points.mean(axis=0)
    centred = points - mean
    total = float(np.square(centred).sum())
    if d <= n:
        values, vectors = np.linalg.eigh(centred.T @ centred)
        comps = vectors[:, ::-1][:, :2].T
    else:
        values, vectors = np.linalg.eigh(centred @ centred.T)
        comps = (centred.T @ vectors[:, ::-1][:, :2]).T
    values = np.clip(values[::-1][:2], 0.0, None)
    comps = comps / np.maximum(np.linalg.norm(comps, axis=1, keepdims=True), 1e-300)
    comps[values <= 1e-12 * max(total, 1e-300)] = 0.0  # rank < 2: no second direction
    if len(comps) < 2:
        comps = np.concatenate([comps, np.zeros((2 - len(comps), d))])
        values = np.concatenate([values, np.zeros(2 - len(values))])
    signs = np.sign(comps[np.arange(2), np.abs(comps).argmax(axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    ratio = values / total if total > 0 else np.zeros(2)
    return mean, comps, ratio


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _map_2d(
    emb: np.ndarray, extra: np.ndarray | None, method: str, seed: int
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, str]]:
    """2-D coordinates of the unit embeddings ``emb`` and unit proxies ``extra`` and the axis
    labels. Both maps are fitted on ``emb`` alone: PCA projects the proxies into it; t-SNE, which
    cannot place new points, draws each proxy at the mean position of its
    ``TSNE_NEIGHBOURS`` most similar embeddings (fitting both together would set the proxies
    apart in a cluster of their own: they are not where any embedding is)."""
    if method == "pca":
        mean, comps, ratio = pca_2d(emb)
        xy = (emb - mean) @ comps.T
        extra_xy = None if extra is None else (extra - mean) @ comps.T
        return xy, extra_xy, (f"PC1 ({ratio[0]:.0%} of variance)", f"PC2 ({ratio[1]:.0%})")
    from sklearn.manifold import TSNE

    perplexity = max(2.0, min(30.0, (len(emb) - 1) / 3.0))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(emb)
    extra_xy = None
    if extra is not None:
        k = min(TSNE_NEIGHBOURS, len(emb))
        nearest = np.argpartition(-(extra @ emb.T), k - 1, axis=1)[:, :k]
        extra_xy = xy[nearest].mean(axis=1)
    return xy, extra_xy, ("t-SNE 1", "t-SNE 2")


def shown_classes(labels: np.ndarray, max_classes: int) -> np.ndarray:
    """The classes coloured in a map: all when there are at most ``max_classes``, else
    ``max_classes`` evenly spaced ones of the sorted labels (the same for every loss)."""
    classes = np.unique(labels)
    if len(classes) <= max_classes:
        return classes
    return classes[np.linspace(0, len(classes) - 1, max_classes).round().astype(int)]


def uncertainty_radii(
    uncertainty: np.ndarray, extent: float, radii: tuple[float, float] = UNCERTAINTY_RADII
) -> np.ndarray:
    """Circle radii for proxy uncertainties: ``[min, max]`` of ``uncertainty`` maps linearly to
    ``[radii[0], radii[1]] * extent`` (all at the middle radius when they are equal)."""
    u = np.asarray(uncertainty, dtype=np.float64)
    lo, hi = float(u.min()), float(u.max())
    t = (u - lo) / (hi - lo) if hi > lo else np.full_like(u, 0.5)
    return extent * (radii[0] + t * (radii[1] - radii[0]))


def class_colors(n: int) -> np.ndarray:
    """``n`` distinct class colours (RGBA rows) without greys, the uncoloured classes' colour."""
    import matplotlib
    from matplotlib.colors import to_rgba_array

    name = "tab10" if n <= 10 else "tab20"
    colors = to_rgba_array(matplotlib.colormaps[name].colors)  # type: ignore[attr-defined]
    colors = colors[
        ~np.isclose(colors[:, 0], colors[:, 1]) | ~np.isclose(colors[:, 0], colors[:, 2])
    ]
    return np.concatenate([colors, to_rgba_array(["#ffd92f", "#a6761d"])])[:n]


def _draw_map(
    ax,
    emb: np.ndarray,
    labels: np.ndarray,
    method: str,
    max_classes: int,
    seed: int,
    proxies: np.ndarray | None = None,
    proxy_labels: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
) -> str:
    """One 2-D map; returns a short description for the panel title."""
    from matplotlib.patches import Circle

    emb = _unit(emb)
    labels = np.asarray(labels)
    extra = None if proxies is None else _unit(proxies)
    xy, p_xy, (xlabel, ylabel) = _map_2d(emb, extra, method, seed)
    classes = shown_classes(labels, max_classes)
    colors = class_colors(len(classes))
    shown = np.isin(labels, classes)
    ax.scatter(*xy[~shown].T, s=4, color="0.75", alpha=0.45, linewidths=0, zorder=1)
    index = np.searchsorted(classes, labels[shown])
    ax.scatter(*xy[shown].T, s=14, c=colors[index], alpha=0.85, linewidths=0, zorder=2)
    note = f"{len(classes)} of {len(np.unique(labels))} classes coloured"
    if p_xy is not None and proxy_labels is not None:
        proxy_labels = np.asarray(proxy_labels)
        keep = np.isin(proxy_labels, classes)
        p_index = np.searchsorted(classes, proxy_labels[keep])
        p_colors = colors[p_index]
        if uncertainty is not None:
            all_xy = np.concatenate([xy, p_xy])
            extent = float(np.ptp(all_xy, axis=0).max()) or 1.0
            radius = uncertainty_radii(uncertainty, extent)[keep]
            for (px, py), r, c in zip(p_xy[keep], radius, p_colors):
                ax.add_patch(Circle((px, py), r, fill=False, color=c, lw=1.1, zorder=3))
            u = np.asarray(uncertainty)
            note += f"\ncircle radius: uncertainty {u.min():.3g} (small) to {u.max():.3g} (large)"
        ax.scatter(
            *p_xy[keep].T,
            s=40,
            c=p_colors,
            marker="D",
            edgecolors="k",
            linewidths=0.9,
            zorder=4,
        )
        ax.update_datalim(p_xy)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.set_aspect("equal", adjustable="datalim")
    ax.tick_params(labelsize=6)
    return note


def _map_legend(fig: Figure, with_proxies: bool, with_uncertainty: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="o", color="tab:blue", label="embedding (colour: class)"),
        Line2D([], [], ls="", marker="o", color="0.75", label="embedding of an uncoloured class"),
    ]
    if with_proxies:
        handles.append(
            Line2D(
                [], [], ls="", marker="D", color="tab:blue", mec="k", label="proxy of that class"
            )
        )
    if with_uncertainty:
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker="o",
                mfc="none",
                color="tab:blue",
                markersize=11,
                label="VCPA: circle radius grows with the proxy's uncertainty",
            )
        )
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)


def plot_embedding_maps(
    maps: Mapping[str, Mapping[str, np.ndarray]],
    path: Path | str,
    method: str = "pca",
    *,
    max_classes: int = 10,
    max_columns: int = 5,
    seed: int = 0,
) -> Figure | None:
    """``embedding_maps.png``: per loss a column; above, its training embeddings with its proxies
    on top; below, its test embeddings (classes not seen in training). Every panel is its own 2-D
    map of the L2-normalised points, fitted on the embeddings: PCA (proxies projected into it,
    explained variance in the axis labels) or t-SNE (a proxy drawn at the mean position of its
    ``TSNE_NEIGHBOURS`` most similar embeddings).
    Points and proxies share their class's colour (proxies: diamonds with a dark edge); VCPA's
    proxies get circles whose radius maps the loss's range of uncertainties to a visible range.
    A ``map_data.npz`` without ``train_embeddings`` (older runs) gives a test panel only.

    Args:
        maps: loss name -> the map data of its run (the arrays of its ``map_data.npz``, as
            :meth:`~pml_proxies.benchmark.store.RunStore.map_data` reads them: ``embeddings``,
            ``labels``; optional ``train_embeddings``, ``train_labels``, ``proxies``,
            ``proxy_labels``, ``proxy_uncertainty``).
        path: the PNG to write (nothing is written when ``maps`` is empty: returns ``None``).
        method: ``"pca"`` or ``"tsne"``.
        max_classes: classes coloured per map (evenly spaced labels, the same for every loss);
            the others are drawn light grey, their proxies not at all.
        max_columns: losses per block of rows (more losses wrap into further blocks).
        seed: random state of t-SNE.
    """
    method = check_choice("method", method, MAP_METHODS)
    max_classes = check_int("max_classes", max_classes, low=1, high=20)
    max_columns = check_int("max_columns", max_columns, low=1)
    items = [(name, dict(arrays)) for name, arrays in maps.items()]
    if not items:
        return None
    with _one_blas_thread():
        return _embedding_maps(items, path, method, max_classes, max_columns, seed)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """Small matrices: one BLAS thread (several threads on a busy machine spin for seconds per
    decomposition); ``threadpoolctl`` comes with scikit-learn."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _embedding_maps(
    items: list[tuple[str, dict[str, np.ndarray]]],
    path: Path | str,
    method: str,
    max_classes: int,
    max_columns: int,
    seed: int,
) -> Figure:
    with_train = any("train_embeddings" in d for _, d in items)
    with_proxies = with_train and any("proxies" in d for _, d in items)
    with_unc = with_proxies and any("proxy_uncertainty" in d for _, d in items)
    ncols = min(max_columns, len(items))
    blocks = math.ceil(len(items) / ncols)
    rows_per_block = 2 if with_train else 1
    fig = Figure(figsize=(3.5 * ncols, 3.6 * rows_per_block * blocks + 0.9), layout="constrained")
    subfigs = fig.subfigures(rows_per_block * blocks, 1, squeeze=False)[:, 0]
    for b in range(blocks):
        chunk = items[b * ncols : (b + 1) * ncols]
        rows = subfigs[b * rows_per_block : (b + 1) * rows_per_block]
        row_axes = [sf.subplots(1, ncols, squeeze=False)[0] for sf in rows]
        if with_train:
            rows[0].suptitle("Training embeddings and proxies", fontsize=10, fontweight="bold")
        rows[-1].suptitle(
            "Test embeddings (classes unseen in training)", fontsize=10, fontweight="bold"
        )
        for j, (name, d) in enumerate(chunk):
            if with_train:
                ax = row_axes[0][j]
                ax.set_label(f"train {name}")
                if "train_embeddings" in d:
                    note = _draw_map(
                        ax,
                        d["train_embeddings"],
                        d["train_labels"],
                        method,
                        max_classes,
                        seed,
                        d.get("proxies"),
                        d.get("proxy_labels"),
                        d.get("proxy_uncertainty"),
                    )
                else:
                    note = "no training embeddings saved (older run)"
                    ax.axis("off")
                ax.set_title(f"{name}\n{note}", fontsize=8)
            ax = row_axes[-1][j]
            ax.set_label(f"test {name}")
            note = _draw_map(ax, d["embeddings"], d["labels"], method, max_classes, seed)
            ax.set_title(f"{name}\n{note}", fontsize=8)
        for axes in row_axes:
            for ax in axes[len(chunk) :]:
                ax.axis("off")
    fig.suptitle(f"How each loss arranges classes ({MAP_METHODS[method]} per panel)")
    _map_legend(fig, with_proxies, with_unc)
    return _save(fig, path)


__all__ = [
    "own_loss_names",
    "panel_metrics",
    "metric_limits",
    "plot_metric_bars",
    "plot_training_curves",
    "plot_embedding_maps",
    "pca_2d",
    "shown_classes",
    "uncertainty_radii",
    "class_colors",
]
