"""Neighbour search and clustering back-ends that work with or without faiss.

PML's ``AccuracyCalculator`` defaults to ``FaissKNN`` / ``FaissKMeans`` and fails with
``NameError: faiss`` when faiss is not installed. The classes here are drop-in ``knn_func`` /
``kmeans_func`` objects with PML's calling conventions:

* :class:`TorchKNN`: exact, pure-torch k-nearest-neighbour search (squared Euclidean distance, the
  semantics of faiss ``IndexFlatL2`` used by PML's default ``FaissKNN``), chunked over queries so
  that memory stays bounded; runs on the tensors' device (CPU or CUDA).
* :class:`DefaultKNN`: PML's ``FaissKNN`` when faiss can be imported (faiss-gpu searches CUDA
  tensors on the GPU, as in PML), otherwise :class:`TorchKNN`. CUDA tensors with a CPU-only faiss
  build go to :class:`TorchKNN` on the GPU (exact as well, and no device round trip).
* :class:`DefaultKMeans`: PML's ``FaissKMeans`` when faiss can be imported, otherwise
  :class:`SklearnKMeans` (k-means from scikit-learn), for NMI / AMI.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.inference import return_results

__all__ = [
    "DefaultKMeans",
    "DefaultKNN",
    "SklearnKMeans",
    "TorchKNN",
    "faiss_available",
    "faiss_gpu_available",
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


def _squared_l2(query: torch.Tensor, reference: torch.Tensor, ref_sq: torch.Tensor) -> torch.Tensor:
    """``||q - r||^2`` for every pair, by the same expansion faiss uses, clamped at 0."""
    q_sq = query.pow(2).sum(dim=1, keepdim=True)
    dist = torch.addmm(ref_sq.unsqueeze(0), query, reference.t(), beta=1.0, alpha=-2.0)
    return dist.add_(q_sq).clamp_(min=0)


class TorchKNN:
    """Exact k-nearest-neighbour search in pure torch, a PML ``knn_func``.

    Distances are squared Euclidean distances, as returned by PML's default ``FaissKNN`` (faiss
    ``IndexFlatL2``); for L2-normalised embeddings this ranks exactly like cosine similarity.
    Queries are processed in chunks so that one chunk's distance matrix has at most
    ``max_chunk_elements`` entries. Ties are broken by ``torch.topk`` (unspecified order, as in
    faiss).

    Args:
        batch_size: queries per chunk; ``None`` picks it from ``max_chunk_elements``.
        max_chunk_elements: bound on ``chunk_queries x num_references`` when ``batch_size`` is
            ``None`` (default ``2**24``: 64 MiB of float32 distances).

    Call:
        ``knn(query, k, reference, ref_includes_query=False) -> (distances, indices)``, both
        ``(len(query), k)``, nearest first. With ``ref_includes_query`` the first ``len(query)``
        references are the queries themselves and each query's own index is removed, as PML does.
    """

    def __init__(self, batch_size: int | None = None, max_chunk_elements: int = 2**24):
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if max_chunk_elements < 1:
            raise ValueError(f"max_chunk_elements must be positive, got {max_chunk_elements!r}")
        self.batch_size = batch_size
        self.max_chunk_elements = int(max_chunk_elements)

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
        reference = reference.to(device=query.device, dtype=query.dtype)
        ref_sq = reference.pow(2).sum(dim=1)
        batch = self.batch_size or max(1, self.max_chunk_elements // max(1, len(reference)))
        distances = torch.empty(len(query), num_k, dtype=query.dtype, device=query.device)
        indices = torch.empty(len(query), num_k, dtype=torch.long, device=query.device)
        with torch.no_grad():
            for start in range(0, len(query), batch):
                end = start + batch
                dist = _squared_l2(query[start:end], reference, ref_sq)
                distances[start:end], indices[start:end] = torch.topk(
                    dist, num_k, dim=1, largest=False, sorted=True
                )
        return return_results(distances, indices, ref_includes_query)


class DefaultKNN:
    """The default ``knn_func`` of :class:`pml_proxies.AccuracyCalculator`.

    Per call: PML's ``FaissKNN`` (exact L2, a fresh index each call) when faiss is importable,
    except for CUDA tensors with a faiss build that has no GPU support; otherwise
    :class:`TorchKNN`. Both return squared Euclidean distances. ``last_backend`` names the
    back-end used by the latest call (``"faiss"`` or ``"torch"``).

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
