"""PML's ``AccuracyCalculator`` with nDCG@k and deep-metric-learning Recall@k, streamed over
chunks of queries so that memory stays bounded for any ``k``, with or without faiss."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils import common_functions as c_f

from ..functional import retrieval_metrics as rm
from ..functional.validation import check_real
from .knn import DefaultKMeans, DefaultKNN, TorchKNN, centre, ranking_scores

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "DEFAULT_NDCG_KS",
    "DEFAULT_RECALL_KS",
    "RANK_PATH_MIN_FRACTION",
    "AccuracyCalculator",
    "label_match_counts",
    "lone_query_labels",
    "ndcg_at_k",
    "recall_at_k",
    "relevant_counts",
]

DEFAULT_RECALL_KS = (1, 2, 4, 8)
DEFAULT_NDCG_KS = (10,)
DEFAULT_MEMORY_BUDGET_MB = 1024.0
# Bytes held per (query, neighbour) pair while one chunk is evaluated: the search's distances and
# indices (twice: the self-match removal copies them), the neighbours' labels, the match mask and
# the float64 temporaries of the rank metrics. Measured peaks stay below this (docs/speed.md).
_BYTES_PER_NEIGHBOUR = 64
# Bytes held per (query, reference) pair by the positive-rank path: the float32 ranking scores and
# the int32 count of positives ranked before each reference (the histogram input, offset in
# place), plus headroom for the matmul's and searchsorted's temporaries.
_RANK_BYTES_PER_REFERENCE = 12
# Bytes per (query, positive slot) of the rank path: indices, scores, sorted scores, counts,
# positions and the float64 temporaries of the metrics.
_RANK_BYTES_PER_POSITIVE = 128
# Searches of at least this fraction of the references use the positive-rank path (whose cost
# does not depend on k). Measured (docs/speed.md, "Evaluation at scale"): 10,000 x 128 self-retrieval,
# 100 classes, every kNN metric, TorchKNN, 1 thread: the neighbour lists win at k = 1,000, the
# ranks at k = 3,000.
RANK_PATH_MIN_FRACTION = 0.2


def _validate_ks(ks: int | Iterable[int] | None, name: str) -> tuple[int, ...]:
    """Sorted, de-duplicated positive ints; ``None`` or ``()`` means no such metric."""
    if ks is None:
        return ()
    if isinstance(ks, str) or not isinstance(ks, (numbers.Integral, Iterable)):
        raise ValueError(f"{name} must be a positive int or a sequence of them, got {ks!r}")
    values: tuple[Any, ...] = (ks,) if isinstance(ks, numbers.Integral) else tuple(ks)
    for k in values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{name} must contain only positive ints, got {k!r} in {values!r}")
    return tuple(sorted({int(k) for k in values}))


def _check_finite(name: str, values: torch.Tensor) -> None:
    """ValueError naming ``name`` and how many of its rows hold NaN or inf (one ``isfinite``
    pass over the tensor; the rows are counted only on failure)."""
    if bool(torch.isfinite(values).all()):
        return
    bad = int((~torch.isfinite(values.reshape(len(values), -1))).any(dim=1).sum())
    raise ValueError(
        f"{name} has {bad} of {len(values)} rows with non-finite values (NaN or inf, after "
        f"conversion to float32): a metric computed from them would be meaningless"
    )


# --------------------------------------------------------------------------- labels and counts


def _as_label_tensor(values: Any, like: torch.Tensor) -> torch.Tensor:
    """``values`` (a tensor, array or Python list, as PML's functions accept) on ``like``'s
    device and dtype."""
    return torch.as_tensor(values, device=like.device).to(like.dtype)


def _label_index(labels: torch.Tensor, unique_labels: torch.Tensor) -> torch.Tensor:
    """For each row of ``labels``: the index of the equal row of ``unique_labels``, or -1.

    Equality is exact over all label dimensions, as PML's relevance mask and lone-query test
    use; O(N log N) time and O(N) memory (PML compares every label with every unique label).
    """
    if len(unique_labels) == 0:
        return torch.full((len(labels),), -1, dtype=torch.long, device=labels.device)
    both = torch.cat([unique_labels, labels])
    _, group = torch.unique(both, dim=0, return_inverse=True)
    lookup = torch.full((len(both),), -1, dtype=torch.long, device=labels.device)
    lookup[group[: len(unique_labels)]] = torch.arange(len(unique_labels), device=labels.device)
    return lookup[group[len(unique_labels) :]]


def label_match_counts(
    query_labels: torch.Tensor, reference_labels: torch.Tensor, label_comparison_fn=pml_ac.EQUALITY
) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's ``get_label_match_counts``: the unique query labels and, per unique label, the
    number of references matching it; O(N) memory for ``torch.eq`` (PML's is O(classes x N)),
    PML's own loop over labels for a custom comparison."""
    if label_comparison_fn is not pml_ac.EQUALITY:
        return pml_ac.get_label_match_counts(query_labels, reference_labels, label_comparison_fn)
    unique_labels = torch.unique(query_labels, dim=0)
    index = _label_index(reference_labels, unique_labels)
    counts = torch.bincount(index[index >= 0], minlength=len(unique_labels))
    return unique_labels, counts


def _label_matches_itself(unique_labels: torch.Tensor, label_comparison_fn) -> torch.Tensor:
    matches = label_comparison_fn(unique_labels, unique_labels)
    if matches.dim() > 1:
        matches = c_f.torch_all_from_dim_to_end(matches, 1)
    return matches.long()


def lone_query_labels(
    query_labels: torch.Tensor,
    label_counts: tuple[torch.Tensor, torch.Tensor],
    ref_includes_query: bool,
    label_comparison_fn=pml_ac.EQUALITY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's ``get_lone_query_labels`` (same rule: no matching reference, the query itself not
    counted with ``ref_includes_query``) in O(N) memory: ``(lone_labels, not_lone_query_mask)``."""
    unique_labels, counts = label_counts
    if ref_includes_query:
        lone = counts - _label_matches_itself(unique_labels, label_comparison_fn) <= 0
    else:
        lone = counts == 0
    index = _label_index(query_labels, unique_labels)
    not_lone = ~(lone[index.clamp(min=0)] & (index >= 0))
    return unique_labels[lone], not_lone


def _label_counts_per_query(
    query_labels: torch.Tensor, label_counts: tuple[Any, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts, matches_itself_index)``: each query's entry of ``label_counts`` (0 when its
    label is not listed) and the index of its unique label (-1 when not listed)."""
    unique_labels = _as_label_tensor(label_counts[0], query_labels)
    counts = torch.as_tensor(label_counts[1], device=query_labels.device).long()
    index = _label_index(query_labels, unique_labels)
    per_query = torch.where(index >= 0, counts[index.clamp(min=0)], torch.zeros_like(index))
    return per_query, index


def relevant_counts(
    query_labels: torch.Tensor,
    label_counts: tuple[Any, Any],
    ref_includes_query: bool,
    label_comparison_fn=pml_ac.EQUALITY,
) -> torch.Tensor:
    """``R_q`` per query: the references with the query's label, the query itself excluded.

    ``label_counts`` is PML's ``(unique_labels, match_counts)`` (tensors or Python lists, as PML's
    own functions accept); with ``ref_includes_query`` the query's own entry is removed exactly as
    PML's ``get_lone_query_labels`` does, so ``R_q > 0`` holds for PML's not-lone queries.
    """
    counts, index = _label_counts_per_query(query_labels, label_counts)
    if ref_includes_query:
        unique_labels = _as_label_tensor(label_counts[0], query_labels)
        itself = _label_matches_itself(unique_labels, label_comparison_fn)
        counts = counts - torch.where(index >= 0, itself[index.clamp(min=0)], 0)
    return counts


def _pml_relevant_counts(
    query_labels: torch.Tensor, label_counts: tuple[Any, Any], ref_includes_query: bool
) -> torch.Tensor:
    """PML's ``count_per_query`` of ``get_relevance_mask``: the label's count, minus one with
    ``ref_includes_query`` whatever the comparison function (R-Precision and MAP use it)."""
    counts, index = _label_counts_per_query(query_labels, label_counts)
    return torch.where(index >= 0, counts - int(ref_includes_query), counts)


def _same_label(knn_labels, query_labels, label_comparison_fn) -> torch.Tensor:
    """``(n, k)`` bool: does the i-th neighbour have the query's label (PML's comparison)."""
    same = label_comparison_fn(query_labels[:, None], knn_labels)
    if same.dim() > 2:
        same = c_f.torch_all_from_dim_to_end(same, 2)
    return same


# ------------------------------------------------------------------- per-query metric values
# Every metric is one function of ``functional.retrieval_metrics``, which reads the ranks of each
# query's relevant references; both paths (neighbour lists, positives' ranks) put one chunk of
# queries in that form (a ``_Chunk``) and call the metric through the one table, ``_per_query``.


class _Chunk(NamedTuple):
    """What the per-query metrics of one chunk of queries read, on either path: ``rm``'s
    ``(ranks, relevant)`` for the metrics of this class, and for PML's in PML's layout (on the
    neighbour path the first ``pml_k`` columns, so that MAP sums in PML's order; the rank path
    passes its positives' ranks to both)."""

    ranks: torch.Tensor  # (n, m) long: ranks of the relevant references, every one searched
    relevant: torch.Tensor  # (n, m) bool
    pml_ranks: torch.Tensor  # the same for PML's metrics (rm's input)
    pml_relevant: torch.Tensor
    pml_k: int  # ranks PML's metrics see (PML's own k)
    pml_counts: torch.Tensor  # (n,) PML's count_per_query (R-Precision, MAP, MAP@R)
    num_relevant: torch.Tensor  # (n,) R_q (nDCG)


_PML_PER_QUERY: dict[str, Callable[[_Chunk], torch.Tensor]] = {
    "precision_at_1": lambda c: rm.precision_at_1(c.pml_ranks, c.pml_relevant, c.pml_k),
    "r_precision": lambda c: rm.r_precision(c.pml_ranks, c.pml_relevant, c.pml_counts, c.pml_k),
    "mean_average_precision_at_r": lambda c: rm.average_precision(
        c.pml_ranks, c.pml_relevant, c.pml_counts, c.pml_k, at_r=True
    ),
    "mean_average_precision": lambda c: rm.average_precision(
        c.pml_ranks, c.pml_relevant, c.pml_counts, c.pml_k
    ),
    "mean_reciprocal_rank": lambda c: rm.reciprocal_rank(c.pml_ranks, c.pml_relevant, c.pml_k),
}


def _recall(cutoff: int, chunk: _Chunk) -> torch.Tensor:
    return rm.recall_at_k(chunk.ranks, chunk.relevant, cutoff)


def _ndcg(cutoff: int, chunk: _Chunk) -> torch.Tensor:
    return rm.ndcg_at_k(chunk.ranks, chunk.relevant, chunk.num_relevant, cutoff)


_discounts = rm.dcg_discounts  # the name the tests read


def _class_blocks(
    query_labels: torch.Tensor, reference_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, start, size)``: references sorted by label (stable) and, per query, where its
    label's block starts in that order and how many references it holds (1-D labels)."""
    sorted_labels, order = torch.sort(reference_labels, stable=True)
    start = torch.searchsorted(sorted_labels, query_labels, side="left")
    size = torch.searchsorted(sorted_labels, query_labels, side="right") - start
    return order, start, size


def _positive_positions(
    query_chunk: torch.Tensor,
    reference_t: torch.Tensor,
    ref_sq: torch.Tensor,
    positives: torch.Tensor,
    num_positives: torch.Tensor,
    own: torch.Tensor | None,
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, valid)`` of one chunk's positives among all references, without sorting
    a row: ``(n, m)``, strictly increasing along each row, its valid slots first (the ranks of
    the relevant references, as :mod:`~pml_proxies.functional.retrieval_metrics` reads them).
    ``buffers``: a float ``(>= n, N)`` and an int32 ``(>= n, N)`` tensor to reuse (one pair for
    all chunks keeps the allocator from fragmenting memory over many chunks).

    Scores are TorchKNN's ranking ``||r||^2 - 2 q.r`` (:func:`~.knn.ranking_scores`).
    ``positives`` ``(n, m)`` holds each query's positive reference indices, padded with any one
    of them (``own``, the query's own reference index in self-retrieval, is among them and is
    no positive). The positives' sorted
    scores ``P`` split each row's other references: ``s = #{P < x}``, so a reference scoring
    ``x`` precedes the j-th positive iff ``x <= P_j`` iff ``s <= j``; a per-row histogram of
    ``s`` and its cumsum count them. A tie between a positive and another reference ranks the
    other reference first (pessimistic); ties among positives do not change any metric.
    """
    rows, slots = positives.shape
    if buffers is None:
        buffers = (
            query_chunk.new_empty(rows, reference_t.shape[1]),
            torch.empty(rows, reference_t.shape[1], dtype=torch.int32, device=query_chunk.device),
        )
    scores, before = buffers[0][:rows], buffers[1][:rows]
    ranking_scores(query_chunk, reference_t, ref_sq, scores)
    inf = torch.tensor(torch.inf, dtype=scores.dtype, device=scores.device)
    slot = torch.arange(slots, device=scores.device)
    real = slot < num_positives[:, None]
    if own is not None:
        real = real & (positives != own[:, None])
    positive_scores = torch.where(real, scores.gather(1, positives), inf)
    sorted_scores = torch.sort(positive_scores, dim=1).values.contiguous()
    scores.scatter_(1, positives, torch.inf)  # positives and the query itself rank after every P_j
    torch.searchsorted(sorted_scores, scores, side="left", out_int32=True, out=before)
    row_offset = torch.arange(rows, device=before.device, dtype=torch.int32) * (slots + 1)
    before.add_(row_offset[:, None])
    histogram = torch.bincount(before.view(-1), minlength=rows * (slots + 1))
    others_before = torch.cumsum(histogram.view(rows, slots + 1)[:, :slots], dim=1)
    valid = slot < real.sum(dim=1, keepdim=True)
    return others_before + slot, valid


class _QueryCounts(NamedTuple):
    """Per-query label counts, computed once for all queries."""

    pml_counts: torch.Tensor  # PML's count_per_query (R-Precision, MAP, MAP@R)
    num_relevant: torch.Tensor  # R_q (nDCG)


def _query_counts(
    query_labels, label_counts, ref_includes_query, label_comparison_fn
) -> _QueryCounts:
    return _QueryCounts(
        _pml_relevant_counts(query_labels, label_counts, ref_includes_query),
        relevant_counts(query_labels, label_counts, ref_includes_query, label_comparison_fn),
    )


def _neighbours(
    knn_labels, query_labels, counts: _QueryCounts, label_comparison_fn, pml_k: int | None = None
) -> _Chunk:
    """A chunk from its neighbour lists: the hit matrix in rank order (``rm.hits_to_ranks``);
    PML's metrics read its first ``pml_k`` columns (a contiguous copy)."""
    same = _same_label(knn_labels, query_labels, label_comparison_fn)
    pml_k = same.shape[1] if pml_k is None else pml_k
    pml_same = same if pml_k >= same.shape[1] else same[:, :pml_k].contiguous()
    return _Chunk(*rm.hits_to_ranks(same), *rm.hits_to_ranks(pml_same), pml_k, *counts)


def _average(
    values: torch.Tensor,
    labels: torch.Tensor,
    avg_of_avgs: bool,
    return_per_class: bool,
    memory_budget_bytes: float = float("inf"),
):
    """PML's ``maybe_get_avg_of_avgs`` (``labels`` one row per value), with the per-class sums
    taken over blocks of classes so that the ``(queries, classes)`` product stays within the
    budget; PML's layout is kept, so the sums run in PML's order and the values are PML's."""
    if not (avg_of_avgs or return_per_class):
        return torch.mean(values).item()
    sample_labels = labels[:, None] if labels.dim() == 1 else labels
    unique_labels = torch.unique(sample_labels, dim=0)
    row_bytes = len(labels) * (values.element_size() + 2)
    if math.isinf(memory_budget_bytes):  # inf // n is NaN: one block of every class
        block = len(unique_labels)
    else:
        block = max(1, int(memory_budget_bytes // max(1, row_bytes)))
    averages = []
    for start in range(0, len(unique_labels), block):
        classes = unique_labels[start : start + block]
        mask = c_f.torch_all_from_dim_to_end(sample_labels == classes.unsqueeze(1), 2)
        mask = torch.t(mask)
        sums = torch.sum(values.unsqueeze(1) * mask, dim=0)
        averages.append(sums / torch.sum(mask, dim=0))
    per_class = torch.cat(averages)
    if return_per_class:
        return per_class.cpu().tolist()
    return torch.mean(per_class).item()


def recall_at_k(
    knn_labels: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    avg_of_avgs: bool = False,
    return_per_class: bool = False,
    label_comparison_fn=pml_ac.EQUALITY,
):
    """DML Recall@k: 1 for a query when one of its ``k`` nearest references has its label."""
    same = _same_label(knn_labels, query_labels, label_comparison_fn)
    hit = rm.recall_at_k(*rm.hits_to_ranks(same), k)
    return _average(hit, query_labels, avg_of_avgs, return_per_class)


def ndcg_at_k(
    knn_labels: torch.Tensor,
    query_labels: torch.Tensor,
    num_relevant: torch.Tensor,
    k: int,
    avg_of_avgs: bool = False,
    return_per_class: bool = False,
    label_comparison_fn=pml_ac.EQUALITY,
):
    """nDCG@k of binary relevance (MPA paper eq. 19-20), ``num_relevant`` = ``R_q`` >= 1."""
    same = _same_label(knn_labels, query_labels, label_comparison_fn)
    num_relevant = torch.as_tensor(num_relevant, device=same.device)
    values = rm.ndcg_at_k(*rm.hits_to_ranks(same), num_relevant, k)
    return _average(values, query_labels, avg_of_avgs, return_per_class)


def _remove_self(
    distances: torch.Tensor, indices: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's ``return_results`` for queries ``offset, offset + 1, ...`` of the reference set:
    drop each row's own index, or its last neighbour when the own index is not among them
    (one ``gather``, cheaper than PML's boolean-mask copy)."""
    rows, width = indices.shape
    own = torch.arange(offset, offset + rows, device=indices.device)
    matches_self = indices == own.unsqueeze(1)
    position = torch.where(
        matches_self.any(dim=1),
        matches_self.to(torch.uint8).argmax(dim=1),
        torch.full_like(own, width - 1),
    )
    columns = torch.arange(width - 1, device=indices.device)
    keep = columns + (columns >= position.unsqueeze(1))
    return distances.gather(1, keep), indices.gather(1, keep)


class AccuracyCalculator(pml_ac.AccuracyCalculator):
    """PML's ``AccuracyCalculator`` plus nDCG@k (Saeki et al., MPA paper, eq. 19-20) and
    deep-metric-learning Recall@k, all from one neighbour search, usable without faiss, and
    streamed over chunks of queries so that memory stays bounded for any ``k``.

    Adds the metrics ``recall_at_<k>`` for each k in ``recall_ks`` (a query scores 1 if at least
    one of its k nearest references has its label; Recall@1 equals PML's ``precision_at_1``) and
    ``ndcg_at_<k>`` for each k in ``ndcg_ks`` (binary relevance,
    ``DCG@k = sum_{i<=k} r_i / log2(i + 1)``, ideal DCG over ``min(k, R_q)`` positives, ``R_q`` =
    references sharing the query's label, the query itself excluded). Values are fractions in
    [0, 1] (PML convention); the paper's tables show x100. Queries with ``R_q = 0`` are excluded
    and ``ref_includes_query`` (self-retrieval) removes each query from its own neighbours, both as
    PML does for its other metrics; ``avg_of_avgs`` / ``return_per_class`` apply as well.

    **Streaming.** ``get_accuracy`` searches the neighbours of one chunk of queries at a time,
    turns them into per-query values of every selected metric and drops them; the means (or
    per-class means) are taken once at the end over all queries. Peak memory is
    O(chunk x references + queries x metrics), for every ``k`` including ``None``; the chunk holds
    ``memory_budget_mb / (64 bytes x (neighbours searched + 1))`` queries (for a search of
    neighbour lists; the positive-rank path below needs none). The per-query values are
    PML's formulas, each written once in :mod:`pml_proxies.functional.retrieval_metrics` and
    called by both paths, so every metric equals PML's calculator (and the unchunked
    computation) given the same neighbours. Label counts and the lone-query test take O(N)
    memory (PML's take O(classes x N)). NMI / AMI cluster all queries at once (O(N) memory). A
    kNN metric added by a subclass (or a PML metric a subclass overrides) is not streamed: it
    gets the whole search result, O(N x k), through PML's ``_get_accuracy`` as before.

    **One search.** The neighbours searched are widened to ``max(recall_ks + ndcg_ks)`` when PML's
    ``k`` gives fewer (``k`` is an int below that, or ``"max_bin_count"`` is smaller), and capped at
    the number of references (the query itself excluded). PML's metrics (and any other kNN metric
    of a subclass) still see exactly their ``k`` nearest neighbours, so their values equal PML's.
    When only the metrics of this class are selected, the search uses just the neighbours they
    need (``k=None`` does not then rank every reference).

    **Positive-rank path (k=None, large k).** Every streamed metric depends only on the
    positions of each query's positives (references with its label) in its ranking, so when the
    search would cover at least ``RANK_PATH_MIN_FRACTION`` (0.2) of the references (always for
    ``k=None`` with a PML metric selected) no neighbour list is built: per chunk of queries one
    matmul gives TorchKNN's ranking scores ``||r||^2 - 2 q.r`` against all references (the query
    itself excluded in self-retrieval); each query's positives come from its label's block of
    the label-sorted references and their scores are sorted (``(chunk, largest class)``); one
    ``searchsorted`` of every reference score among them and a per-row histogram give, for the
    j-th positive, the references ranked before it, hence its position, and every metric
    follows from the positions with PML's formulas and denominators. No row is sorted and no
    ``(chunk, N)`` metric matrix is built; the chunk holds ``memory_budget_mb / (12 bytes x
    references + 128 bytes x (largest class + 1))`` queries. **Ties:** a reference of another
    label at exactly the same distance as a positive ranks before it (pessimistic; the
    neighbour-list path and PML order such ties arbitrarily, as ``topk`` / faiss return them);
    without such ties the values equal the neighbour-list path's, precision@1, R-Precision,
    MRR, Recall@k and nDCG@k (a left-to-right running sum) exactly on CPU, MAP and MAP@R up to
    float64 summation order (gaps of a few 1e-17 seen; the tests allow 1e-12). The path is
    taken only where it is exact: the default label comparison on 1-D labels, the calculator's
    own exact search (``knn_func`` ``None``, a ``DefaultKNN`` or a ``TorchKNN``, not a
    subclass: any other ``knn_func`` is always called) and no selected kNN metric that needs
    the neighbour list (a subclass's); ``last_path`` tells which path the latest
    ``get_accuracy`` took (``"rank"`` or ``"neighbours"``). With faiss installed the
    rank path ranks with torch, not faiss (both exact L2; only near-ties may differ).

    **Input.** ``get_accuracy`` raises ``ValueError`` for NaN or inf in the embeddings or the
    labels (after PML's conversion to float32), naming the argument and its bad rows, and makes
    the inputs contiguous. The L2 searches of this module (``DefaultKNN``, ``TorchKNN``, the
    positive-rank path) rank the data shifted by about the references' mean
    (:func:`~pml_proxies.utils.knn.reference_shift`), so a shared offset costs no precision;
    their ranking is exact up to the float32 bound in :mod:`pml_proxies.utils.knn`. A custom
    ``knn_func`` (say cosine or inner product) gets the embeddings unshifted.

    ``mean_reciprocal_rank`` is listed in ``requires_knn()`` (PML omits it, so alone it raises a
    TypeError there).

    Args:
        include: metric names to compute (default: all), e.g. ``("recall_at_1", "ndcg_at_10")``.
        exclude: metric names to skip.
        avg_of_avgs: average per class, then over classes.
        return_per_class: return one value per query class.
        k: PML's neighbour count for its metrics: ``None`` (all references), an int, or
            ``"max_bin_count"``.
        label_comparison_fn: PML's custom label comparison (default ``torch.eq``).
        device: where embeddings go (default: CUDA if available).
        knn_func: a PML ``knn_func``; default :class:`~pml_proxies.utils.knn.DefaultKNN` (PML's
            ``FaissKNN``, exact L2, when faiss is installed, else the exact pure-torch
            :class:`~pml_proxies.utils.knn.TorchKNN`). It is called once per chunk of queries,
            with ``k + 1`` neighbours and ``ref_includes_query=False`` for self-retrieval (the
            calculator then removes each query's own index as PML's ``return_results`` does).
        kmeans_func: a PML ``kmeans_func`` for NMI / AMI; default
            :class:`~pml_proxies.utils.knn.DefaultKMeans` (faiss, else scikit-learn).
        recall_ks: Recall@k cut-offs, positive ints (``(1, 2, 4, 8)``, as in the Proxy-Anchor and
            MPA tables); ``()`` or ``None`` for none.
        ndcg_ks: nDCG@k cut-offs, positive ints (``(10,)``, the paper's Table 3); ``()`` or
            ``None`` for none.
        memory_budget_mb: memory for one chunk of queries, in MiB (default 1024); sets the chunk
            size (at least one query), not the results. Also bounds the per-class averaging.
    """

    def __init__(
        self,
        include=(),
        exclude=(),
        avg_of_avgs=False,
        return_per_class=False,
        k=None,
        label_comparison_fn=None,
        device=None,
        knn_func=None,
        kmeans_func=None,
        recall_ks: int | Iterable[int] | None = DEFAULT_RECALL_KS,
        ndcg_ks: int | Iterable[int] | None = DEFAULT_NDCG_KS,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    ):
        self.recall_ks = _validate_ks(recall_ks, "recall_ks")
        self.ndcg_ks = _validate_ks(ndcg_ks, "ndcg_ks")
        self.memory_budget_mb = check_real(
            "memory_budget_mb", memory_budget_mb, low=0.0, low_inclusive=False
        )
        # name -> cut-off of the metrics added here; PML discovers "calculate_<name>" via dir()
        self.retrieval_metric_ks: dict[str, int] = {}
        # name -> per-query values of one chunk, on either path: the streamed metrics
        self._per_query: dict[str, Callable[[_Chunk], torch.Tensor]] = {}
        added: tuple[tuple[str, tuple[int, ...], Callable, Callable], ...] = (
            ("recall_at_", self.recall_ks, self._calculate_recall_at_k, _recall),
            ("ndcg_at_", self.ndcg_ks, self._calculate_ndcg_at_k, _ndcg),
        )
        for prefix, ks, fn, metric in added:
            for cutoff in ks:
                setattr(self, f"calculate_{prefix}{cutoff}", functools.partial(fn, cutoff))
                self.retrieval_metric_ks[f"{prefix}{cutoff}"] = cutoff
                self._per_query[f"{prefix}{cutoff}"] = functools.partial(metric, cutoff)
        for name, per_query in _PML_PER_QUERY.items():
            # a subclass overriding one of PML's metrics gets the unstreamed path for it
            if getattr(type(self), f"calculate_{name}") is getattr(
                AccuracyCalculator, f"calculate_{name}"
            ):
                self._per_query[name] = per_query
        self.last_path: str | None = None
        super().__init__(
            include=include,
            exclude=exclude,
            avg_of_avgs=avg_of_avgs,
            return_per_class=return_per_class,
            k=k,
            label_comparison_fn=label_comparison_fn,
            device=device,
            knn_func=DefaultKNN() if knn_func is None else knn_func,
            kmeans_func=DefaultKMeans() if kmeans_func is None else kmeans_func,
        )

    def requires_knn(self):
        names = super().requires_knn()
        if "mean_reciprocal_rank" not in names:
            names = names + ["mean_reciprocal_rank"]
        return names + list(self.retrieval_metric_ks)

    def _search_k(
        self, bin_counts, num_reference_embeddings, ref_includes_query
    ) -> tuple[int, int]:
        """``(neighbours to search, neighbours PML's metrics see)``."""
        available = num_reference_embeddings - int(ref_includes_query)
        current = self.get_curr_metrics()
        needed = max(
            (self.retrieval_metric_ks[m] for m in current if m in self.retrieval_metric_ks),
            default=0,
        )
        knn_metrics = set(self.requires_knn())
        others_need_knn = any(
            m in knn_metrics and m not in self.retrieval_metric_ks for m in current
        )
        pml_k = (
            super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
            if others_need_knn
            else 0
        )
        num_k = max(0, min(max(pml_k, needed), available))
        return num_k, min(pml_k, num_k)

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        """Neighbours to search: PML's k for its metrics, widened for Recall@k / nDCG@k."""
        return self._search_k(bin_counts, num_reference_embeddings, ref_includes_query)[0]

    def chunk_size(self, num_neighbours: int) -> int:
        """Queries per chunk for a search of ``num_neighbours`` neighbours (at least 1)."""
        per_query = (num_neighbours + 1) * _BYTES_PER_NEIGHBOUR
        return max(1, int(self.memory_budget_mb * 2**20 // per_query))

    def rank_chunk_size(self, num_references: int, max_positives: int) -> int:
        """Queries per chunk on the positive-rank path (at least 1)."""
        per_query = (
            num_references * _RANK_BYTES_PER_REFERENCE
            + (max_positives + 1) * _RANK_BYTES_PER_POSITIVE
        )
        return max(1, int(self.memory_budget_mb * 2**20 // per_query))

    def uses_rank_path(self, num_k: int, available: int, names, query_labels, reference_labels):
        """True when the positive-rank path is exact and pays: every selected kNN metric is
        streamed, the default label comparison on 1-D labels, the calculator's own exact
        search (``DefaultKNN`` or ``TorchKNN``, not a subclass), and a search of at least
        ``RANK_PATH_MIN_FRACTION`` of the references (every one with ``k=None``)."""
        return (
            num_k > 0
            and num_k >= RANK_PATH_MIN_FRACTION * available
            and all(n in self._per_query for n in names)
            and self.label_comparison_fn is pml_ac.EQUALITY
            and query_labels.dim() == 1
            and reference_labels.dim() == 1
            and type(self.knn_func) in (DefaultKNN, TorchKNN)
        )

    # ------------------------------------------------------------- PML's metric entry points
    # Unstreamed: each computes its metric from a given ``knn_labels`` (PML's interface, used by
    # PML's ``_get_accuracy`` and by callers that have the neighbours already).

    def _unstreamed(
        self,
        name,
        knn_labels,
        query_labels,
        not_lone_query_mask,
        label_counts,
        ref_includes_query=False,
    ):
        if not torch.any(torch.as_tensor(not_lone_query_mask)):
            return pml_ac.nan_accuracy(label_counts[0], self.return_per_class)
        knn_labels = knn_labels[not_lone_query_mask]
        query_labels = query_labels[not_lone_query_mask]
        counts = _query_counts(
            query_labels, label_counts, ref_includes_query, self.label_comparison_fn
        )
        chunk = _neighbours(knn_labels, query_labels, counts, self.label_comparison_fn)
        fn = self._per_query.get(name) or _PML_PER_QUERY[name]
        return self._average(fn(chunk), query_labels)

    def _average(self, values: torch.Tensor, labels: torch.Tensor):
        return _average(
            values,
            labels,
            self.avg_of_avgs,
            self.return_per_class,
            self.memory_budget_mb * 2**20,
        )

    def calculate_precision_at_1(
        self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs
    ):
        return self._unstreamed(
            "precision_at_1", knn_labels, query_labels, not_lone_query_mask, label_counts
        )

    def calculate_r_precision(
        self,
        knn_labels,
        query_labels,
        not_lone_query_mask,
        ref_includes_query,
        label_counts,
        **kwargs,
    ):
        return self._unstreamed(
            "r_precision",
            knn_labels,
            query_labels,
            not_lone_query_mask,
            label_counts,
            ref_includes_query,
        )

    def calculate_mean_average_precision_at_r(
        self,
        knn_labels,
        query_labels,
        not_lone_query_mask,
        ref_includes_query,
        label_counts,
        **kwargs,
    ):
        return self._unstreamed(
            "mean_average_precision_at_r",
            knn_labels,
            query_labels,
            not_lone_query_mask,
            label_counts,
            ref_includes_query,
        )

    def calculate_mean_average_precision(
        self,
        knn_labels,
        query_labels,
        not_lone_query_mask,
        ref_includes_query,
        label_counts,
        **kwargs,
    ):
        return self._unstreamed(
            "mean_average_precision",
            knn_labels,
            query_labels,
            not_lone_query_mask,
            label_counts,
            ref_includes_query,
        )

    def calculate_mean_reciprocal_rank(
        self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs
    ):
        return self._unstreamed(
            "mean_reciprocal_rank", knn_labels, query_labels, not_lone_query_mask, label_counts
        )

    def _calculate_recall_at_k(
        self, cutoff, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs
    ):
        return self._unstreamed(
            f"recall_at_{cutoff}", knn_labels, query_labels, not_lone_query_mask, label_counts
        )

    def _calculate_ndcg_at_k(
        self,
        cutoff,
        knn_labels,
        query_labels,
        not_lone_query_mask,
        ref_includes_query,
        label_counts,
        **kwargs,
    ):
        return self._unstreamed(
            f"ndcg_at_{cutoff}",
            knn_labels,
            query_labels,
            not_lone_query_mask,
            label_counts,
            ref_includes_query,
        )

    # ----------------------------------------------------------------------- the streamed path

    def get_accuracy(
        self,
        query,
        query_labels,
        reference=None,
        reference_labels=None,
        ref_includes_query=False,
        include=(),
        exclude=(),
    ):
        """PML's ``get_accuracy`` (same arguments, checks and results), streamed over chunks.

        Also raises ``ValueError`` for embeddings or labels holding NaN or inf (naming the
        argument and counting its bad rows): they would otherwise score as perfect retrieval
        or corrupt the label counts. Inputs are made contiguous (faiss rejects strided arrays).
        """
        if reference is None:
            reference, reference_labels, ref_includes_query = query, query_labels, True
        query, reference, query_labels, reference_labels = (
            c_f.numpy_to_torch(x).to(self.device).type(torch.float).contiguous()
            for x in (query, reference, query_labels, reference_labels)
        )
        if len(query) != len(query_labels) or len(reference) != len(reference_labels):
            raise ValueError("embeddings and labels must have the same length")
        for name, values in (
            ("query", query),
            ("reference", reference),
            ("query_labels", query_labels),
            ("reference_labels", reference_labels),
        ):
            _check_finite(name, values)
        if ref_includes_query and not (
            torch.allclose(query, reference[: len(query)])
            and torch.allclose(query_labels, reference_labels[: len(query)])
        ):
            raise ValueError(
                "When ref_includes_query is True, the first len(query) elements of reference "
                "must be equal to query.\nLikewise, the first len(query_labels) elements of "
                "reference_labels must be equal to query_labels.\n"
            )
        self.curr_function_dict = self.get_function_dict(include, exclude)
        kwargs: dict[str, Any] = {
            "query": query,
            "reference": reference,
            "query_labels": query_labels,
            "reference_labels": reference_labels,
            "ref_includes_query": ref_includes_query,
            "label_comparison_fn": self.label_comparison_fn,
        }
        results: dict[str, Any] = {}
        knn_names = [m for m in self.get_curr_metrics() if m in self.requires_knn()]
        if knn_names:
            results.update(self._streamed_knn_metrics(knn_names, kwargs))
        if any(m in self.requires_clustering() for m in self.get_curr_metrics()):
            kwargs["cluster_labels"] = self.get_cluster_labels(**kwargs)
        for name, fn in self.curr_function_dict.items():
            if name not in results:
                results[name] = fn(**kwargs)
        return {name: results[name] for name in self.curr_function_dict}

    def _streamed_knn_metrics(self, names: list[str], kwargs: dict[str, Any]) -> dict[str, Any]:
        query, reference = kwargs["query"], kwargs["reference"]
        query_labels, reference_labels = kwargs["query_labels"], kwargs["reference_labels"]
        ref_includes_query = kwargs["ref_includes_query"]
        label_counts = label_match_counts(query_labels, reference_labels, self.label_comparison_fn)
        lone_labels, not_lone = lone_query_labels(
            query_labels, label_counts, ref_includes_query, self.label_comparison_fn
        )
        num_k, pml_k = self._search_k(label_counts[1], len(reference), ref_includes_query)
        if not torch.any(not_lone):
            c_f.LOGGER.warning("None of the query labels are in the reference set.")
        available = len(reference) - int(ref_includes_query)
        if self.uses_rank_path(num_k, available, names, query_labels, reference_labels):
            self.last_path = "rank"
            # the log of PML's FaissKNN for the search this path replaces (once per call)
            c_f.LOGGER.info("running k-nn with k=%d", num_k + int(ref_includes_query))
            c_f.LOGGER.info("embedding dimensionality is %d", query.shape[1])
            counts = _query_counts(
                query_labels, label_counts, ref_includes_query, self.label_comparison_fn
            )
            per_query = self._values_from_ranks(names, kwargs, pml_k, counts)
            kept_labels = query_labels[not_lone]
            results: dict[str, Any] = {}
            for name in names:
                if not torch.any(not_lone):
                    results[name] = pml_ac.nan_accuracy(label_counts[0], self.return_per_class)
                else:
                    results[name] = self._average(per_query[name][not_lone], kept_labels)
            return results
        self.last_path = "neighbours"
        streamed = [n for n in names if n in self._per_query]
        others = [n for n in names if n not in self._per_query]
        values: dict[str, list[torch.Tensor]] = {n: [] for n in streamed}
        gathered: dict[str, list[torch.Tensor]] = {"knn_labels": [], "knn_distances": []}
        counts = _query_counts(
            query_labels, label_counts, ref_includes_query, self.label_comparison_fn
        )
        step = self.chunk_size(num_k)
        for start in range(0, len(query), step):
            end = min(start + step, len(query))
            distances, indices = self._search(
                query[start:end], num_k, reference, start, ref_includes_query
            )
            knn_labels = reference_labels[indices]
            if others:
                gathered["knn_labels"].append(knn_labels[:, :pml_k])
                gathered["knn_distances"].append(distances[:, :pml_k])
            keep = not_lone[start:end]
            if not streamed or not torch.any(keep):
                continue
            chunk = _neighbours(
                knn_labels[keep],
                query_labels[start:end][keep],
                _QueryCounts(*(c[start:end][keep] for c in counts)),
                self.label_comparison_fn,
                pml_k,
            )
            for name in streamed:
                values[name].append(self._per_query[name](chunk))
            del chunk, knn_labels, distances, indices
        results = {}
        kept_labels = query_labels[not_lone]
        for name in streamed:
            if not torch.any(not_lone):
                results[name] = pml_ac.nan_accuracy(label_counts[0], self.return_per_class)
            else:
                results[name] = self._average(torch.cat(values[name]), kept_labels)
        if others:
            full = dict(kwargs)
            full.update(
                label_counts=label_counts,
                lone_query_labels=lone_labels,
                not_lone_query_mask=not_lone,
                knn_labels=torch.cat(gathered["knn_labels"]),
                knn_distances=torch.cat(gathered["knn_distances"]),
            )
            results.update(
                super()._get_accuracy({n: self.curr_function_dict[n] for n in others}, **full)
            )
        return results

    def _search(self, query_chunk, num_k, reference, offset, ref_includes_query):
        """``(distances, indices)`` of one chunk's ``num_k`` nearest references; in
        self-retrieval one more is searched and the query's own index removed."""
        if not ref_includes_query:
            return self.knn_func(query_chunk, num_k, reference, False)
        distances, indices = self.knn_func(query_chunk, num_k + 1, reference, False)
        return _remove_self(distances, indices, offset)

    def _values_from_ranks(
        self, names: list[str], kwargs: dict[str, Any], pml_k: int, counts: _QueryCounts
    ) -> dict[str, torch.Tensor]:
        """Per-query values of ``names`` for every query (lone ones included, to be dropped),
        from the positions of each query's positives: no neighbour list, no sort of a row."""
        query, reference = kwargs["query"], kwargs["reference"]
        ref_includes_query = kwargs["ref_includes_query"]
        order, block_start, block_size = _class_blocks(
            kwargs["query_labels"], kwargs["reference_labels"]
        )
        slots = max(1, int(block_size.max())) if len(block_size) else 1
        last = len(reference) - 1
        slot = torch.arange(slots, device=query.device)
        values: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        step = min(self.rank_chunk_size(len(reference), slots), max(1, len(query)))
        step = max(1, min(step, (2**31 - 1) // (slots + 1)))  # the int32 histogram index
        with torch.no_grad():
            query, reference = centre(query, reference.to(query.dtype))  # TorchKNN's ranking
            reference_t = reference.t()
            ref_sq = reference.pow(2).sum(dim=1)
            buffers = (
                query.new_empty(step, len(reference)),
                torch.empty(step, len(reference), dtype=torch.int32, device=query.device),
            )
            for start in range(0, len(query), step):
                end = min(start + step, len(query))
                first = block_start[start:end, None]
                size = block_size[start:end, None]
                members = torch.where(slot < size, first + slot, first).clamp(max=last)
                own = torch.arange(start, end, device=query.device) if ref_includes_query else None
                positions, valid = _positive_positions(
                    query[start:end],
                    reference_t,
                    ref_sq,
                    order[members],
                    size[:, 0],
                    own,
                    buffers,
                )
                chunk = _Chunk(
                    positions, valid, positions, valid, pml_k, *(c[start:end] for c in counts)
                )
                for name in names:
                    values[name].append(self._per_query[name](chunk))
        return {name: torch.cat(v) for name, v in values.items()}
