"""Per-query retrieval metrics of binary relevance, as pure functions (one home for each formula).

Every function takes each query's ranking in one representation, **the ranks of its relevant
items**, and returns one value per query (the means are the caller's):

* ``ranks``: ``(n, m)`` int64, 0-based positions in the query's ranking (nearest first),
  strictly increasing along each row;
* ``relevant``: ``(n, m)`` bool, the slot holds a relevant item (a positive).

Every relevant item ranked before the cut-off a function reads must be listed. Two layouts
qualify, one per path of :class:`~pml_proxies.utils.accuracy_calculator.AccuracyCalculator`:

* a neighbour list's **hit matrix** ``hits`` (``hits[q, i]``: the ``i``-th nearest neighbour of
  query ``q`` is relevant) is ``ranks = [0, 1, ..., k - 1]`` in every row and ``relevant = hits``
  (:func:`hits_to_ranks`, a view);
* the **positives' ranks**, ascending, ``relevant`` true on each row's first ``R_q`` slots (the
  calculator's positive-rank path, which never builds a neighbour list).

As ranks strictly increase, the slot ``j`` holds a rank ``>= j``: a cut-off ``k`` only reads the
first ``k`` slots. Values are float64 (the reciprocal rank in torch's default dtype, as PML's).
The float operations are those of PML's formulas; a row sum runs over the layout given:
``torch.sum`` (MAP, MAP@R) leaves the order to the kernel, so the two layouts may differ in the
last bits there, while nDCG's DCG is a left-to-right running sum and counts are integers, so
both layouts give the same bits (on CPU). No function loops over queries in Python.

Example, the same two queries in both layouts:

>>> import torch
>>> from pml_proxies.functional import retrieval_metrics as rm
>>> hits = torch.tensor([[False, True, True, False], [False, False, False, True]])
>>> rm.recall_at_k(*rm.hits_to_ranks(hits), k=2)
tensor([1., 0.], dtype=torch.float64)
>>> ranks = torch.tensor([[1, 2], [3, 9]])  # query 1's second positive is ranked 10th
>>> relevant = torch.tensor([[True, True], [True, True]])
>>> rm.recall_at_k(ranks, relevant, k=2)
tensor([1., 0.], dtype=torch.float64)
"""

from __future__ import annotations

import torch

__all__ = [
    "average_precision",
    "dcg_discounts",
    "hits_to_ranks",
    "ndcg_at_k",
    "precision_at_1",
    "r_precision",
    "recall_at_k",
    "reciprocal_rank",
]


def hits_to_ranks(hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ranks, relevant)`` of a hit matrix ``hits`` ``(n, k)`` bool in rank order: ``ranks``
    is ``[0, 1, ..., k - 1]`` in every row (an expanded view, no copy), ``relevant`` is ``hits``.

    >>> import torch
    >>> ranks, relevant = hits_to_ranks(torch.tensor([[False, True, True]]))
    >>> ranks
    tensor([[0, 1, 2]])
    """
    ranks = torch.arange(hits.shape[1], device=hits.device)
    return ranks.expand(hits.shape[0], -1), hits


def _seen(ranks: torch.Tensor, relevant: torch.Tensor, limit) -> torch.Tensor:
    """``(n, m)`` bool: a relevant item ranked before ``limit`` (an int or an ``(n,)`` tensor)."""
    if isinstance(limit, torch.Tensor):
        limit = limit[:, None]
    return relevant & (ranks < limit)


def recall_at_k(ranks: torch.Tensor, relevant: torch.Tensor, k: int) -> torch.Tensor:
    """Deep-metric-learning Recall@k (the hit rate): 1 when a relevant item is among the ``k``
    nearest, else 0.

    .. math:: \\mathrm{R@k}_q = \\mathbb{1}\\left[\\exists\\, j:\\ \\mathrm{rel}_{qj},\\
        \\mathrm{rank}_{qj} < k\\right]

    >>> import torch
    >>> ranks = torch.tensor([[0, 1, 2], [0, 1, 2]])
    >>> relevant = torch.tensor([[False, False, True], [True, False, False]])
    >>> recall_at_k(ranks, relevant, k=2)
    tensor([0., 1.], dtype=torch.float64)
    """
    return _seen(ranks[:, :k], relevant[:, :k], k).any(dim=1).to(torch.float64)


def precision_at_1(ranks: torch.Tensor, relevant: torch.Tensor, k: int = 1) -> torch.Tensor:
    """PML's ``precision_at_1``: 1 when the nearest item is relevant (Recall@1); 0 when PML's
    ``k`` (the ranks its metrics see) is 0.

    .. math:: \\mathrm{P@1}_q = \\mathrm{rel}_q(\\text{rank } 0)

    >>> import torch
    >>> precision_at_1(torch.tensor([[0, 3], [1, 2]]), torch.ones(2, 2, dtype=torch.bool))
    tensor([1., 0.], dtype=torch.float64)
    """
    return recall_at_k(ranks, relevant, min(1, k))


def r_precision(
    ranks: torch.Tensor, relevant: torch.Tensor, num_relevant: torch.Tensor, k: int
) -> torch.Tensor:
    """PML's R-Precision: the fraction of relevant items among the ``L_q`` nearest, ``L_q =
    min(R_q, k)`` (``R_q`` = ``num_relevant``, PML's ``count_per_query``; ``k`` the ranks seen).

    .. math:: \\mathrm{RP}_q = \\frac{|\\{j:\\ \\mathrm{rel}_{qj},\\ \\mathrm{rank}_{qj} < L_q\\}|}
        {L_q}

    >>> import torch
    >>> ranks = torch.tensor([[0, 1, 2, 3]])
    >>> relevant = torch.tensor([[True, False, True, False]])
    >>> r_precision(ranks, relevant, torch.tensor([3]), k=4)
    tensor([0.6667], dtype=torch.float64)
    """
    limit = num_relevant.clamp(min=0, max=k)
    hits = torch.sum(_seen(ranks[:, :k], relevant[:, :k], limit), dim=1)
    return hits.to(torch.float64) / limit


def average_precision(
    ranks: torch.Tensor,
    relevant: torch.Tensor,
    num_relevant: torch.Tensor,
    k: int,
    at_r: bool = False,
) -> torch.Tensor:
    """PML's average precision (``at_r=False``, MAP's term) or average precision at R (MAP@R's):
    the precision at each relevant item ranked before ``L_q``, summed, over ``R_q``.

    .. math:: \\mathrm{AP}_q = \\frac{1}{R_q} \\sum_{j:\\ \\mathrm{rel}_{qj},\\
        \\mathrm{rank}_{qj} < L_q} \\frac{|\\{i \\le j:\\ \\mathrm{rel}_{qi}\\}|}
        {\\mathrm{rank}_{qj} + 1}

    with ``L_q = k`` (the ranks seen) or ``min(R_q, k)`` with ``at_r``; ``R_q`` =
    ``num_relevant`` (PML's ``count_per_query``). The sum is one ``torch.sum`` over each row as
    laid out (PML's for a hit matrix of PML's ``k`` columns).

    >>> import torch
    >>> ranks = torch.tensor([[0, 1, 2, 3]])
    >>> relevant = torch.tensor([[True, False, True, False]])
    >>> average_precision(ranks, relevant, torch.tensor([2]), k=4)  # (1/1 + 2/3) / 2
    tensor([0.8333], dtype=torch.float64)
    >>> average_precision(ranks, relevant, torch.tensor([2]), k=4, at_r=True)  # 1/1 / 2
    tensor([0.5000], dtype=torch.float64)
    """
    seen = _seen(ranks, relevant, num_relevant.clamp(max=k) if at_r else k)
    precision = torch.cumsum(seen, dim=1).to(torch.float64) / (ranks + 1)
    return torch.sum(torch.where(seen, precision, 0.0), dim=1) / num_relevant


def reciprocal_rank(ranks: torch.Tensor, relevant: torch.Tensor, k: int) -> torch.Tensor:
    """PML's reciprocal rank: one over the first relevant item's 1-based rank, 0 when none is
    among the ``k`` nearest; in torch's default dtype, as PML's.

    .. math:: \\mathrm{RR}_q = \\frac{1}{\\min\\{\\mathrm{rank}_{qj}:\\ \\mathrm{rel}_{qj}\\} + 1}

    >>> import torch
    >>> ranks = torch.tensor([[0, 1, 2], [0, 1, 2]])
    >>> relevant = torch.tensor([[False, False, True], [False, False, False]])
    >>> reciprocal_rank(ranks, relevant, k=3)
    tensor([0.3333, 0.0000])
    """
    seen = _seen(ranks, relevant, k)
    if seen.shape[1] == 0:
        return torch.zeros(len(seen), device=seen.device)
    first = seen.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first relevant slot
    rank = ranks.gather(1, first)[:, 0] + 1.0  # default float dtype, as PML
    return torch.where(seen.any(dim=1), 1.0 / rank, torch.zeros_like(rank))


def dcg_discounts(k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """DCG's discounts ``1 / log2(i + 1)`` for the 1-based ranks ``i = 1 .. k``, float64.

    >>> dcg_discounts(3)
    tensor([1.0000, 0.6309, 0.5000], dtype=torch.float64)
    """
    ranks = torch.arange(1, k + 1, dtype=torch.float64, device=device)
    return 1.0 / torch.log2(ranks + 1.0)


def _row_sums_in_order(values: torch.Tensor) -> torch.Tensor:
    """Each row's sum, added left to right (a running sum: ``torch.cumsum`` is a sequential loop
    on CPU). A matrix product or ``torch.sum`` lets the kernel (BLAS blocking, vector width,
    threads) choose the order, so the last bits would depend on the CPU and on how the queries
    are chunked; here they do not, and adding the zeros of non-relevant ranks is exact, so both
    layouts (hit matrix, positives' ranks) give the same bits."""
    if values.shape[1] == 0:
        return values.new_zeros(values.shape[0])
    return torch.cumsum(values, dim=1)[:, -1]


def _ideal_dcg(discounts: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """The ideal DCG@k: ``min(k, R_q)`` positives first (``R_q`` clamped to >= 1)."""
    ideal_len = num_relevant.clamp(min=1, max=len(discounts)).to(torch.long)
    return torch.cumsum(discounts, dim=0)[ideal_len - 1]


def ndcg_at_k(
    ranks: torch.Tensor, relevant: torch.Tensor, num_relevant: torch.Tensor, k: int
) -> torch.Tensor:
    """nDCG@k of binary relevance (MPA paper, eq. 19-20): the DCG of the ``k`` nearest over the
    ideal DCG, ``min(k, R_q)`` relevant items first (``R_q`` = ``num_relevant``, the relevant
    references, the query itself excluded; clamped to >= 1).

    .. math:: \\mathrm{nDCG@k}_q = \\frac{\\sum_{j:\\ \\mathrm{rel}_{qj},\\
        \\mathrm{rank}_{qj} < k} 1 / \\log_2(\\mathrm{rank}_{qj} + 2)}
        {\\sum_{i=1}^{\\min(k, R_q)} 1 / \\log_2(i + 1)}

    (the gain ``2^r - 1`` is ``r`` for binary ``r``). The DCG is a left-to-right running sum
    (:func:`_row_sums_in_order`), so its bits do not depend on the layout or the CPU.

    >>> import torch
    >>> ranks = torch.tensor([[0, 1, 2], [0, 1, 2]])
    >>> relevant = torch.tensor([[True, False, True], [False, True, False]])
    >>> ndcg_at_k(ranks, relevant, torch.tensor([2, 1]), k=3)  # (1 + 1/2) / (1 + 1/log2(3))
    tensor([0.9197, 0.6309], dtype=torch.float64)
    """
    ranks, relevant = ranks[:, :k], relevant[:, :k]
    discounts = dcg_discounts(k, ranks.device)
    gains = discounts[ranks.clamp(max=k - 1)]
    dcg = _row_sums_in_order(torch.where(_seen(ranks, relevant, k), gains, 0.0))
    return dcg / _ideal_dcg(discounts, num_relevant)
