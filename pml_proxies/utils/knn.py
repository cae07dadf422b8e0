"""Neighbour search and clustering back-ends that work with or without faiss.

PML's ``AccuracyCalculator`` defaults to ``FaissKNN`` / ``FaissKMeans`` and fails with
``NameError: faiss`` when faiss is not installed. The classes here are drop-in ``knn_func`` /
``kmeans_func`` objects with PML's calling conventions:

* :class:`TorchKNN`: exact, pure-torch k-nearest-neighbour search (squared Euclidean distance, the
  semantics of faiss ``IndexFlatL2`` used by PML's default ``FaissKNN``), blocked over queries so
  that memory stays bounded, with no cap on ``k``; runs on the tensors' device (CPU or CUDA).
* :class:`DefaultKNN`: PML's ``FaissKNN`` when faiss can be imported (faiss-gpu searches CUDA
  tensors on the GPU, as in PML), otherwise :class:`TorchKNN`. CUDA tensors with a CPU-only faiss
  build go to :class:`TorchKNN` on the GPU (exact as well, and no device round trip).

Both search the data shifted by ``m`` (:func:`reference_shift`, about the references' mean;
:func:`centre`): squared Euclidean distances do not change under a common shift, but the ranking
scores ``||r||^2 - 2 q.r`` (and faiss's, the same expansion) round to a few ulps of
``(||q|| + ||r||)**2``, so embeddings sharing a large offset (say ``randn + 1000`` in float32)
would lose the digits that separate their neighbours. After the shift, two references whose
exact squared distances to a query ``q`` differ by more than
``B = (2 d + 8) u (||q - m|| + max_r ||r - m||)**2`` are always ranked in the right order (``d``
the embedding size, ``u`` the unit roundoff of the computing dtype: ``2**-24`` for float32,
``2**-53`` for float64; a worst-case bound, covering the rounding of the scores in any summation
order, faiss's included, and of the shift). Closer pairs (near-ties) may be ranked either way,
as by any float32 search; exact ties in an unspecified order. L2-normalised embeddings have
norms of at most 1, so no offset can arise and ``B`` stays about ``d`` ulps of 1.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.inference import return_results

from ..functional.validation import check_int

__all__ = [
    "DefaultKMeans",
    "DefaultKNN",
    "SklearnKMeans",
    "TorchKNN",
    "centre",
    "reference_shift",
    "faiss_available",
    "faiss_gpu_available",
    "ranking_scores",
    "smallest_k",
]


def faiss_available() -> bool:
    """True when ``import faiss`` succeeds (checked at call time, so it can be monkeypatched)."""
    try:
        importlib.import_module("faiss")
    except ImportError:
        return False
    return True


def faiss_gpu_available() -> bool:
    """True when faiss is installed with GPU support and sees at least one GPU."""
    if not faiss_available():
        return False
    import faiss

    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus is not None and get_num_gpus() > 0


def _group_size(num_references: int, k: int) -> int:
    """Columns per group for the two-stage selection of :func:`smallest_k` (1: plain ``topk``).

    The two stages scan ``num_references / g`` group minima and ``k g`` candidates; ``g =
    sqrt(num_references / k)`` balances them. Below ``g = 4`` the gain does not pay its overhead.
    """
    if k < 1:
        return 1
    group = int(math.sqrt(num_references / k))
    return group if group >= 4 else 1


def reference_shift(reference: torch.Tensor) -> torch.Tensor:
    """The shift :func:`centre` subtracts, ``(1, d)``: per dimension, the references' mean
    rounded to a multiple of ``g``, the power of two at or below the largest deviation from the
    mean (the mean itself for a constant dimension). The shifted coordinates stay within about
    1.5 deviations of 0, the subtraction is exact in practice (the shift is a multiple of the
    offset's ulp), so exact ties stay ties, and data centred within its spread gets shift 0."""
    mean = reference.mean(dim=0, keepdim=True)
    deviation = (reference - mean).abs().amax(dim=0, keepdim=True)
    grid = torch.exp2(torch.floor(torch.log2(deviation)))
    return torch.where(deviation > 0, torch.round(mean / grid) * grid, mean)


def centre(query: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query - m, reference - m)``, contiguous (strided input gives the same values), ``m``
    = :func:`reference_shift`: the same squared Euclidean distances (a common shift), with
    norms on the scale of the data's spread rather than its offset, which the float32 ranking
    ``||r||^2 - 2 q.r`` needs to be exact (module docstring). The inputs themselves (made
    contiguous) when ``m`` is 0 or the reference set empty; one copy when ``query is
    reference``. Only for L2: a shift changes inner products and cosine similarities."""
    same = query is reference
    query, reference = query.contiguous(), reference.contiguous()  # one reduction order
    if len(reference) == 0:
        return query, reference
    shift = reference_shift(reference)
    if not bool(shift.any()):
        return query, reference
    shifted = reference - shift
    return (shifted if same else query - shift), shifted


def ranking_scores(
    queries: torch.Tensor, reference_t: torch.Tensor, ref_sq: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``out = ||r||^2 - 2 q.r``: each query's squared Euclidean distances to the references
    minus its own ``||q||^2`` (a constant along a row, so the same ranking), from one ``addmm``
    into ``out``. ``reference_t`` is ``references.t()``, ``ref_sq`` their squared norms. The
    ranking of :class:`TorchKNN` and of the calculator's positive-rank path."""
    return torch.addmm(ref_sq.unsqueeze(0), queries, reference_t, alpha=-2.0, out=out)


def smallest_k(scores: torch.Tensor, k: int, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest entries of each row of ``scores``, ascending: ``(values, columns)``.

    With ``group > 1`` the ``W = group * G`` columns form ``G`` strided groups (column ``c`` is in
    group ``c % G``); each row's ``k`` smallest values lie in the ``k`` groups with the smallest
    minima (a group whose minimum exceeds the k-th smallest value holds none of them), so one
    ``topk`` over the ``G`` minima and one over the ``k * group`` candidates replace a ``topk``
    over all ``W`` columns, which is the slow part on CPU. The values returned are exactly those
    of ``torch.topk``; among tied values the columns may differ (as between any two exact
    searches). ``W`` must be a multiple of ``group`` and ``G >= k``.
    """
    rows, width = scores.shape
    if group <= 1:
        return torch.topk(scores, k, dim=1, largest=False, sorted=True)
    num_groups = width // group
    strided = scores.view(rows, group, num_groups)
    _, group_ids = torch.topk(strided.amin(dim=1), k, dim=1, largest=False, sorted=False)
    candidates = strided.gather(2, group_ids.unsqueeze(1).expand(rows, group, k))
    values, position = torch.topk(candidates.view(rows, group * k), k, dim=1, largest=False)
    columns = (position // k) * num_groups + group_ids.gather(1, position % k)
    return values, columns


class TorchKNN:
    """Exact k-nearest-neighbour search in pure torch, a PML ``knn_func`` without a neighbour cap.

    Distances are squared Euclidean distances, as returned by PML's default ``FaissKNN`` (faiss
    ``IndexFlatL2``); for L2-normalised embeddings this ranks exactly like cosine similarity.
    The search runs on contiguous copies of the data centred on the references' mean
    (:func:`centre`; exactness bound in the module docstring), so strided input works. Queries
    are processed in blocks whose ``block x references`` score matrix has at most
    ``max_chunk_elements`` entries (one buffer, reused). Each block is ranked by
    ``||r||^2 - 2 q.r`` (one ``addmm``; ``||q||^2`` is added to the ``k`` selected entries only)
    and its ``k`` smallest entries are found by the two-stage selection of :func:`smallest_k`.
    Ties are broken in an unspecified order, as in faiss. Like PML's ``FaissKNN``, each call logs
    ``running k-nn with k=...`` and the embedding dimensionality at INFO level on PML's logger.

    Args:
        batch_size: queries per block; ``None`` picks it from ``max_chunk_elements``.
        max_chunk_elements: bound on ``block x num_references`` when ``batch_size`` is ``None``
            (default ``2**24``: 64 MiB of float32 scores).

    Call:
        ``knn(query, k, reference, ref_includes_query=False) -> (distances, indices)``, both
        ``(len(query), k)``, nearest first. With ``ref_includes_query`` the first ``len(query)``
        references are the queries themselves and each query's own index is removed, as PML does.
    """

    def __init__(self, batch_size: int | None = None, max_chunk_elements: int = 2**24):
        if batch_size is not None:
            batch_size = check_int("batch_size", batch_size, low=1)
        self.batch_size = batch_size
        self.max_chunk_elements = check_int("max_chunk_elements", max_chunk_elements, low=1)

    def __call__(
        self,
        query: torch.Tensor,
        k: int,
        reference: torch.Tensor | None = None,
        ref_includes_query: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if reference is None:
            raise ValueError("TorchKNN keeps no index: pass the reference embeddings")
        if query.dim() != 2 or reference.dim() != 2 or query.shape[1] != reference.shape[1]:
            raise ValueError(
                f"query and reference must be 2-D with the same embedding size, got "
                f"{tuple(query.shape)} and {tuple(reference.shape)}"
            )
        num_k = int(k) + int(bool(ref_includes_query))
        if int(k) < 0 or num_k > len(reference):
            raise ValueError(
                f"k={k} neighbours requested but the reference set has {len(reference)} "
                f"embeddings{' (the query itself excluded)' if ref_includes_query else ''}"
            )
        c_f.LOGGER.info("running k-nn with k=%d", num_k)
        c_f.LOGGER.info("embedding dimensionality is %d", query.shape[1])
        with torch.no_grad():
            distances, indices = self._search(query, num_k, reference)
        return return_results(distances, indices, ref_includes_query)

    def _search(
        self, query: torch.Tensor, num_k: int, reference: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        reference = reference.to(device=query.device, dtype=query.dtype)
        query, reference = centre(query, reference)
        ref_sq = reference.pow(2).sum(dim=1)
        group = _group_size(len(reference), num_k)
        padding = -len(reference) % group
        if padding:  # dummy references at distance +inf make the width a multiple of group
            reference = torch.cat([reference, reference.new_zeros(padding, reference.shape[1])])
            ref_sq = torch.cat([ref_sq, ref_sq.new_full((padding,), math.inf)])
        width = len(reference)
        batch = self.batch_size or max(1, self.max_chunk_elements // width)
        batch = min(batch, max(1, len(query)))
        distances = torch.empty(len(query), num_k, dtype=query.dtype, device=query.device)
        indices = torch.empty(len(query), num_k, dtype=torch.long, device=query.device)
        scores = torch.empty(batch, width, dtype=query.dtype, device=query.device)
        reference_t = reference.t()
        for start in range(0, len(query), batch):
            block = query[start : start + batch]
            out = scores[: len(block)]
            ranking_scores(block, reference_t, ref_sq, out)
            values, columns = smallest_k(out, num_k, group)
            q_sq = block.pow(2).sum(dim=1, keepdim=True)
            distances[start : start + len(block)] = values.add_(q_sq).clamp_(min=0)
            indices[start : start + len(block)] = columns
        return distances, indices


class DefaultKNN:
    """The default ``knn_func`` of :class:`pml_proxies.AccuracyCalculator`.

    Per call: PML's ``FaissKNN`` (exact L2, a fresh index each call) when faiss is importable,
    except for CUDA tensors with a faiss build that has no GPU support; otherwise
    :class:`TorchKNN`. Both return squared Euclidean distances and search the data centred on the
    references' mean (:func:`centre`, contiguous copies: faiss rejects strided arrays).
    ``last_backend`` names the back-end used by the latest call (``"faiss"`` or ``"torch"``).

    Args:
        torch_knn: the :class:`TorchKNN` used without faiss (default ``TorchKNN()``).
    """

    def __init__(self, torch_knn: TorchKNN | None = None):
        self.torch_knn = TorchKNN() if torch_knn is None else torch_knn
        self.last_backend: str | None = None

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        use_faiss = faiss_available() and (not query.is_cuda or faiss_gpu_available())
        if use_faiss:
            from pytorch_metric_learning.utils.inference import FaissKNN

            knn = FaissKNN()
            if reference is not None:
                query, reference = centre(query, reference)
        else:
            knn = self.torch_knn
        self.last_backend = "faiss" if use_faiss else "torch"
        return knn(query, k, reference, ref_includes_query)


class SklearnKMeans:
    """k-means clustering with scikit-learn, a PML ``kmeans_func`` (``f(x, num_clusters)``).

    Used for NMI / AMI when faiss is absent. Mirrors PML's default ``FaissKMeans(niter=20)``: one
    k-means++ initialisation, at most 20 Lloyd iterations, a fixed seed.

    Args:
        max_iter: Lloyd iterations (20).
        random_state: seed (0).
    """

    def __init__(self, max_iter: int = 20, random_state: int = 0):
        self.max_iter = max_iter
        self.random_state = random_state

    def __call__(self, x: torch.Tensor, nmb_clusters: int) -> torch.Tensor:
        from sklearn.cluster import KMeans

        device = x.device
        data = c_f.to_numpy(x).astype(np.float32)
        kmeans = KMeans(
            n_clusters=int(nmb_clusters),
            n_init=1,
            max_iter=self.max_iter,
            random_state=self.random_state,
        )
        labels = kmeans.fit_predict(data)
        return torch.as_tensor(labels, dtype=torch.long, device=device)


class DefaultKMeans:
    """The default ``kmeans_func`` of :class:`pml_proxies.AccuracyCalculator` (NMI / AMI).

    Per call: PML's ``FaissKMeans(niter=20)`` when faiss is importable (on the GPU for CUDA
    tensors when faiss has GPU support), otherwise :class:`SklearnKMeans`. ``last_backend`` names
    the back-end used by the latest call (``"faiss"`` or ``"sklearn"``).
    """

    def __init__(self, sklearn_kmeans: SklearnKMeans | None = None):
        self.sklearn_kmeans = SklearnKMeans() if sklearn_kmeans is None else sklearn_kmeans
        self.last_backend: str | None = None

    def __call__(self, x: torch.Tensor, nmb_clusters: int) -> torch.Tensor:
        if faiss_available():
            from pytorch_metric_learning.utils.inference import FaissKMeans

            self.last_backend = "faiss"
            gpu = x.is_cuda and faiss_gpu_available()
            return FaissKMeans(niter=20, gpu=gpu)(x, nmb_clusters)
        self.last_backend = "sklearn"
        return self.sklearn_kmeans(x, nmb_clusters)
