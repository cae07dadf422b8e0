"""PML's ``AccuracyCalculator`` with nDCG@k and deep-metric-learning Recall@k, with or without faiss."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Iterable

import torch
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils import common_functions as c_f

from .knn import DefaultKMeans, DefaultKNN

__all__ = [
    "DEFAULT_NDCG_KS",
    "DEFAULT_RECALL_KS",
    "AccuracyCalculator",
    "ndcg_at_k",
    "recall_at_k",
    "relevant_counts",
]

DEFAULT_RECALL_KS = (1, 2, 4, 8)
DEFAULT_NDCG_KS = (10,)


def _validate_ks(ks: int | Iterable[int] | None, name: str) -> tuple[int, ...]:
    """Sorted, de-duplicated positive ints; ``None`` or ``()`` means no such metric."""
    if ks is None:
        return ()
    if isinstance(ks, numbers.Integral):
        ks = (ks,)
    if isinstance(ks, str) or not isinstance(ks, Iterable):
        raise ValueError(f"{name} must be a positive int or a sequence of them, got {ks!r}")
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{name} must contain only positive ints, got {k!r} in {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def _same_label(knn_labels, query_labels, k, label_comparison_fn) -> torch.Tensor:
    """``(n, min(k, num_neighbours))`` bool: does the i-th neighbour have the query's label."""
    same = label_comparison_fn(query_labels[:, None], knn_labels[:, :k])
    if same.dim() > 2:
        same = c_f.torch_all_from_dim_to_end(same, 2)
    return same


def relevant_counts(
    query_labels: torch.Tensor,
    label_counts: tuple[torch.Tensor, torch.Tensor],
    ref_includes_query: bool,
    label_comparison_fn=pml_ac.EQUALITY,
) -> torch.Tensor:
    """``R_q`` per query: the references with the query's label, the query itself excluded.

    ``label_counts`` is PML's ``get_label_match_counts(query_labels, reference_labels, fn)``;
    with ``ref_includes_query`` the query's own entry is removed exactly as PML's
    ``get_lone_query_labels`` does, so ``R_q > 0`` holds for PML's not-lone queries.
    """
    unique_labels, match_counts = label_counts
    _, inverse = torch.unique(query_labels, dim=0, return_inverse=True)
    counts = match_counts[inverse]
    if ref_includes_query:
        matches_itself = label_comparison_fn(unique_labels, unique_labels)
        if matches_itself.dim() > 1:
            matches_itself = c_f.torch_all_from_dim_to_end(matches_itself, 1)
        counts = counts - matches_itself.long()[inverse]
    return counts


def recall_at_k(
    knn_labels: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    avg_of_avgs: bool = False,
    return_per_class: bool = False,
    label_comparison_fn=pml_ac.EQUALITY,
):
    """DML Recall@k: 1 for a query when one of its ``k`` nearest references has its label."""
    hit = _same_label(knn_labels, query_labels, k, label_comparison_fn).any(dim=1)
    return pml_ac.maybe_get_avg_of_avgs(
        hit.to(torch.float64), query_labels[:, None], avg_of_avgs, return_per_class
    )


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
    same = _same_label(knn_labels, query_labels, k, label_comparison_fn).to(torch.float64)
    ranks = torch.arange(1, k + 1, dtype=torch.float64, device=same.device)
    discounts = 1.0 / torch.log2(ranks + 1.0)
    dcg = same @ discounts[: same.shape[1]]  # 2^r - 1 = r for binary r
    ideal_len = num_relevant.clamp(min=1, max=k).to(torch.long)
    idcg = torch.cumsum(discounts, dim=0)[ideal_len - 1]
    return pml_ac.maybe_get_avg_of_avgs(
        dcg / idcg, query_labels[:, None], avg_of_avgs, return_per_class
    )


class AccuracyCalculator(pml_ac.AccuracyCalculator):
    """PML's ``AccuracyCalculator`` plus nDCG@k (Saeki et al., MPA paper, eq. 19-20) and
    deep-metric-learning Recall@k, all from one neighbour search, and usable without faiss.

    Adds the metrics ``recall_at_<k>`` for each k in ``recall_ks`` (a query scores 1 if at least
    one of its k nearest references has its label; Recall@1 equals PML's ``precision_at_1``) and
    ``ndcg_at_<k>`` for each k in ``ndcg_ks`` (binary relevance,
    ``DCG@k = sum_{i<=k} r_i / log2(i + 1)``, ideal DCG over ``min(k, R_q)`` positives, ``R_q`` =
    references sharing the query's label, the query itself excluded). Values are fractions in
    [0, 1] (PML convention); the paper's tables show x100. Queries with ``R_q = 0`` are excluded
    and ``ref_includes_query`` (self-retrieval) removes each query from its own neighbours, both as
    PML does for its other metrics; ``avg_of_avgs`` / ``return_per_class`` apply as well.

    The single kNN search is widened to ``max(recall_ks + ndcg_ks)`` neighbours when PML's ``k``
    gives fewer (``k`` is an int below that, or ``"max_bin_count"`` is smaller), and capped at the
    number of references (the query itself excluded). PML's metrics (and any other kNN metric of
    a subclass) still see exactly their ``k`` nearest neighbours, so their values equal PML's. When
    only the metrics of this class are selected, the search uses just the neighbours they need
    (``k=None`` does not then rank every reference).

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
            :class:`~pml_proxies.utils.knn.TorchKNN`).
        kmeans_func: a PML ``kmeans_func`` for NMI / AMI; default
            :class:`~pml_proxies.utils.knn.DefaultKMeans` (faiss, else scikit-learn).
        recall_ks: Recall@k cut-offs, positive ints (``(1, 2, 4, 8)``, as in the Proxy-Anchor and
            MPA tables); ``()`` or ``None`` for none.
        ndcg_ks: nDCG@k cut-offs, positive ints (``(10,)``, the paper's Table 3); ``()`` or
            ``None`` for none.
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
    ):
        self.recall_ks = _validate_ks(recall_ks, "recall_ks")
        self.ndcg_ks = _validate_ks(ndcg_ks, "ndcg_ks")
        # name -> cut-off of the metrics added here; PML discovers "calculate_<name>" via dir()
        self.retrieval_metric_ks: dict[str, int] = {}
        for prefix, ks, fn in (
            ("recall_at_", self.recall_ks, self._calculate_recall_at_k),
            ("ndcg_at_", self.ndcg_ks, self._calculate_ndcg_at_k),
        ):
            for cutoff in ks:
                setattr(self, f"calculate_{prefix}{cutoff}", functools.partial(fn, cutoff))
                self.retrieval_metric_ks[f"{prefix}{cutoff}"] = cutoff
        self._pml_num_k: int | None = None
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

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        """Neighbours to search: PML's k for its metrics, widened for Recall@k / nDCG@k."""
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
        self._pml_num_k = min(pml_k, num_k)
        return num_k

    def _get_accuracy(self, function_dict, **kwargs):
        if "knn_labels" not in kwargs or self._pml_num_k is None:
            return super()._get_accuracy(function_dict, **kwargs)
        pml_kwargs = dict(kwargs)
        pml_kwargs["knn_labels"] = kwargs["knn_labels"][:, : self._pml_num_k]
        pml_kwargs["knn_distances"] = kwargs["knn_distances"][:, : self._pml_num_k]
        return {
            name: fn(**(kwargs if name in self.retrieval_metric_ks else pml_kwargs))
            for name, fn in function_dict.items()
        }

    def _calculate_recall_at_k(
        self, cutoff, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs
    ):
        if not torch.any(not_lone_query_mask):
            return pml_ac.nan_accuracy(label_counts[0], self.return_per_class)
        return recall_at_k(
            knn_labels[not_lone_query_mask],
            query_labels[not_lone_query_mask],
            cutoff,
            self.avg_of_avgs,
            self.return_per_class,
            self.label_comparison_fn,
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
        if not torch.any(not_lone_query_mask):
            return pml_ac.nan_accuracy(label_counts[0], self.return_per_class)
        num_relevant = relevant_counts(
            query_labels, label_counts, ref_includes_query, self.label_comparison_fn
        )
        return ndcg_at_k(
            knn_labels[not_lone_query_mask],
            query_labels[not_lone_query_mask],
            num_relevant[not_lone_query_mask],
            cutoff,
            self.avg_of_avgs,
            self.return_per_class,
            self.label_comparison_fn,
        )
