"""Query / gallery evaluation of the benchmark's test set (:mod:`pml_proxies.benchmark.train`):
queries against the gallery, a row in both left out of its own search, per-category metrics;
checked against a plain loop over queries written here."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pml_proxies import AccuracyCalculator
from pml_proxies.benchmark.data import RelabeledSubset
from pml_proxies.benchmark.train import (
    EvalRows,
    category_metrics,
    eval_rows,
    evaluate,
    retrieval_metrics,
)
from pml_proxies.datasets.dataframe import RetrievalDataset, read_dataframe
from pml_proxies.utils.knn import TorchKNN

RECALL_KS = (1, 2, 4, 8)
METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r",
           *(f"recall_at_{k}" for k in RECALL_KS))  # fmt: skip
# The plain loop and the calculator rank the same float32 embeddings (random normals: no ties)
# and average at most 60 per-query values in [0, 1] in different orders (the calculator per part,
# then the parts weighted): the means agree to a few float32 ulps of 1 (ulp ~ 1.2e-7).
TOLERANCE = 1e-6


def calculator() -> AccuracyCalculator:
    """The benchmark's calculator (``k="max_bin_count"``), exact torch search."""
    return AccuracyCalculator(include=METRICS, k="max_bin_count", device=torch.device("cpu"),
                              recall_ks=RECALL_KS, ndcg_ks=(), knn_func=TorchKNN())  # fmt: skip


def plain_loop(emb: np.ndarray, labels: np.ndarray, is_query, is_gallery, queries=None) -> dict:
    """Each query's metrics from its sorted distances to the gallery rows other than itself;
    queries without a relevant gallery row are skipped; the means."""
    emb = emb.astype(np.float64)
    values: dict[str, list[float]] = {m: [] for m in METRICS}
    for i in range(len(emb)):
        if not is_query[i] or (queries is not None and not queries[i]):
            continue
        gallery = [j for j in range(len(emb)) if is_gallery[j] and j != i]
        distances = [float(np.sum((emb[i] - emb[j]) ** 2)) for j in gallery]
        ranked = [gallery[n] for n in np.argsort(distances, kind="stable")]
        hits = [labels[j] == labels[i] for j in ranked]
        relevant = sum(hits)
        if relevant == 0:
            continue
        values["precision_at_1"].append(float(hits[0]))
        values["r_precision"].append(sum(hits[:relevant]) / relevant)
        found, precision_sum = 0, 0.0
        for position, hit in enumerate(hits[:relevant], start=1):
            if hit:
                found += 1
                precision_sum += found / position
        values["mean_average_precision_at_r"].append(precision_sum / relevant)
        for k in RECALL_KS:
            values[f"recall_at_{k}"].append(float(any(hits[:k])))
    return {m: float(np.mean(v)) for m, v in values.items()}


def random_set(seed: int, n: int = 60, classes: int = 6, dim: int = 5):
    """Embeddings, labels, query and gallery flags (about a third each of query-only,
    gallery-only and both rows) and a category (two) per row."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    role = rng.integers(0, 3, n)  # 0 query only, 1 gallery only, 2 both
    categories = np.where(labels % 2 == 0, "shoes", "bags")
    return emb, labels, role != 1, role != 0, categories


def assert_close(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name] == pytest.approx(expected[name], abs=TOLERANCE), name


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_queries_against_the_gallery_match_a_plain_loop(seed, dtype):
    emb, labels, is_query, is_gallery, _ = random_set(seed)
    assert (is_query & is_gallery).any() and (is_query & ~is_gallery).any()
    rows = EvalRows(is_query, is_gallery)
    acc = retrieval_metrics(calculator(), torch.from_numpy(emb.astype(dtype)),
                            torch.from_numpy(labels), rows)  # fmt: skip
    assert_close(acc, plain_loop(emb, labels, is_query, is_gallery))


def test_a_row_in_query_and_gallery_is_left_out_of_its_own_search_only():
    """Rows 0 and 1 (class 0) are query and gallery, far apart, each nearer a gallery row of
    class 1: each misses (searching its own row it would find itself), row 2 finds row 3:
    P@1 = 1/3; row 0 is still the gallery row of row 1's class (not lone)."""
    emb = torch.tensor([[0.0, 0.0], [10.0, 0.0], [5.0, 5.0], [5.0, 5.2], [0.1, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    rows = EvalRows(np.array([True, True, True, False, False]),
                    np.array([True, True, False, True, True]))  # fmt: skip
    acc = retrieval_metrics(calculator(), emb, labels, rows)
    assert acc["precision_at_1"] == pytest.approx(1 / 3)
    assert acc["recall_at_4"] == 1.0
    assert_close(acc, plain_loop(emb.numpy(), labels.numpy(), rows.is_query, rows.is_gallery))


def test_only_query_and_only_gallery_rows_as_in_shop():
    emb, labels, _, _, _ = random_set(3)
    is_query = np.arange(len(labels)) % 2 == 0
    rows = EvalRows(is_query, ~is_query)
    acc = retrieval_metrics(calculator(), torch.from_numpy(emb), torch.from_numpy(labels), rows)
    assert_close(acc, plain_loop(emb, labels, rows.is_query, rows.is_gallery))


def test_every_row_query_and_gallery_is_exactly_leave_one_out():
    emb, labels, _, _, _ = random_set(4)
    emb_t, labels_t = torch.from_numpy(emb), torch.from_numpy(labels)
    everything = np.ones(len(labels), dtype=bool)
    calc = calculator()
    leave_one_out = retrieval_metrics(calc, emb_t, labels_t)
    # the same call by construction: equal, not close
    assert retrieval_metrics(calc, emb_t, labels_t, EvalRows(everything, everything)) == (
        leave_one_out
    )
    assert_close(leave_one_out, plain_loop(emb, labels, everything, everything))


@pytest.mark.parametrize("seed", [0, 5])
def test_per_category_metrics_are_the_category_queries_against_the_whole_gallery(seed):
    emb, labels, is_query, is_gallery, categories = random_set(seed)
    rows = EvalRows(is_query, is_gallery, categories)
    acc = category_metrics(calculator(), torch.from_numpy(emb), torch.from_numpy(labels), rows)
    assert sorted(acc) == ["bags", "shoes"]
    for name, metrics in acc.items():
        expected = plain_loop(emb, labels, is_query, is_gallery, categories == name)
        assert_close(metrics, expected)


def test_a_query_without_relevant_gallery_row_counts_for_no_metric():
    """Row 0 is the only gallery row of its class besides itself being absent: lone, skipped;
    with every query lone the metrics are NaN, as the calculator gives."""
    emb = torch.tensor([[0.0], [1.0], [1.1], [3.0]])
    labels = torch.tensor([0, 1, 1, 2])
    rows = EvalRows(np.array([True, True, False, True]), np.array([False, False, True, True]))
    acc = retrieval_metrics(calculator(), emb, labels, rows)
    assert_close(acc, plain_loop(emb.numpy(), labels.numpy(), rows.is_query, rows.is_gallery))
    assert acc["precision_at_1"] == 1.0  # row 1 finds row 2; rows 0 and 3 are lone
    lone = EvalRows(np.array([True, False, False, True]), np.array([False, True, True, True]))
    assert all(np.isnan(v) for v in retrieval_metrics(calculator(), emb, labels, lone).values())


# ------------------------------------------------------------------ from the data sets
class _Plain(torch.utils.data.Dataset):
    labels = np.array([0, 0, 1, 1])

    def __len__(self):
        return 4


def test_a_data_set_without_roles_is_evaluated_leave_one_out():
    assert eval_rows(_Plain()) is None
    assert eval_rows(RelabeledSubset(_Plain(), np.arange(4), {0: 0, 1: 1})) is None


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _dataframe(tmp_path: Path) -> Path:
    """2 train classes; 5 validation classes of 5 images with query-only, gallery-only and
    both rows (every query label in the gallery), two categories."""
    rng = np.random.default_rng(7)
    rows = []
    for label in range(7):
        for j in range(5):
            name = f"img/{label}_{j}.png"
            _image(tmp_path / name, 100 * label + j)
            train = label < 2
            role = 2 if j == 0 else int(rng.integers(0, 3))  # the first row: both
            rows.append(dict(
                label=label, path=name, split="train" if train else "validation",
                is_query="" if train else str(role != 1), is_gallery="" if train else str(role != 0),
                category="even" if label % 2 == 0 else "odd",
            ))  # fmt: skip
    path = tmp_path / "df.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _to_vector(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(-1) / 255.0)


def test_a_dataframe_with_query_and_gallery_rows_is_evaluated_against_a_plain_loop(tmp_path):
    """The benchmark's path: the test split of a dataframe, as the benchmark holds it (a
    relabelled subset), embedded (an identity network: the pixels, L2-normalised) and evaluated."""
    from pml_proxies.benchmark.config import BenchmarkConfig

    table = read_dataframe(_dataframe(tmp_path))
    base = RetrievalDataset(table, "test", transform=_to_vector)
    test = RelabeledSubset(base, np.arange(len(base)), {c: c for c in range(base.num_classes)})
    rows = eval_rows(test)
    assert rows is not None and rows.categories is not None
    assert (rows.is_query & ~rows.is_gallery).any() and (~rows.is_query & rows.is_gallery).any()
    config = BenchmarkConfig(dataset="digits", device="cpu", eval_batch_size=7)
    calc = calculator()
    acc, emb, labels = evaluate(torch.nn.Identity(), test, calc, config, True, rows)
    vectors = torch.stack([_to_vector(base.load_image(i)) for i in range(len(base))])
    expected_emb = torch.nn.functional.normalize(vectors, dim=1).numpy()
    assert np.allclose(emb.numpy(), expected_emb, atol=1e-6)
    assert_close(acc, plain_loop(expected_emb, labels.numpy(), rows.is_query, rows.is_gallery))
    by_category = category_metrics(calc, emb, labels, rows)
    for name in ("even", "odd"):
        expected = plain_loop(expected_emb, labels.numpy(), rows.is_query, rows.is_gallery,
                              rows.categories == name)  # fmt: skip
        assert_close(by_category[name], expected)


def test_in_shop_test_split_names_its_own_query_and_gallery_images(tmp_path):
    from test_datasets import make_inshop

    from pml_proxies.datasets import get_dataset

    make_inshop(tmp_path / "inshop")
    test = get_dataset("inshop", "test", root=tmp_path)
    subset = RelabeledSubset(test, np.arange(len(test)), {0: 0, 1: 1})
    rows = eval_rows(subset)
    assert rows is not None and rows.categories is None
    assert rows.is_query.tolist() == [True, False, False, True]
    assert rows.is_gallery.tolist() == [False, True, True, False]  # the In-Shop protocol
    assert get_dataset("inshop", "gallery", root=tmp_path).is_gallery.all()
    assert not get_dataset("inshop", "query", root=tmp_path).is_gallery.any()


# ------------------------------------------------------------------ Recall@k defaults
@pytest.mark.parametrize(
    "dataset, ks",
    [("sop", [1, 10, 100, 1000]), ("inshop", [1, 10, 20, 30, 40, 50]), ("cub200", [1, 2, 4, 8]),
     ("cars196", [1, 2, 4, 8])],
)  # fmt: skip
def test_recall_ks_follow_the_data_set_convention_and_are_recorded(dataset, ks):
    from pml_proxies.benchmark.config import BenchmarkConfig

    config = BenchmarkConfig(dataset=dataset, device="cpu")
    assert config.recall_ks == ks and config.protocol()["recall_ks"] == ks
    given = BenchmarkConfig(dataset=dataset, device="cpu", recall_ks=[3, 5])
    assert given.recall_ks == [3, 5]


@pytest.mark.parametrize("dataset", ["digits", "omniglot"])
def test_the_other_sets_keep_the_protocol_of_folders_made_before(dataset):
    """Folders made before recorded ``recall_ks: [1, 2, 4, 8]`` (then the default for every
    set): the default protocol still equals it, so they are reused, not refused."""
    from pml_proxies.benchmark.config import BenchmarkConfig

    default = BenchmarkConfig(dataset=dataset, device="cpu")
    explicit = BenchmarkConfig(dataset=dataset, device="cpu", recall_ks=[1, 2, 4, 8])
    assert default.protocol() == explicit.protocol()
    assert default.fingerprint("mpa") == explicit.fingerprint("mpa")


# ------------------------------------------------------------------ result.json and the report
def _result(loss: str, seed: int, by_category: dict | None) -> dict:
    result = {
        "loss": loss, "seed": seed, "best_epoch": 1, "best_val_score": 0.5, "train_time_s": 1.0,
        "iterations": 4, "batch_size": 8, "m_per_class": 2,
        "test": {"precision_at_1": 0.5 + 0.1 * seed, "mean_average_precision_at_r": 0.25},
        "history": [], "loss_kwargs": {}, "config_fingerprint": "x", "command": "c",
    }  # fmt: skip
    if by_category is not None:
        result["test_by_category"] = by_category
    return result


def test_result_schema_takes_per_category_metrics_and_old_results_stay_valid():
    from pml_proxies.benchmark.schema import schema_problem
    from pml_proxies.benchmark.store import ResultRecord

    assert schema_problem(_result("mpa", 0, None), ResultRecord) is None
    good = _result("mpa", 0, {"shoes": {"precision_at_1": 0.5}})
    assert schema_problem(good, ResultRecord) is None
    bad = _result("mpa", 0, {"shoes": {"precision_at_1": "high"}})
    assert schema_problem(bad, ResultRecord) == (
        "'test_by_category.shoes.precision_at_1' is \"high\", expected a number"
    )


def test_the_report_tables_per_category_and_runs_csv_is_unchanged():
    from pml_proxies.benchmark.report import category_markdown, category_runs_table, runs_table

    plain = [_result(loss, s, None) for loss in ("proxy_anchor", "mpa") for s in (0, 1)]
    assert category_runs_table(plain) is None
    with_categories = [
        _result(r["loss"], r["seed"], {"shoes": {"precision_at_1": 0.1 * r["seed"],
                                                 "mean_average_precision_at_r": 0.2},
                                       "bags": {"precision_at_1": 0.9,
                                                "mean_average_precision_at_r": 0.3}})
        for r in plain
    ]  # fmt: skip
    assert runs_table(with_categories).equals(runs_table(plain))
    table = category_runs_table(with_categories)
    assert table is not None
    assert list(table.columns) == ["loss", "seed", "category", "best_epoch", "train_time_s",
                                   "precision_at_1", "mean_average_precision_at_r"]  # fmt: skip
    assert len(table) == 8
    shoes = table[(table["category"] == "shoes") & (table["seed"] == 1)]
    assert shoes["precision_at_1"].tolist() == [0.1, 0.1]
    markdown = category_markdown(table, ["proxy_anchor", "mpa"])
    assert markdown.index("### bags") < markdown.index("### shoes")
    bags = markdown.split("### shoes")[0]
    assert "| proxy_anchor | 2 | 90.0 ± 0.0 | 30.0 ± 0.0 |" in bags
