"""Streamed evaluation: every metric over chunks of queries equals the unchunked computation and
PML's calculator; the two-stage exact kNN selection; PML's behaviours kept (k log, list labels)."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from metric_helpers import CPU, OURS, PML_KNN_METRICS, TINY_MB, calc
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils import inference as pml_inference

from pml_proxies.utils import accuracy_calculator as ac_module
from pml_proxies.utils.accuracy_calculator import AccuracyCalculator, ndcg_at_k, recall_at_k
from pml_proxies.utils.knn import TorchKNN, smallest_k


class CountingKNN:
    """TorchKNN that records the (rows, k, ref_includes_query) of every call."""

    def __init__(self):
        self.calls = []
        self.knn = TorchKNN()

    def __call__(self, query, k, reference, ref_includes_query=False):
        self.calls.append((len(query), k, ref_includes_query))
        return self.knn(query, k, reference, ref_includes_query)


def make_data(self_retrieval, seed=0, n_query=60, n_ref=150, dim=6, dtype=torch.float32):
    """Clustered data with a lone class: a singleton in self-retrieval, a query class absent
    from the references otherwise."""
    g = torch.Generator().manual_seed(seed)
    if self_retrieval:
        y = torch.randint(0, 7, (n_ref,), generator=g)
        y[0] = 50
        x = torch.randn(7, dim, generator=g, dtype=dtype)[y % 7] + torch.randn(
            n_ref, dim, generator=g, dtype=dtype
        )
        return x, y, x, y
    ql = torch.randint(0, 8, (n_query,), generator=g)
    rl = torch.randint(0, 7, (n_ref,), generator=g)  # class 7 is lone
    centers = torch.randn(8, dim, generator=g, dtype=dtype)
    q = centers[ql] + torch.randn(n_query, dim, generator=g, dtype=dtype)
    r = centers[rl] + torch.randn(n_ref, dim, generator=g, dtype=dtype)
    return q, ql, r, rl


def same_values(a, b):
    """Exact equality of two metric dicts (NaN == NaN, lists elementwise)."""
    assert a.keys() == b.keys()
    for name in a:
        x, y = np.asarray(a[name], dtype=float), np.asarray(b[name], dtype=float)
        assert np.array_equal(x, y, equal_nan=True), (name, a[name], b[name])


# --------------------------------------------------------------------- streamed == unchunked


@pytest.mark.parametrize("self_retrieval", [True, False], ids=["self", "query-vs-ref"])
@pytest.mark.parametrize("k", [None, 1, 3, "max_bin_count"])
@pytest.mark.parametrize(
    "averaging", [{}, {"avg_of_avgs": True}, {"return_per_class": True}], ids=["mean", "avg", "cls"]
)
def test_streamed_equals_unchunked_and_pml(self_retrieval, k, averaging, dtype):
    q, ql, r, rl = make_data(self_retrieval, dtype=dtype)
    include = PML_KNN_METRICS + OURS
    spy = CountingKNN()
    streamed = calc(
        k=k, include=include, memory_budget_mb=TINY_MB, knn_func=spy, **averaging
    ).get_accuracy(q, ql, r, rl, self_retrieval)
    assert len(spy.calls) >= 5  # many chunks
    assert all(not ref_in for _, _, ref_in in spy.calls)  # own index removed by the calculator
    whole = calc(k=k, include=include, knn_func=CountingKNN(), **averaging).get_accuracy(
        q, ql, r, rl, self_retrieval
    )  # a user's knn_func: the neighbour-list path (tests/test_rank_path.py tests the other)
    same_values(streamed, whole)
    pml = pml_ac.AccuracyCalculator(
        k=k, include=PML_KNN_METRICS, device=CPU, knn_func=TorchKNN(), **averaging
    ).get_accuracy(q, ql, r, rl, self_retrieval)
    same_values({m: streamed[m] for m in PML_KNN_METRICS}, pml)


@pytest.mark.parametrize("self_retrieval", [True, False], ids=["self", "query-vs-ref"])
def test_chunk_sizes_follow_the_budget(self_retrieval):
    q, ql, r, rl = make_data(self_retrieval, seed=1)
    for budget in (0.001, 0.05, 1.0):
        spy = CountingKNN()
        c = calc(k=None, memory_budget_mb=budget, knn_func=spy, exclude=("NMI", "AMI"))
        c.get_accuracy(q, ql, r, rl, self_retrieval)
        num_k = len(r) - int(self_retrieval)
        rows = c.chunk_size(num_k)
        assert rows == max(1, int(budget * 2**20 // ((num_k + 1) * 64)))
        assert [n for n, _, _ in spy.calls] == [
            min(rows, len(q) - s) for s in range(0, len(q), rows)
        ]
        assert {k for _, k, _ in spy.calls} == {num_k + int(self_retrieval)}


def test_lone_and_absent_queries_only():
    q, ql, r, rl = make_data(False, seed=2)
    ql = torch.full_like(ql, 7)  # no query label is in the reference set
    acc = calc(include=PML_KNN_METRICS + OURS, memory_budget_mb=TINY_MB).get_accuracy(q, ql, r, rl)
    assert all(math.isnan(v) for v in acc.values())
    per_class = calc(include=("r_precision", "ndcg_at_10"), return_per_class=True).get_accuracy(
        q, ql, r, rl
    )
    assert all(len(v) == 1 and math.isnan(v[0]) for v in per_class.values())


def test_plain_loop_reference_map_at_r_and_r_precision():
    """MAP@R and R-Precision from their definitions (Musgrave et al., MLRC), streamed."""
    q, ql, _, _ = make_data(True, seed=3)
    acc = calc(k="max_bin_count", memory_budget_mb=TINY_MB, exclude=("NMI", "AMI")).get_accuracy(
        q, ql
    )
    x, labels = q.double().numpy(), ql.tolist()
    map_r, r_prec, mrr, ap_all = [], [], [], []
    for i in range(len(x)):
        order = sorted((float(((x[i] - x[j]) ** 2).sum()), j) for j in range(len(x)) if j != i)
        rel = [labels[j] == labels[i] for _, j in order]
        big_r = sum(rel)
        if big_r == 0:
            continue
        hits, precisions = 0, []
        for rank, is_rel in enumerate(rel[:big_r], start=1):
            hits += is_rel
            precisions.append(hits / rank if is_rel else 0.0)
        map_r.append(sum(precisions) / big_r)
        r_prec.append(sum(rel[:big_r]) / big_r)
        mrr.append(1.0 / (rel.index(True) + 1))
        max_bin = max(labels.count(c) for c in set(labels)) - 1
        hits, total = 0, 0.0
        for rank, is_rel in enumerate(rel[:max_bin], start=1):
            hits += is_rel
            total += hits / rank if is_rel else 0.0
        ap_all.append(total / big_r)
    assert acc["mean_average_precision_at_r"] == pytest.approx(np.mean(map_r), rel=1e-12)
    assert acc["r_precision"] == pytest.approx(np.mean(r_prec), rel=1e-12)
    assert acc["mean_reciprocal_rank"] == pytest.approx(np.mean(mrr), rel=1e-6)  # float32, as PML
    assert acc["mean_average_precision"] == pytest.approx(np.mean(ap_all), rel=1e-12)


def test_custom_label_comparison_streamed():
    def comparison(x, y):  # PML's upstream example: first dimension equal, second different
        return (x[..., 0] == y[..., 0]) & (x[..., 1] != y[..., 1])

    g = torch.Generator().manual_seed(4)
    labels = torch.stack(
        [torch.randint(0, 3, (80,), generator=g), torch.randint(0, 2, (80,), generator=g)], 1
    )
    x = torch.randn(80, 4, generator=g)
    kwargs = dict(label_comparison_fn=comparison, exclude=("NMI", "AMI"))
    for ref_in in (True, False):
        streamed = calc(memory_budget_mb=TINY_MB, **kwargs).get_accuracy(
            x, labels, x, labels, ref_in
        )
        whole = calc(**kwargs).get_accuracy(x, labels, x, labels, ref_in)
        same_values(streamed, whole)
        pml = pml_ac.AccuracyCalculator(
            device=CPU, knn_func=TorchKNN(), include=PML_KNN_METRICS, label_comparison_fn=comparison
        ).get_accuracy(x, labels, x, labels, ref_in)
        same_values({m: streamed[m] for m in PML_KNN_METRICS}, pml)


def test_label_counts_and_lone_queries_match_pml():
    g = torch.Generator().manual_seed(5)
    ql = torch.randint(0, 12, (70,), generator=g).float()
    rl = torch.randint(0, 9, (90,), generator=g).float()
    counts = ac_module.label_match_counts(ql, rl)
    expected = pml_ac.get_label_match_counts(ql, rl, pml_ac.EQUALITY)
    assert torch.equal(counts[0], expected[0]) and torch.equal(counts[1], expected[1])
    for ref_in, (q_lab, r_lab) in ((False, (ql, rl)), (True, (rl, rl))):
        c = ac_module.label_match_counts(q_lab, r_lab)
        lone, mask = ac_module.lone_query_labels(q_lab, c, ref_in)
        e_lone, e_mask = pml_ac.get_lone_query_labels(q_lab, c, ref_in, pml_ac.EQUALITY)
        assert torch.equal(lone, e_lone) and torch.equal(mask, e_mask)


class WithCustomKNNMetric(AccuracyCalculator):
    """A subclass metric PML's way: it must see the whole search result, PML's k columns."""

    def requires_knn(self):
        return super().requires_knn() + ["label_sum"]

    def calculate_label_sum(self, knn_labels, not_lone_query_mask, **kwargs):
        self.seen_shape = tuple(knn_labels.shape)
        return float(knn_labels[not_lone_query_mask].sum())


def test_subclass_knn_metric_gets_the_whole_result():
    q, ql, _, _ = make_data(True, seed=6)
    sub = WithCustomKNNMetric(
        k=3,
        include=("label_sum", "ndcg_at_10"),
        device=CPU,
        knn_func=TorchKNN(),
        memory_budget_mb=TINY_MB,
    )
    acc = sub.get_accuracy(q, ql)
    assert sub.seen_shape == (len(q), 3)
    dist, idx = TorchKNN()(q, 3, q, True)
    _, not_lone = pml_ac.get_lone_query_labels(
        ql.float(), pml_ac.get_label_match_counts(ql.float(), ql.float(), torch.eq), True, torch.eq
    )
    assert acc["label_sum"] == float(ql.float()[idx][not_lone].sum())


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_memory_budget_validated(value):
    with pytest.raises(ValueError, match="memory_budget_mb"):
        AccuracyCalculator(device=CPU, memory_budget_mb=value)
    with pytest.raises(TypeError, match="memory_budget_mb"):
        AccuracyCalculator(device=CPU, memory_budget_mb="1024")


# ------------------------------------------------------------------- PML behaviours kept


def test_ndcg_accepts_label_counts_as_lists():
    """PML's upstream accuracy test calls ``_get_accuracy`` with Python lists as label counts."""
    query_labels = torch.tensor([1, 1, 2, 3, 4, 0])
    knn_labels = torch.tensor(
        [
            [0, 1, 1, 2, 2],
            [1, 0, 1, 1, 3],
            [4, 4, 4, 4, 2],
            [3, 1, 3, 1, 3],
            [0, 0, 4, 2, 2],
            [1, 2, 3, 4, 5],
        ]
    )
    as_lists = ([0, 1, 2, 3, 4], [2, 3, 5, 4, 5])
    as_tensors = tuple(torch.tensor(v) for v in as_lists)
    c = calc(exclude=("NMI", "AMI"), ndcg_ks=(3, 10))
    for ref_in in (False, True):
        kwargs = dict(
            query_labels=query_labels,
            knn_labels=knn_labels[:, int(ref_in) :],
            not_lone_query_mask=torch.ones(6, dtype=torch.bool),
            ref_includes_query=ref_in,
        )
        from_lists = c._get_accuracy(c.get_function_dict(), label_counts=as_lists, **kwargs)
        from_tensors = c._get_accuracy(c.get_function_dict(), label_counts=as_tensors, **kwargs)
        same_values(from_lists, from_tensors)
        # by hand, query 0 (label 1, R = 3 or 2): relevance 0 1 1 -> (1/log2 3 + 1/2) / IDCG
        r = 2 if ref_in else 3
        rel = [1, 1, 0] if ref_in else [0, 1, 1]
        dcg = sum(v / math.log2(i + 2) for i, v in enumerate(rel))
        idcg = sum(1 / math.log2(i + 2) for i in range(min(3, r)))
        per_class = calc(exclude=("NMI", "AMI"), ndcg_ks=3, return_per_class=True)
        out = per_class._get_accuracy(
            per_class.get_function_dict(), label_counts=as_lists, **kwargs
        )
        # classes in order 0..4; class 1 holds queries 0 and 1
        q1 = [1, 0, 1] if not ref_in else [0, 1, 1]
        dcg1 = sum(v / math.log2(i + 2) for i, v in enumerate(q1))
        assert out["ndcg_at_3"][1] == pytest.approx((dcg / idcg + dcg1 / idcg) / 2, rel=1e-12)


def _knn_logs(caplog, knn, query, k, reference, ref_includes_query):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="PML"):
        knn(query, k, reference, ref_includes_query)
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records]


@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_torch_knn_logs_like_faiss_knn(caplog, ref_includes_query):
    x = torch.randn(30, 5)
    logs = _knn_logs(caplog, TorchKNN(), x, 7, x, ref_includes_query)
    expected_k = 7 + int(ref_includes_query)
    assert logs == [
        ("PML", logging.INFO, f"running k-nn with k={expected_k}"),
        ("PML", logging.INFO, "embedding dimensionality is 5"),
    ]
    try:
        import faiss  # noqa: F401
    except ImportError:
        return
    assert logs == _knn_logs(caplog, pml_inference.FaissKNN(), x, 7, x, ref_includes_query)


def test_calculator_without_faiss_emits_the_k_log(caplog, monkeypatch):
    """PML's upstream ``test_k_warning``: a large k gives an INFO log, a small one a WARNING."""
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.delattr(pml_inference, "faiss", raising=False)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(400, 8, generator=g), torch.randint(0, 4, (400,), generator=g)
    with caplog.at_level(logging.INFO, logger="PML"):
        AccuracyCalculator(k="max_bin_count", include=("precision_at_1",), device=CPU).get_accuracy(
            x, y
        )
    assert any(
        r.levelno == logging.INFO and "running k-nn with k=" in r.getMessage()
        for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="PML"):
        AccuracyCalculator(k=10, include=("r_precision",), device=CPU).get_accuracy(x, y)
    assert any(r.levelno == logging.WARNING for r in caplog.records)


# ------------------------------------------------------------------------------ kNN


@pytest.mark.parametrize("seed", range(4))
def test_smallest_k_equals_topk(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    rows, group, num_groups, k = 9, 6, 40, 25
    scores = torch.randint(0, 50, (rows, group * num_groups), generator=g).to(dtype)  # many ties
    values, columns = smallest_k(scores, k, group)
    expected, _ = torch.topk(scores, k, dim=1, largest=False, sorted=True)
    assert torch.equal(values, expected)
    assert torch.equal(scores.gather(1, columns), values)
    assert all(len(set(row.tolist())) == k for row in columns)  # distinct columns


@pytest.mark.parametrize("self_retrieval", [False, True])
@pytest.mark.parametrize("n_ref,k", [(1000, 10), (1003, 10), (997, 3), (500, 60)])
def test_torch_knn_grouped_matches_brute_force(self_retrieval, n_ref, k, dtype):
    g = torch.Generator().manual_seed(n_ref + k)
    r = torch.randn(n_ref, 4, generator=g, dtype=dtype)
    q = r[:40] if self_retrieval else torch.randn(40, 4, generator=g, dtype=dtype)
    assert ac_module  # grouping is active for these sizes:
    from pml_proxies.utils.knn import _group_size

    assert _group_size(n_ref, k + int(self_retrieval)) > 1 or k == 60
    dist, idx = TorchKNN(max_chunk_elements=7 * n_ref)(q, k, r, self_retrieval)
    full = ((q.double()[:, None] - r.double()[None]) ** 2).sum(-1)
    if self_retrieval:
        full[torch.arange(40), torch.arange(40)] = math.inf
    expected_dist, expected_idx = torch.sort(full, dim=1)
    assert torch.equal(idx, expected_idx[:, :k])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dist.double(), expected_dist[:, :k], **tol)


def test_torch_knn_no_neighbour_cap():
    x = torch.randn(3000, 3)
    dist, idx = TorchKNN()(x[:5], 2999, x, True)  # faiss-gpu caps k at 2048
    assert idx.shape == (5, 2999)
    assert all(
        sorted(row.tolist()) == [j for j in range(3000) if j != i] for i, row in enumerate(idx)
    )
    assert torch.all(dist[:, 1:] >= dist[:, :-1])


# ------------------------------------------------------------------------ speed script


@pytest.mark.slow
def test_speed_eval_quick_mode(tmp_path):
    """The script's small mode: one subprocess per (case, calculator), peak RSS read back."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_eval.py"
    out = tmp_path / "raw.json"
    args = ["--sizes", "400", "--quick", "--calculators", "pml,ours-torch", "--ref-size", "1000"]
    args += ["--ref-queries", "50", "--sop", "--sop-size", "300", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr
    for case in ("self-400", "ref-50x1000", "sop-300x512-k-None"):
        assert case in proc.stdout
    raw = json.loads(out.read_text())
    assert all("error" not in r for r in raw), raw
    assert {(r["case"], r["calculator"]) for r in raw} == {
        ("self-400", "pml"),
        ("self-400", "ours-torch"),
        ("ref-50x1000", "ours-torch"),
        ("sop-300x512-k-None", "ours-torch"),
    }
    for r in raw:
        assert r["peak_mb"] >= r["base_mb"] > 0
    pml, ours = (
        next(r["metrics"] for r in raw if r["calculator"] == c) for c in ("pml", "ours-torch")
    )
    for name, value in pml.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("k", [3, 10, 50])
def test_ndcg_sums_the_gains_left_to_right_bit_for_bit(k):
    """DCG is the plain left-to-right sum of the gains (the paper's eq. 19 as a loop), bit for
    bit: a matrix product let the BLAS kernel choose the order, so nDCG's last bits changed
    with the CPU and with how the queries were chunked (a streamed-vs-whole test failed on an
    AVX2 machine only)."""
    g = torch.Generator().manual_seed(k)
    n = 300
    query_labels = torch.arange(n)  # one class per query: per-class values are per-query values
    hit = torch.rand(n, k, generator=g) < 0.5
    knn_labels = torch.where(hit, query_labels[:, None], -1)
    num_relevant = torch.randint(1, 2 * k, (n,), generator=g)
    got = ndcg_at_k(knn_labels, query_labels, num_relevant, k, return_per_class=True)
    discounts = ac_module._discounts(k, CPU).tolist()  # 1 / log2(rank + 1): the order is tested
    expected = []
    for row, r_q in zip(hit.tolist(), num_relevant.tolist()):
        dcg = 0.0
        for rank, relevant in enumerate(row):
            dcg += discounts[rank] if relevant else 0.0
        ideal = 0.0
        for rank in range(min(k, r_q)):
            ideal += discounts[rank]
        expected.append(dcg / ideal)
    assert got == expected


def test_public_metric_functions_return_per_class_values():
    """recall_at_k / ndcg_at_k with return_per_class and no memory budget: the class blocks
    were sized by ``inf // n`` (NaN) and raised 'cannot convert float NaN to integer'."""
    query_labels = torch.tensor([0, 0, 1, 2])
    knn_labels = torch.tensor([[0, 1], [1, 0], [2, 1], [2, 2]])
    assert recall_at_k(knn_labels, query_labels, 1, return_per_class=True) == [0.5, 0.0, 1.0]
    ndcg = ndcg_at_k(knn_labels, query_labels, torch.ones(4), 1, return_per_class=True)
    assert ndcg == [0.5, 0.0, 1.0]
