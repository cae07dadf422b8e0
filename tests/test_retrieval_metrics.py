"""The per-query retrieval metrics (``pml_proxies.functional.retrieval_metrics``): their doctests,
a plain-loop reference of each formula, and the two layouts the calculator's paths pass (a hit
matrix, the positives' ranks) giving the same values."""

import doctest
import math

import pytest
import torch

from pml_proxies.functional import retrieval_metrics as rm

# MAP and MAP@R sum each row with torch.sum, whose order the kernel picks and which differs
# with the layout (and from a Python loop): at most a few ulps of sums of <= WIDTH terms <= 1
SUM_ORDER_ATOL = 1e-12
WIDTH = 12


def test_doctests():
    """The examples in the module's docstrings (also: pytest --doctest-modules on the file)."""
    result = doctest.testmod(rm, raise_on_error=False)
    assert result.attempted >= 10
    assert result.failed == 0


def random_hits(seed, n=200, width=WIDTH):
    """A hit matrix with empty, full and random rows, and R_q >= the hits seen (some positives
    ranked beyond the searched width)."""
    g = torch.Generator().manual_seed(seed)
    hits = torch.rand(n, width, generator=g) < torch.rand(n, 1, generator=g)
    hits[0], hits[1] = False, True
    num_relevant = hits.sum(dim=1) + torch.randint(0, 4, (n,), generator=g)
    return hits, num_relevant, g


def positive_ranks(hits, g):
    """The positives' ranks layout of the same rankings: each row's hit ranks ascending, then
    slots at ranks >= width, some of them relevant (positives beyond the searched width)."""
    width = hits.shape[1]
    columns = torch.arange(width)
    keys = torch.where(hits, columns, width + columns).sort(dim=1).values
    beyond = (keys >= width) & (torch.rand(hits.shape, generator=g) < 0.5)
    return keys, (keys < width) | beyond


def loop_reference(name, ranks, relevant, num_relevant, k):
    """One query's value from its (rank, relevant) list, as the formulas read."""
    items = sorted(r for r, rel in zip(ranks, relevant) if rel)
    if name == "recall":
        return float(any(r < k for r in items))
    if name == "precision_at_1":
        return float(any(r < min(1, k) for r in items))
    if name == "r_precision":
        limit = min(max(num_relevant, 0), k)
        return sum(r < limit for r in items) / limit if limit else math.nan
    if name in ("average_precision", "average_precision_at_r"):
        limit = min(num_relevant, k) if name.endswith("_at_r") else k
        total = sum((j + 1) / (r + 1) for j, r in enumerate(items) if r < limit)
        return total / num_relevant if num_relevant else math.nan
    if name == "reciprocal_rank":
        first = [r for r in items if r < k]
        return 1.0 / (first[0] + 1) if first else 0.0
    assert name == "ndcg"
    dcg = sum(1 / math.log2(r + 2) for r in items if r < k)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, max(num_relevant, 1))))
    return dcg / ideal


def compute(name, ranks, relevant, num_relevant, k):
    if name == "recall":
        return rm.recall_at_k(ranks, relevant, k)
    if name == "precision_at_1":
        return rm.precision_at_1(ranks, relevant, k)
    if name == "r_precision":
        return rm.r_precision(ranks, relevant, num_relevant, k)
    if name == "average_precision":
        return rm.average_precision(ranks, relevant, num_relevant, k)
    if name == "average_precision_at_r":
        return rm.average_precision(ranks, relevant, num_relevant, k, at_r=True)
    if name == "reciprocal_rank":
        return rm.reciprocal_rank(ranks, relevant, k)
    return rm.ndcg_at_k(ranks, relevant, num_relevant, k)


NAMES = [
    "recall",
    "precision_at_1",
    "r_precision",
    "average_precision",
    "average_precision_at_r",
    "reciprocal_rank",
    "ndcg",
]
# integer counts, or a left-to-right running sum whose zeros add exactly (nDCG's DCG): the
# two layouts give the same bits by construction
EXACT = {"recall", "precision_at_1", "r_precision", "reciprocal_rank", "ndcg"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 3, WIDTH])
def test_metrics_follow_their_formulas_in_both_layouts(name, k):
    hits, num_relevant, g = random_hits(seed=k)
    dense = compute(name, *rm.hits_to_ranks(hits), num_relevant, k)
    ranks, relevant = positive_ranks(hits, g)
    compact = compute(name, ranks, relevant, num_relevant, k)
    assert dense.dtype == compact.dtype
    assert dense.dtype == (
        torch.get_default_dtype() if name == "reciprocal_rank" else torch.float64
    )
    atol = 0.0 if name in EXACT else SUM_ORDER_ATOL
    torch.testing.assert_close(dense, compact, rtol=0, atol=atol, equal_nan=True, msg=name)
    expected = [
        loop_reference(name, r, rel, int(n), k)
        for r, rel, n in zip(ranks.tolist(), relevant.tolist(), num_relevant.tolist())
    ]
    # the loop's float64 sums and log2 round differently from torch's: ulps of values <= WIDTH;
    # the reciprocal rank is rounded to float32 (PML's dtype): half an ulp of a value <= 1
    atol = 2**-24 if name == "reciprocal_rank" else SUM_ORDER_ATOL
    assert dense.tolist() == pytest.approx(expected, rel=0, abs=atol, nan_ok=True)


def test_ranks_beyond_the_cutoff_are_never_read():
    """A relevant item ranked at or after ``k`` changes no metric (the layouts list positives
    the search never saw)."""
    ranks = torch.tensor([[0, 2, 7]])
    num_relevant = torch.tensor([3])
    seen = torch.tensor([[True, True, False]])
    beyond = torch.tensor([[True, True, True]])
    for name in NAMES:
        assert torch.equal(
            compute(name, ranks, seen, num_relevant, 5),
            compute(name, ranks, beyond, num_relevant, 5),
        ), name


def test_no_ranks_seen():
    """PML's ``k`` of 0 (no neighbour seen) or an empty hit matrix: every query scores 0."""
    hits = torch.zeros(3, 0, dtype=torch.bool)
    ranks, relevant = rm.hits_to_ranks(hits)
    assert rm.reciprocal_rank(ranks, relevant, 0).tolist() == [0.0, 0.0, 0.0]
    assert rm.precision_at_1(ranks, relevant, 0).tolist() == [0.0, 0.0, 0.0]
    assert rm.ndcg_at_k(ranks, relevant, torch.ones(3), 2).tolist() == [0.0, 0.0, 0.0]
