"""nDCG@k / Recall@k AccuracyCalculator and the faiss-free kNN back-end."""

import math
import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils import inference as pml_inference
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator as PMLAccuracyCalculator,
)
from sklearn.metrics import ndcg_score

from pml_proxies.utils import knn as knn_module
from pml_proxies.utils.accuracy_calculator import AccuracyCalculator
from pml_proxies.utils.knn import DefaultKNN, TorchKNN

CPU = torch.device("cpu")
PML_METRICS = (
    "precision_at_1",
    "mean_average_precision",
    "mean_average_precision_at_r",
    "mean_reciprocal_rank",
    "r_precision",
)


def has_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


needs_faiss = pytest.mark.skipif(not has_faiss(), reason="faiss is not installed")


@pytest.fixture
def no_faiss(monkeypatch):
    """Simulate an environment without faiss: `import faiss` fails, PML's global is gone."""
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.delattr(pml_inference, "faiss", raising=False)


def make_data(self_retrieval, seed=0, n_query=50, n_ref=120, dim=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if self_retrieval:
        x = torch.randn(n_ref, dim, generator=g, dtype=dtype)
        y = torch.randint(0, 9, (n_ref,), generator=g)
        y[0] = 99  # a singleton class: its query has R_q = 0
        return x, y, x, y
    q = torch.randn(n_query, dim, generator=g, dtype=dtype)
    r = torch.randn(n_ref, dim, generator=g, dtype=dtype)
    ql = torch.randint(0, 9, (n_query,), generator=g)
    rl = torch.randint(0, 8, (n_ref,), generator=g)  # query class 8 is absent from the reference
    return q, ql, r, rl


def brute_force_rankings(query, query_labels, reference, reference_labels, self_retrieval):
    """Per query: (relevance of every reference in rank order, R_q, -distances, relevance)."""
    q = query.double().numpy()
    r = reference.double().numpy()
    query_labels, reference_labels = query_labels.tolist(), reference_labels.tolist()
    out = []
    for i in range(len(q)):
        candidates = [j for j in range(len(r)) if not (self_retrieval and j == i)]
        dist = {}
        for j in candidates:
            dist[j] = float(np.sum((q[i] - r[j]) ** 2))
        order = sorted(candidates, key=lambda j: dist[j])
        relevance = [int(reference_labels[j] == query_labels[i]) for j in order]
        unordered_rel = [int(reference_labels[j] == query_labels[i]) for j in candidates]
        scores = [-dist[j] for j in candidates]
        out.append((relevance, sum(relevance), scores, unordered_rel))
    return out


def brute_ndcg(relevance, num_relevant, k):
    dcg = 0.0
    for i in range(min(k, len(relevance))):
        dcg += (2 ** relevance[i] - 1) / math.log2(i + 2)
    idcg = 0.0
    for i in range(min(k, num_relevant)):
        idcg += 1.0 / math.log2(i + 2)
    return dcg / idcg


def brute_metrics(rankings, query_labels, recall_ks, ndcg_ks, avg_of_avgs=False):
    per_query = {}
    for k in recall_ks:
        per_query[f"recall_at_{k}"] = [
            (float(any(rel[:k])), lab) for (rel, rq, _, _), lab in zip(rankings, query_labels) if rq
        ]
    for k in ndcg_ks:
        per_query[f"ndcg_at_{k}"] = [
            (brute_ndcg(rel, rq, k), lab)
            for (rel, rq, _, _), lab in zip(rankings, query_labels)
            if rq
        ]
    result = {}
    for name, values in per_query.items():
        if not avg_of_avgs:
            result[name] = sum(v for v, _ in values) / len(values)
        else:
            classes = sorted({int(lab) for _, lab in values})
            means = []
            for c in classes:
                vals = [v for v, lab in values if int(lab) == c]
                means.append(sum(vals) / len(vals))
            result[name] = sum(means) / len(means)
    return result


# ----------------------------------------------------------------------------- paper, Table 3

TABLE3 = [
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 39.0, 25.0),
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], 50.3, 25.0),
    ([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], 58.6, 41.7),
    ([1, 0, 1, 0, 0, 0, 1, 0, 0, 1], 82.9, 41.7),
    ([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], 100.0, 100.0),
]


@pytest.mark.parametrize("self_retrieval", [False, True], ids=["query-vs-ref", "self"])
@pytest.mark.parametrize("row,ndcg10,map_at_r", TABLE3)
def test_paper_table3(row, ndcg10, map_at_r, self_retrieval):
    # One query at 0 (label 0) on a line; the i-th reference at distance i. R_q = 4 positives:
    # those in the row, the rest right after rank 10.
    positions = list(range(1, 11))
    labels = [0 if rel else 1 for rel in row]
    for extra in range(4 - sum(row)):
        positions.append(11 + extra)
        labels.append(0)
    positions.append(20)  # one more negative beyond
    labels.append(1)
    query = torch.zeros(1, 2)
    query_labels = torch.tensor([0])
    reference = torch.tensor([[p, 0.0] for p in positions])
    reference_labels = torch.tensor(labels)
    if self_retrieval:
        reference = torch.cat([query, reference])
        reference_labels = torch.cat([query_labels, reference_labels])
    calc = AccuracyCalculator(
        include=("ndcg_at_10", "recall_at_10", "mean_average_precision_at_r"),
        recall_ks=(10,),
        ndcg_ks=(10,),
        device=CPU,
        knn_func=TorchKNN(),
    )
    acc = calc.get_accuracy(query, query_labels, reference, reference_labels, self_retrieval)
    assert round(100 * acc["ndcg_at_10"], 1) == ndcg10
    assert acc["recall_at_10"] == 1.0  # Table 3: Recall@10 = 100 for every ranking
    assert round(100 * acc["mean_average_precision_at_r"], 1) == map_at_r  # the ranking is right


# ---------------------------------------------------------------- brute force and scikit-learn


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
@pytest.mark.parametrize("self_retrieval", [False, True], ids=["query-vs-ref", "self"])
@pytest.mark.parametrize("k", [None, 3, "max_bin_count"])
def test_matches_brute_force(backend, self_retrieval, k):
    q, ql, r, rl = make_data(self_retrieval)
    recall_ks, ndcg_ks = (1, 2, 4, 8), (1, 5, 10, 30)
    knn_func = TorchKNN() if backend == "torch" else pml_inference.FaissKNN()
    calc = AccuracyCalculator(
        k=k, recall_ks=recall_ks, ndcg_ks=ndcg_ks, device=CPU, knn_func=knn_func
    )
    acc = calc.get_accuracy(q, ql, r, rl, ref_includes_query=self_retrieval)
    expected = brute_metrics(
        brute_force_rankings(q, ql, r, rl, self_retrieval), ql, recall_ks, ndcg_ks
    )
    for name, value in expected.items():
        assert acc[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert acc["recall_at_1"] == acc["precision_at_1"]


@pytest.mark.parametrize("self_retrieval", [False, True], ids=["query-vs-ref", "self"])
def test_avg_of_avgs_and_per_class(self_retrieval):
    q, ql, r, rl = make_data(self_retrieval, seed=1)
    rankings = brute_force_rankings(q, ql, r, rl, self_retrieval)
    expected = brute_metrics(rankings, ql, (2,), (10,), avg_of_avgs=True)
    include = ("recall_at_2", "ndcg_at_10")
    calc = AccuracyCalculator(
        include=include, avg_of_avgs=True, recall_ks=2, device=CPU, knn_func=TorchKNN()
    )
    acc = calc.get_accuracy(q, ql, r, rl, ref_includes_query=self_retrieval)
    for name in include:
        assert acc[name] == pytest.approx(expected[name], rel=1e-12)
    per_class = AccuracyCalculator(
        include=include, return_per_class=True, recall_ks=2, device=CPU, knn_func=TorchKNN()
    ).get_accuracy(q, ql, r, rl, ref_includes_query=self_retrieval)
    classes = sorted({int(c) for c, (_, rq, _, _) in zip(ql, rankings) if rq})
    for name in include:
        assert len(per_class[name]) == len(classes)
        assert np.nanmean(per_class[name]) == pytest.approx(expected[name], rel=1e-12)


@pytest.mark.parametrize("self_retrieval", [False, True], ids=["query-vs-ref", "self"])
@pytest.mark.parametrize("k", [1, 5, 10, 200])
def test_ndcg_matches_sklearn(self_retrieval, k):
    q, ql, r, rl = make_data(self_retrieval, seed=2)
    rankings = brute_force_rankings(q, ql, r, rl, self_retrieval)
    reference = [
        ndcg_score([rel], [scores], k=k, ignore_ties=True)
        for (_, rq, scores, rel) in rankings
        if rq
    ]
    calc = AccuracyCalculator(
        include=(f"ndcg_at_{k}",), ndcg_ks=(k,), device=CPU, knn_func=TorchKNN()
    )
    acc = calc.get_accuracy(q, ql, r, rl, ref_includes_query=self_retrieval)
    assert acc[f"ndcg_at_{k}"] == pytest.approx(float(np.mean(reference)), rel=1e-10)


def test_mean_reciprocal_rank_alone():
    q, ql, r, rl = make_data(False, seed=3)
    rankings = brute_force_rankings(q, ql, r, rl, False)
    expected = np.mean([1.0 / (rel.index(1) + 1) for rel, rq, _, _ in rankings if rq])
    acc = AccuracyCalculator(
        include=("mean_reciprocal_rank",), device=CPU, knn_func=TorchKNN()
    ).get_accuracy(q, ql, r, rl)
    assert acc == {"mean_reciprocal_rank": pytest.approx(expected, rel=1e-6)}


def test_all_queries_lone_gives_nan():
    q, ql, r, rl = make_data(False, seed=4)
    acc = AccuracyCalculator(
        include=("recall_at_1", "ndcg_at_10"), device=CPU, knn_func=TorchKNN()
    ).get_accuracy(q, torch.full_like(ql, 50), r, rl)
    assert math.isnan(acc["recall_at_1"]) and math.isnan(acc["ndcg_at_10"])


# ------------------------------------------------------------------------- PML's own metrics


@pytest.mark.parametrize("self_retrieval", [False, True], ids=["query-vs-ref", "self"])
@pytest.mark.parametrize("k", [None, 3, "max_bin_count"])
def test_pml_metrics_unchanged(self_retrieval, k):
    q, ql, r, rl = make_data(self_retrieval, seed=5)
    knn_func = pml_inference.FaissKNN() if has_faiss() else TorchKNN()
    kwargs = dict(k=k, device=CPU, knn_func=knn_func, include=PML_METRICS)
    expected = PMLAccuracyCalculator(**kwargs).get_accuracy(q, ql, r, rl, self_retrieval)
    acc = AccuracyCalculator(**{**kwargs, "include": ()}, ndcg_ks=(10, 20)).get_accuracy(
        q, ql, r, rl, self_retrieval
    )
    for name in PML_METRICS:
        assert acc[name] == expected[name], name


@needs_faiss
def test_pml_clustering_metrics_unchanged():
    q, ql, r, rl = make_data(True, seed=6, n_ref=400)
    include = ("NMI", "AMI", "precision_at_1")
    expected = PMLAccuracyCalculator(include=include, device=CPU).get_accuracy(q, ql)
    acc = AccuracyCalculator(include=include, device=CPU).get_accuracy(q, ql)
    assert acc == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------- one widened search


class SpyKNN:
    def __init__(self):
        self.calls = []
        self.knn = TorchKNN()

    def __call__(self, query, k, reference, ref_includes_query=False):
        self.calls.append(k)
        return self.knn(query, k, reference, ref_includes_query)


@pytest.mark.parametrize(
    "k,include,num_classes,expected_k",
    [
        (1, (), 6, 10),  # widened from PML's k to the largest cut-off
        (None, (), 6, 119),  # PML's k=None already ranks every reference
        ("max_bin_count", (), 6, 20),  # largest class (21) minus the query itself: not widened
        ("max_bin_count", (), 40, 10),  # classes of 3: widened
        (None, ("recall_at_2", "ndcg_at_10"), 6, 10),  # only the new metrics: no full ranking
        (None, ("recall_at_2",), 6, 2),
        (None, ("recall_at_2", "mean_reciprocal_rank"), 6, 119),
    ],
)
def test_single_widened_search(k, include, num_classes, expected_k):
    q, _, _, _ = make_data(True, seed=7)
    ql = torch.arange(120) % num_classes
    ql[1] = 0  # with 6 classes, class 0 has 21 members
    spy = SpyKNN()
    calc = AccuracyCalculator(
        k=k, include=include, recall_ks=(1, 2, 8), ndcg_ks=10, device=CPU, knn_func=spy
    )
    acc = calc.get_accuracy(q, ql)
    assert spy.calls == [expected_k + 1]  # self-retrieval: the query itself, removed afterwards
    expected = brute_metrics(
        brute_force_rankings(q, ql, q, ql, True),
        ql,
        [c for c in (1, 2, 8) if not include or f"recall_at_{c}" in include],
        [10] if not include or "ndcg_at_10" in include else [],
    )
    for name, value in expected.items():
        assert acc[name] == pytest.approx(value, rel=1e-12), name


def test_cut_off_beyond_reference_size_is_capped():
    q, ql, r, rl = make_data(True, seed=8)
    spy = SpyKNN()
    calc = AccuracyCalculator(
        include=("ndcg_at_1000", "recall_at_500"),
        ndcg_ks=1000,
        recall_ks=500,
        device=CPU,
        knn_func=spy,
    )
    acc = calc.get_accuracy(q, ql)
    assert spy.calls == [120]  # 119 others and the query itself
    expected = brute_metrics(brute_force_rankings(q, ql, q, ql, True), ql, (500,), (1000,))
    assert acc["ndcg_at_1000"] == pytest.approx(expected["ndcg_at_1000"], rel=1e-12)
    assert acc["recall_at_500"] == 1.0


# ---------------------------------------------------------------------- names and arguments


def test_default_metric_names():
    calc = AccuracyCalculator(device=CPU)
    names = set(calc.get_curr_metrics())
    assert {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "ndcg_at_10"} <= names
    assert set(PMLAccuracyCalculator(device=CPU, knn_func=TorchKNN()).get_curr_metrics()) <= names
    assert "mean_reciprocal_rank" in calc.requires_knn()
    assert {"recall_at_8", "ndcg_at_10"} <= set(calc.requires_knn())


def test_include_exclude():
    q, ql, r, rl = make_data(False, seed=9)
    calc = AccuracyCalculator(
        include=("ndcg_at_10", "recall_at_2"), device=CPU, knn_func=TorchKNN()
    )
    assert set(calc.get_accuracy(q, ql, r, rl)) == {"ndcg_at_10", "recall_at_2"}
    calc = AccuracyCalculator(
        exclude=("NMI", "AMI", "recall_at_1", "ndcg_at_5"),
        ndcg_ks=(5, 10),
        device=CPU,
        knn_func=TorchKNN(),
    )
    keys = set(calc.get_accuracy(q, ql, r, rl))
    assert keys == set(PML_METRICS) | {"recall_at_2", "recall_at_4", "recall_at_8", "ndcg_at_10"}
    per_call = calc.get_accuracy(q, ql, r, rl, include=("recall_at_4",), exclude=())
    assert set(per_call) == {"recall_at_4"}
    calc = AccuracyCalculator(recall_ks=(), ndcg_ks=None, device=CPU, knn_func=TorchKNN())
    assert not any(m.startswith(("recall_at_", "ndcg_at_")) for m in calc.get_curr_metrics())
    with pytest.raises(ValueError):
        AccuracyCalculator(include=("ndcg_at_5",), device=CPU)  # not in ndcg_ks
    with pytest.raises(ValueError):
        AccuracyCalculator(exclude=("recall_at_3",), device=CPU)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"recall_ks": (0,)},
        {"recall_ks": (1, -2)},
        {"recall_ks": -1},
        {"ndcg_ks": 0},
        {"ndcg_ks": (10, 0)},
        {"ndcg_ks": (2.5,)},
        {"ndcg_ks": ("10",)},
        {"ndcg_ks": "10"},
        {"recall_ks": (True,)},
    ],
)
def test_bad_cut_offs(kwargs):
    with pytest.raises(ValueError, match="recall_ks|ndcg_ks"):
        AccuracyCalculator(device=CPU, **kwargs)


def test_exports():
    import pml_proxies.utils

    assert pml_proxies.AccuracyCalculator is AccuracyCalculator
    assert pml_proxies.utils.AccuracyCalculator is AccuracyCalculator
    assert issubclass(AccuracyCalculator, PMLAccuracyCalculator)


# ------------------------------------------------------------------------------ kNN back-ends


@needs_faiss
@pytest.mark.parametrize("self_retrieval", [False, True], ids=["query-vs-ref", "self"])
@pytest.mark.parametrize("batch_size", [None, 7])
def test_torch_knn_matches_faiss(self_retrieval, batch_size, dtype):
    q, _, r, _ = make_data(self_retrieval, seed=10, n_ref=300, dim=16, dtype=dtype)
    k = 25
    d_faiss, i_faiss = pml_inference.FaissKNN()(q, k, r, self_retrieval)
    d_torch, i_torch = TorchKNN(batch_size=batch_size)(q, k, r, self_retrieval)
    assert d_torch.shape == (len(q), k) and i_torch.dtype == torch.long
    assert torch.equal(i_torch, i_faiss.long())
    torch.testing.assert_close(d_torch.float(), d_faiss.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("self_retrieval", [False, True], ids=["query-vs-ref", "self"])
def test_torch_knn_brute_force_and_chunks(self_retrieval, dtype):
    q, ql, r, rl = make_data(self_retrieval, seed=11, dtype=dtype)
    k = 12
    rankings = []
    for i in range(len(q)):
        dist = [(float(((q[i] - r[j]) ** 2).sum()), j) for j in range(len(r))]
        dist = [(d, j) for d, j in dist if not (self_retrieval and j == i)]
        rankings.append(sorted(dist)[:k])
    expected_idx = torch.tensor([[j for _, j in row] for row in rankings])
    expected_dist = torch.tensor([[d for d, _ in row] for row in rankings], dtype=dtype)
    for knn in (TorchKNN(), TorchKNN(batch_size=1), TorchKNN(max_chunk_elements=1000)):
        dist, idx = knn(q, k, r, self_retrieval)
        assert torch.equal(idx, expected_idx)
        assert dist.dtype == dtype
        torch.testing.assert_close(dist, expected_dist, rtol=1e-4, atol=1e-4)


def test_torch_knn_errors():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="reference"):
        TorchKNN()(x, 2)
    with pytest.raises(ValueError, match="k=5"):
        TorchKNN()(x, 5, x, True)
    with pytest.raises(ValueError, match="embedding size"):
        TorchKNN()(x, 2, torch.randn(5, 4))
    with pytest.raises(ValueError, match="batch_size"):
        TorchKNN(batch_size=0)


def test_without_faiss(no_faiss):
    assert not knn_module.faiss_available()
    with pytest.raises(NameError):  # what PML does without faiss
        PMLAccuracyCalculator(device=CPU)
    q, ql, r, rl = make_data(False, seed=12)
    calc = AccuracyCalculator(device=CPU, exclude=("NMI", "AMI"), k=3)
    acc = calc.get_accuracy(q, ql, r, rl)
    assert calc.knn_func.last_backend == "torch"
    expected = brute_metrics(brute_force_rankings(q, ql, r, rl, False), ql, (1, 2, 4, 8), (10,))
    for name, value in expected.items():
        assert acc[name] == pytest.approx(value, rel=1e-12), name
    # clustering metrics fall back to scikit-learn k-means: well separated classes give NMI = 1
    g = torch.Generator().manual_seed(13)
    labels = torch.arange(60) % 4
    x = 20 * torch.eye(8)[labels] + 0.1 * torch.randn(60, 8, generator=g)
    calc = AccuracyCalculator(device=CPU, include=("NMI", "AMI", "recall_at_1"))
    acc = calc.get_accuracy(x, labels)
    assert calc.kmeans_func.last_backend == "sklearn"
    assert acc == {"NMI": pytest.approx(1.0), "AMI": pytest.approx(1.0), "recall_at_1": 1.0}


@needs_faiss
def test_with_and_without_faiss_agree(monkeypatch):
    q, ql, r, rl = make_data(True, seed=14)
    calc = AccuracyCalculator(device=CPU, exclude=("NMI", "AMI"), k="max_bin_count")
    with_faiss = calc.get_accuracy(q, ql)
    assert calc.knn_func.last_backend == "faiss"
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.delattr(pml_inference, "faiss")
    without_faiss = calc.get_accuracy(q, ql)
    assert calc.knn_func.last_backend == "torch"
    assert without_faiss == pytest.approx(with_faiss, rel=1e-12)


def test_explicit_knn_func_wins(no_faiss):
    spy = SpyKNN()
    calc = AccuracyCalculator(include=("recall_at_1",), device=CPU, knn_func=spy)
    q, ql, r, rl = make_data(False, seed=15)
    calc.get_accuracy(q, ql, r, rl)
    assert calc.knn_func is spy and spy.calls == [1]
    assert isinstance(AccuracyCalculator(device=CPU).knn_func, DefaultKNN)
