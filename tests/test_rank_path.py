"""The positive-rank path of the AccuracyCalculator (k=None and large k): every metric equals the
neighbour-list path and PML's calculator on tie-free data, and a plain-loop reference with the
documented tie rule (a negative tied with a positive ranks first) on data full of ties."""

import math

import metric_helpers
import numpy as np
import pytest
import torch
from metric_helpers import CPU, OURS, PML_KNN_METRICS, TINY_MB
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac

from pml_proxies.utils import accuracy_calculator as ac_module
from pml_proxies.utils.accuracy_calculator import AccuracyCalculator
from pml_proxies.utils.knn import DefaultKNN, TorchKNN

ALL = PML_KNN_METRICS + OURS
# MAP and MAP@R sum each query's precisions with torch.sum over another layout on each path
# (the kernel's order): at most a few ulps of values <= 1 per query, so 1e-12 absolute is ample
SUM_ORDER_ATOL = 1e-12
# counts, and nDCG's running sums (zeros of non-relevant ranks add exactly): the same bits
EXACT = ("precision_at_1", "r_precision", "mean_reciprocal_rank") + OURS


class NeighbourListKNN(TorchKNN):
    """TorchKNN under another type: a user's knn_func, so the neighbour-list path is taken."""


def make_data(self_retrieval, seed=0, n_query=60, n_ref=150, dim=6, dtype=torch.float32):
    """Tie-free clustered data with lone queries: a singleton class in self-retrieval, a query
    class absent from the references otherwise."""
    g = torch.Generator().manual_seed(seed)
    rl = torch.randint(0, 7, (n_ref,), generator=g)
    rl[0] = 50
    centers = torch.randn(8, dim, generator=g, dtype=dtype)
    r = centers[rl % 8] + torch.randn(n_ref, dim, generator=g, dtype=dtype)
    if self_retrieval:
        return r, rl, r, rl
    ql = torch.randint(0, 8, (n_query,), generator=g)  # class 7 is not among the references
    q = centers[ql] + torch.randn(n_query, dim, generator=g, dtype=dtype)
    return q, ql, r, rl


def calc(**kwargs):
    kwargs.setdefault("include", ALL)
    return metric_helpers.calc(**kwargs)


def assert_close(a, b, exact=EXACT):
    assert a.keys() == b.keys()
    for name in a:
        x, y = np.asarray(a[name], dtype=float), np.asarray(b[name], dtype=float)
        if name in exact:
            assert np.array_equal(x, y, equal_nan=True), (name, a[name], b[name])
        else:
            assert np.allclose(x, y, rtol=0, atol=SUM_ORDER_ATOL, equal_nan=True), name


@pytest.mark.parametrize("self_retrieval", [True, False], ids=["self", "query-vs-ref"])
@pytest.mark.parametrize("k", [None, 40, 120], ids=["k-None", "k40", "k120"])
@pytest.mark.parametrize(
    "averaging", [{}, {"avg_of_avgs": True}, {"return_per_class": True}], ids=["mean", "avg", "cls"]
)
def test_rank_path_equals_neighbour_path_and_pml(self_retrieval, k, averaging, dtype, monkeypatch):
    monkeypatch.setattr(ac_module, "RANK_PATH_MIN_FRACTION", 0.05)  # k = 40, 120: "large" here
    q, ql, r, rl = make_data(self_retrieval, dtype=dtype)
    ranked = calc(k=k, memory_budget_mb=TINY_MB, **averaging)
    assert ranked.rank_chunk_size(len(r), 40) * 5 < len(q)  # many chunks
    acc = ranked.get_accuracy(q, ql, r, rl, self_retrieval)
    assert ranked.last_path == "rank"
    listed = calc(k=k, knn_func=NeighbourListKNN(), **averaging)
    expected = listed.get_accuracy(q, ql, r, rl, self_retrieval)
    assert listed.last_path == "neighbours"
    assert_close(acc, expected)
    pml = pml_ac.AccuracyCalculator(
        k=k, include=PML_KNN_METRICS, device=CPU, knn_func=TorchKNN(), **averaging
    ).get_accuracy(q, ql, r, rl, self_retrieval)
    assert_close({m: acc[m] for m in PML_KNN_METRICS}, pml)


def test_rank_path_with_the_default_knn_and_one_query_per_chunk():
    q, ql, r, rl = make_data(False, seed=1)
    ranked = calc(k=None, knn_func=DefaultKNN(), memory_budget_mb=1e-6)
    assert ranked.rank_chunk_size(len(r), 40) == 1
    acc = ranked.get_accuracy(q, ql, r, rl)
    assert ranked.last_path == "rank"
    assert_close(acc, calc(k=None, knn_func=NeighbourListKNN()).get_accuracy(q, ql, r, rl))


def test_path_choice():
    q, ql, r, rl = make_data(True, seed=2)
    chosen = {}
    for name, kwargs in {
        "default": {},
        "small k": {"k": 5},
        "k of 2/3 of the references": {"k": 100},
        "only recall@8": {"include": ("recall_at_8",)},
        "custom knn": {"knn_func": NeighbourListKNN()},
        "custom comparison": {"label_comparison_fn": lambda a, b: a == b},
    }.items():
        c = calc(k=kwargs.pop("k", None), **kwargs)
        c.get_accuracy(q, ql)
        chosen[name] = c.last_path
    two_d = calc(k=None)
    two_d.get_accuracy(q, ql[:, None])
    chosen["2-D labels"] = two_d.last_path
    assert chosen == {
        "default": "rank",
        "small k": "neighbours",
        "k of 2/3 of the references": "rank",
        "only recall@8": "neighbours",
        "custom knn": "neighbours",
        "custom comparison": "neighbours",
        "2-D labels": "neighbours",
    }


class WithCustomKNNMetric(AccuracyCalculator):
    def requires_knn(self):
        return super().requires_knn() + ["label_sum"]

    def calculate_label_sum(self, knn_labels, not_lone_query_mask, **kwargs):
        return float(knn_labels[not_lone_query_mask].sum())


def test_a_metric_that_needs_the_neighbour_list_falls_back():
    q, ql, _, _ = make_data(True, seed=3)
    sub = WithCustomKNNMetric(k=None, include=("label_sum", "r_precision"), device=CPU)
    sub.get_accuracy(q, ql)
    assert sub.last_path == "neighbours"


def test_lone_queries_only():
    q, ql, r, rl = make_data(False, seed=4)
    acc = calc(k=None).get_accuracy(q, torch.full_like(ql, 7), r, rl)
    assert all(math.isnan(v) for v in acc.values())


# ------------------------------------------------------------------- ties: plain-loop reference


def reference_metrics(q, ql, r, rl, self_retrieval, k, recall_ks=(1, 2, 4, 8), ndcg_ks=(3, 10)):
    """Every metric from its definition, ranking by exact squared distance and, on a tie, a
    non-matching reference before a matching one (the rank path's documented rule)."""
    q, r = q.double().tolist(), r.double().tolist()
    ql, rl = ql.tolist(), rl.tolist()
    available = len(r) - int(self_retrieval)
    pml_k = available if k is None else min(k, available)
    out = {name: [] for name in ALL}
    for i, (x, label) in enumerate(zip(q, ql)):
        keys = []
        for j, (y, other) in enumerate(zip(r, rl)):
            if self_retrieval and j == i:
                continue
            distance = sum((a - b) ** 2 for a, b in zip(x, y))
            keys.append((distance, other == label))  # False < True: negatives first on ties
        rel = [is_rel for _, is_rel in sorted(keys)]
        big_r = sum(rel)
        if big_r == 0:
            continue
        seen = rel[:pml_k]
        out["precision_at_1"].append(float(seen[0]))
        limit = min(big_r, pml_k)
        out["r_precision"].append(sum(seen[:limit]) / limit)
        for name, cut in (
            ("mean_average_precision_at_r", limit),
            ("mean_average_precision", pml_k),
        ):
            hits, total = 0, 0.0
            for rank, is_rel in enumerate(seen[:cut], start=1):
                hits += is_rel
                total += hits / rank if is_rel else 0.0
            out[name].append(total / big_r)
        out["mean_reciprocal_rank"].append(1.0 / (seen.index(True) + 1) if any(seen) else 0.0)
        for c in recall_ks:
            out[f"recall_at_{c}"].append(float(any(rel[:c])))
        for c in ndcg_ks:
            dcg = sum(1 / math.log2(p + 2) for p, is_rel in enumerate(rel[:c]) if is_rel)
            ideal = sum(1 / math.log2(p + 2) for p in range(min(c, big_r)))
            out[f"ndcg_at_{c}"].append(dcg / ideal)
    return {name: float(np.mean(v)) for name, v in out.items()}


def tied_data(self_retrieval, seed, dtype):
    """Small-integer embeddings (every distance exact, many equal) with duplicated points of the
    same and of different labels."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-1, 2, (90, 3), generator=g).to(dtype)
    rl = torch.randint(0, 5, (90,), generator=g)
    r[10:20] = r[0]  # duplicates of one point, labels mixed
    rl[15:20] = rl[0]
    r[30:34], rl[30:34] = r[1], rl[1]  # duplicates with one label
    rl[89] = 9  # a lone label
    if self_retrieval:
        return r, rl, r, rl
    q = torch.cat([r[:25], torch.randint(-1, 2, (15, 3), generator=g).to(dtype)])
    ql = torch.cat([rl[:25], torch.randint(0, 6, (15,), generator=g)])  # 5 is absent
    return q, ql, r, rl


@pytest.mark.parametrize("self_retrieval", [True, False], ids=["self", "query-vs-ref"])
@pytest.mark.parametrize("k", [None, 12], ids=["k-None", "k12"])
def test_ties_follow_the_pessimistic_rule(self_retrieval, k, dtype, monkeypatch):
    monkeypatch.setattr(ac_module, "RANK_PATH_MIN_FRACTION", 0.05)
    q, ql, r, rl = tied_data(self_retrieval, seed=5, dtype=dtype)
    ranked = calc(k=k, memory_budget_mb=TINY_MB)
    acc = ranked.get_accuracy(q, ql, r, rl, self_retrieval)
    assert ranked.last_path == "rank"
    expected = reference_metrics(q, ql, r, rl, self_retrieval, k)
    for name, value in expected.items():
        tol = 1e-6 if name == "mean_reciprocal_rank" else SUM_ORDER_ATOL  # float32, as PML
        assert acc[name] == pytest.approx(value, abs=tol), name


def test_positive_positions_by_hand():
    """One query, scores ||r||^2 - 2 q.r of references at 1-D points: positives at 0 and 2,
    a negative tied with the second positive, so it ranks first."""
    query = torch.tensor([[0.0]])
    reference = torch.tensor([[0.0], [1.0], [2.0], [2.0], [3.0], [-1.0]])  # labels 1 0 1 0 0 0
    positives = torch.tensor([[0, 2, 0]])  # padded with a positive
    positions, valid = ac_module._positive_positions(
        query, reference.t(), reference.pow(2).sum(1), positives, torch.tensor([2]), None
    )
    # order: r0 (pos, 0), r1 and r5 tied (1), r3 before r2 on the tie (4), r4
    assert valid.tolist() == [[True, True, False]]
    assert positions[valid].tolist() == [0, 4]


def test_queries_that_are_the_first_references():
    """ref_includes_query with more references than queries: each query's own index is skipped."""
    q, ql, r, rl = make_data(True, seed=6)
    ranked = calc(k=None, memory_budget_mb=TINY_MB)
    acc = ranked.get_accuracy(q[:40], ql[:40], r, rl, True)
    assert ranked.last_path == "rank"
    listed = calc(k=None, knn_func=NeighbourListKNN())
    assert_close(acc, listed.get_accuracy(q[:40], ql[:40], r, rl, True))
    pml = pml_ac.AccuracyCalculator(
        k=None, include=PML_KNN_METRICS, device=CPU, knn_func=TorchKNN()
    ).get_accuracy(q[:40], ql[:40], r, rl, True)
    assert_close({m: acc[m] for m in PML_KNN_METRICS}, pml)
