"""Benchmark plots (``pml_proxies.benchmark.plots``): files written and the figures' properties
(inspected through the returned matplotlib Figures)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgba
from matplotlib.patches import Circle

from pml_proxies.benchmark import plots
from pml_proxies.benchmark.losses import LOSSES
from pml_proxies.benchmark.store import RunFolder, RunStore

OWN = ["mpa", "vcpa"]
BASELINES = ["proxy_anchor", "multi_similarity"]
METRICS = ["precision_at_1", "recall_at_1", "recall_at_2", "r_precision", "ndcg_at_10"]


def _summary(seeds: int, seed: int = 0) -> pd.DataFrame:
    """Today's ``summary_table`` format; the baselines come first (the plot must regroup them)
    and the last loss's R@2 interval passes 100."""
    rng = np.random.default_rng(seed)
    rows = []
    for loss in BASELINES + OWN:
        row = {"loss": loss, "seeds": seeds, "train_time_s": 1.0}
        for m in METRICS:
            row[f"{m}_mean"] = 0.8 + 0.02 * rng.random()
            row[f"{m}_ci95"] = 0.01 + 0.02 * rng.random() if seeds > 1 else np.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    if seeds > 1:
        df.loc[len(df) - 1, ["recall_at_2_mean", "recall_at_2_ci95"]] = [0.985, 0.04]
    return df


def _panels(fig) -> dict[str, object]:
    return {ax.get_label()[len("metric ") :]: ax for ax in fig.axes if ax.get_label()}


def test_metric_panels_drop_same_as_and_show_every_interval_unclipped(tmp_path):
    summary = _summary(3)
    fig = plots.plot_metric_bars(summary, tmp_path / "metrics.png", own_losses=OWN)
    assert (tmp_path / "metrics.png").stat().st_size > 0
    panels = _panels(fig)
    assert list(panels) == ["precision_at_1", "recall_at_2", "r_precision", "ndcg_at_10"]
    assert all(ax.get_title() != "R@1" for ax in fig.axes)
    for m, ax in panels.items():
        assert ax.get_ylabel()
        lo, hi = ax.get_ylim()
        mean = 100 * summary[f"{m}_mean"].to_numpy()
        half = 100 * summary[f"{m}_ci95"].to_numpy()
        assert lo <= (mean - half).min() and hi >= (mean + half).max()
        assert hi - lo >= plots.MIN_SPAN
    assert panels["recall_at_2"].get_ylim()[1] > 100.0 + 2.0  # 98.5 + 4, not clipped at 100
    assert "3 seeds" in fig.get_suptitle()


def test_metric_panels_group_own_losses_apart_from_baselines(tmp_path):
    fig = plots.plot_metric_bars(_summary(3), tmp_path / "m.png", own_losses=OWN)
    ax = _panels(fig)["precision_at_1"]
    ticks = ax.get_xticklabels()
    assert [t.get_text() for t in ticks] == OWN + BASELINES
    colors = [to_rgba(t.get_color()) for t in ticks]
    assert colors[0] == colors[1] != colors[2] == colors[3]
    separators = [line for line in ax.get_lines() if np.ptp(line.get_xdata()) == 0]
    assert len(separators) == 1
    x = ax.get_xticks()
    assert x[1] < separators[0].get_xdata()[0] < x[2]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(plots.GROUP_NAMES)
    only_own = _summary(3)[lambda df: df["loss"].isin(OWN)]
    fig = plots.plot_metric_bars(only_own, tmp_path / "m.png", own_losses=OWN)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [plots.GROUP_NAMES[0]]
    assert not [line for line in fig.axes[0].get_lines() if np.ptp(line.get_xdata()) == 0]


def test_own_losses_default_to_the_registry_losses_of_this_package():
    own = plots.own_loss_names()
    assert own and own < set(LOSSES)
    assert all(LOSSES[n].target.startswith("pml_proxies.") for n in own)
    assert {"mpa", "proxy_isa", "vcpa"} <= own and not {"proxy_anchor", "soft_triple"} & own


def test_metric_panels_with_one_seed_say_so_and_draw_no_interval(tmp_path):
    fig = plots.plot_metric_bars(_summary(1), tmp_path / "m.png")
    assert "one seed" in fig.get_suptitle()
    for ax in _panels(fig).values():
        bars = [c for c in ax.collections if isinstance(c, LineCollection)]
        assert all(len(c.get_segments()) == 0 for c in bars)
        assert ax.get_ylim()[1] - ax.get_ylim()[0] >= plots.MIN_SPAN


@pytest.mark.parametrize(
    "low, high", [(50.0, 51.0), (97.0, 99.5), (0.5, 2.0), (20.0, 60.0), (95.0, 104.0)]
)
def test_metric_limits_contain_the_data_and_span_at_least_min_span(low, high):
    lo, hi = plots.metric_limits(low, high, 10.0)
    assert lo <= low and hi >= high and hi - lo >= 10.0
    if 0.0 <= low and high <= 100.0:  # the window does not leave [0, 100] but by the margin
        margin = 0.06 * max(10.0, high - low)
        assert lo >= -margin - 1e-9 and hi <= 100.0 + margin + 1e-9
    if high - low > 10.0:  # wide data: only the margin is added
        assert hi - lo == pytest.approx(1.12 * (high - low))


def _results(epochs: int, losses: list[str], seeds: int = 2) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {
            "loss": loss,
            "seed": s,
            "history": [
                {
                    "epoch": e,
                    "iteration": 10 * e,
                    "train_loss": 1.0 / e + rng.random(),
                    "val_mean_average_precision_at_r": 0.4 + 0.01 * e,
                }
                for e in range(1, epochs + 1)
            ],
        }
        for loss in losses
        for s in range(seeds)
    ]


@pytest.mark.parametrize("epochs", [3, 7])
def test_training_curves_have_one_legend_and_integer_epoch_ticks(tmp_path, epochs):
    losses = OWN + BASELINES
    path = tmp_path / "curves.png"
    fig = plots.plot_training_curves(
        _results(epochs, losses), [*losses, "not_run"], "mean_average_precision_at_r", path
    )
    assert path.stat().st_size > 0
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == losses
    for ax in fig.axes:
        ticks = ax.get_xticks()
        assert np.array_equal(ticks, np.round(ticks))
        assert ax.get_xlabel() == "epoch"
    assert len(fig.axes[1].get_lines()) == len(losses)
    assert "MAP@R" in fig.axes[1].get_ylabel()
    styles = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert styles["mpa"] != styles["proxy_anchor"]
    assert fig.axes[0].get_yscale() == "log"
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)]
    assert any(labels) and all(float(t) > 0 for t in labels if t)  # plain numbers, no 6x10^0
    negative = _results(epochs, losses)
    negative[0]["history"][-1]["train_loss"] = -5.0  # e.g. Proxy-NCA (no positive in the sum)
    fig = plots.plot_training_curves(negative, losses, "mean_average_precision_at_r", path)
    assert fig.axes[0].get_yscale() == "symlog"


def _map_data(
    folder,
    rng,
    *,
    train=True,
    proxies_per_class=1,
    uncertainty=None,
    dim=16,
    proxy_gap=0.0,
    noise=0.3,
):
    """A ``map_data.npz``; ``proxy_gap``: length of a direction shared by all proxies and by no
    embedding (trained proxies are rarely where the embeddings are)."""
    folder.mkdir(parents=True)
    train_classes, test_classes = 12, 8
    centres = rng.normal(size=(train_classes, dim))
    centres[:, -1] = 0.0
    arrays = {
        "embeddings": rng.normal(size=(80, dim)).astype(np.float32),
        "labels": rng.integers(0, test_classes, 80),
    }
    if train:
        labels = np.repeat(np.arange(train_classes), 6)
        arrays["train_embeddings"] = (centres[labels] + noise * rng.normal(size=(72, dim))).astype(
            np.float32
        )
        arrays["train_labels"] = labels
    if proxies_per_class:
        arrays["proxies"] = np.repeat(centres, proxies_per_class, axis=0)
        arrays["proxies"][:, -1] = proxy_gap * np.linalg.norm(centres, axis=1).max()
        arrays["proxy_labels"] = np.repeat(np.arange(train_classes), proxies_per_class)
    if uncertainty is not None:
        arrays["proxy_uncertainty"] = uncertainty
    np.savez_compressed(folder / "map_data.npz", **arrays)
    return folder


def _read(dirs: dict) -> dict:
    """The map data of the run folders ``dirs`` (loss -> folder) as the report reads it, through
    the store (folders without ``map_data.npz`` left out)."""
    maps = {name: RunFolder(folder).map_data() for name, folder in dirs.items()}
    return {name: arrays for name, arrays in maps.items() if arrays is not None}


def _by_label(fig) -> dict[str, object]:
    return {ax.get_label(): ax for ax in fig.axes if ax.get_label()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_maps_show_training_with_proxies_above_test(tmp_path, dtype):
    rng = np.random.default_rng(2)
    unc = np.linspace(0.20, 0.21, 12).astype(dtype)  # small differences must stay visible
    dirs = {
        "mpa": _map_data(tmp_path / "mpa", rng, proxies_per_class=3),
        "vcpa": _map_data(tmp_path / "vcpa", rng, uncertainty=unc),
        "multi_similarity": _map_data(tmp_path / "ms", rng, proxies_per_class=0),
        "no_file": tmp_path / "missing",
    }
    path = tmp_path / "maps.png"
    fig = plots.plot_embedding_maps(_read(dirs), path, max_classes=5)
    assert path.stat().st_size > 0
    axes = _by_label(fig)
    names = ["mpa", "vcpa", "multi_similarity"]
    assert sorted(axes) == sorted([f"train {n}" for n in names] + [f"test {n}" for n in names])
    for n in names:  # training row above the test row
        train, test = axes[f"train {n}"], axes[f"test {n}"]
        assert train.get_window_extent().y0 > test.get_window_extent().y1
        assert "% of variance" in train.get_xlabel() and "%" in test.get_ylabel()
        assert "5 of 12 classes" in train.get_title() and "5 of 8 classes" in test.get_title()
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    # proxies: over the points, coloured like their class's points, with a dark edge
    train = axes["train mpa"]
    points, shown, proxies = train.collections[:3]
    assert proxies.get_zorder() > shown.get_zorder() > points.get_zorder()
    assert len(proxies.get_offsets()) == 5 * 3
    assert np.allclose(proxies.get_edgecolors()[:, :3], 0.0)
    assert {tuple(c) for c in proxies.get_facecolors()[:, :3].round(4)} == {
        tuple(c) for c in shown.get_facecolors()[:, :3].round(4)
    }
    assert not any(isinstance(p, Circle) for p in train.patches)
    assert len(axes["train multi_similarity"].collections) == 2  # no proxies
    circles = [p for p in axes["train vcpa"].patches if isinstance(p, Circle)]
    assert len(circles) == 5
    radii = np.array([c.get_radius() for c in circles])
    lo, hi = plots.UNCERTAINTY_RADII
    assert radii.max() / radii.min() > 0.8 * hi / lo  # min..max of the uncertainty: visible
    assert "0.2" in axes["train vcpa"].get_title() and "0.21" in axes["train vcpa"].get_title()


def test_embedding_maps_of_old_runs_without_training_embeddings_have_a_test_row(tmp_path):
    rng = np.random.default_rng(3)
    dirs = {n: _map_data(tmp_path / n, rng, train=False) for n in ("mpa", "proxy_anchor")}
    fig = plots.plot_embedding_maps(_read(dirs), tmp_path / "maps.png")
    assert (tmp_path / "maps.png").stat().st_size > 0
    assert sorted(_by_label(fig)) == ["test mpa", "test proxy_anchor"]
    # a mix of old and new runs: the old run's training panel says why it is empty
    dirs["vcpa"] = _map_data(tmp_path / "vcpa", rng)
    axes = _by_label(plots.plot_embedding_maps(_read(dirs), tmp_path / "mixed.png"))
    assert len(axes) == 6 and "no training embeddings" in axes["train mpa"].get_title()
    assert not axes["train mpa"].collections and axes["train vcpa"].collections


def test_embedding_maps_wrap_many_losses_into_blocks_of_rows(tmp_path):
    rng = np.random.default_rng(4)
    names = [f"loss{i}" for i in range(5)]
    dirs = {n: _map_data(tmp_path / n, rng) for n in names}
    axes = _by_label(plots.plot_embedding_maps(_read(dirs), tmp_path / "maps.png", max_columns=3))
    rows = sorted({round(ax.get_window_extent().y0) for ax in axes.values()}, reverse=True)
    assert len(rows) == 4
    y = {k: round(ax.get_window_extent().y0) for k, ax in axes.items()}
    assert y["train loss0"] == rows[0] and y["test loss0"] == rows[1]
    assert y["train loss3"] == rows[2] and y["test loss4"] == rows[3]


def test_embedding_maps_without_map_data_write_nothing(tmp_path):
    store = RunStore(tmp_path)
    store.run("mpa", 0).path.mkdir(parents=True)  # a run folder without map data
    maps = store.map_data({"mpa": [0], "vcpa": [0]})
    assert maps == {}
    assert plots.plot_embedding_maps(maps, tmp_path / "maps.png") is None
    assert not (tmp_path / "maps.png").exists()


def test_store_reads_map_data_in_the_order_asked(tmp_path):
    rng = np.random.default_rng(7)
    store = RunStore(tmp_path)
    for loss in ("vcpa", "mpa"):
        _map_data(store.run(loss, 1).path, rng)
    maps = store.map_data({"mpa": [1], "proxy_anchor": [1], "vcpa": [1]})
    assert list(maps) == ["mpa", "vcpa"]
    with np.load(store.run("vcpa", 1).path / "map_data.npz") as z:
        assert sorted(maps["vcpa"]) == sorted(z.files)
        assert all(np.array_equal(maps["vcpa"][k], z[k]) for k in z.files)


def test_store_reads_the_first_seed_with_map_data(tmp_path):
    """Only a command's first seed keeps map data, so a folder grown by two commands (seeds
    0,1 then 1,2) has it for seed 0 only: a report of seeds 1,2 falls back to the first of its
    seeds that has any."""
    rng = np.random.default_rng(8)
    store = RunStore(tmp_path)
    store.run("mpa", 1).path.mkdir(parents=True)  # finished elsewhere, no map data
    _map_data(store.run("mpa", 2).path, rng)
    _map_data(store.run("mpa", 3).path, rng, proxies_per_class=3)
    maps = store.map_data({"mpa": [1, 2, 3]})
    with np.load(store.run("mpa", 2).path / "map_data.npz") as z:
        assert all(np.array_equal(maps["mpa"][k], z[k]) for k in z.files)


def test_embedding_maps_tsne(tmp_path):
    rng = np.random.default_rng(5)
    dirs = {
        "vcpa": _map_data(
            tmp_path / "vcpa", rng, uncertainty=rng.random(12), proxy_gap=3.0, noise=0.1
        )
    }
    axes = _by_label(plots.plot_embedding_maps(_read(dirs), tmp_path / "maps.png", method="tsne"))
    ax = axes["train vcpa"]
    assert ax.get_xlabel() == "t-SNE 1"
    _, shown, proxies = ax.collections[:3]
    assert len(proxies.get_offsets()) == 10  # 10 of 12 classes
    # a proxy (its class centre) sits among its class's points, not in a cluster of proxies:
    # the nearest class centroid of the map is its own class's
    point_colors = shown.get_facecolors()[:, :3].round(4)
    colors = np.unique(point_colors, axis=0)
    centroids = np.stack(
        [shown.get_offsets()[np.all(point_colors == c, axis=1)].mean(axis=0) for c in colors]
    )
    for xy, color in zip(proxies.get_offsets(), proxies.get_facecolors()[:, :3].round(4)):
        nearest = np.linalg.norm(centroids - xy, axis=1).argmin()
        assert np.array_equal(colors[nearest], color)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"method": "umap"}, "method"), ({"max_classes": 0}, "max_classes")],
)
def test_embedding_maps_reject_bad_options_before_writing(tmp_path, kwargs, match):
    dirs = {"mpa": _map_data(tmp_path / "mpa", np.random.default_rng(6))}
    with pytest.raises(ValueError, match=match):
        plots.plot_embedding_maps(_read(dirs), tmp_path / "maps.png", **kwargs)
    assert not (tmp_path / "maps.png").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, d", [(50, 6), (5, 12)])
def test_pca_2d_matches_the_svd_of_the_centred_points(dtype, n, d):
    rng = np.random.default_rng(7)
    scale = np.linspace(5.0, 0.1, d)
    x = (rng.normal(size=(n, d)) * scale).astype(dtype)
    mean, comps, ratio = plots.pca_2d(x)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    assert np.allclose(mean, x.mean(axis=0), atol=1e-5)
    assert np.allclose(np.abs(comps @ vt[:2].T), np.eye(2), atol=1e-5)
    assert np.allclose(ratio, s[:2] ** 2 / np.sum(s**2), atol=1e-6)
    assert np.all(comps[np.arange(2), np.abs(comps).argmax(axis=1)] > 0)  # fixed signs


def test_pca_2d_of_points_on_a_line_has_no_second_component():
    x = np.outer(np.arange(6.0), [1.0, 2.0, 0.0])
    _, comps, ratio = plots.pca_2d(x)
    assert np.allclose(ratio, [1.0, 0.0]) and np.allclose(comps[1], 0.0)
    assert np.allclose(comps[0], np.array([1.0, 2.0, 0.0]) / np.sqrt(5.0))


def test_shown_classes_and_uncertainty_radii():
    labels = np.repeat(np.arange(30), 2)
    shown = plots.shown_classes(labels, 4)
    assert shown.tolist() == [0, 10, 19, 29]
    assert plots.shown_classes(np.random.default_rng(8).permutation(labels), 4).tolist() == [
        0,
        10,
        19,
        29,
    ]
    assert plots.shown_classes(labels[:6], 4).tolist() == [0, 1, 2]
    r = plots.uncertainty_radii(np.array([0.3, 0.31, 0.305]), 2.0, (0.01, 0.1))
    assert np.allclose(r, [0.02, 0.2, 0.11])
    assert np.allclose(plots.uncertainty_radii(np.full(3, 0.5), 2.0, (0.01, 0.1)), 0.11)


@pytest.mark.parametrize("n", [1, 7, 10, 13, 20])
def test_class_colors_are_distinct_and_never_grey(n):
    colors = [to_rgba(c)[:3] for c in plots.class_colors(n)]
    assert len(colors) == len(set(colors)) == n
    assert not any(np.allclose(c[0], c[1:]) and c[0] > 0 for c in colors)  # grey: other classes
