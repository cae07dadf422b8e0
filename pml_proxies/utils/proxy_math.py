"""Shared math of every Proxy-Anchor-style loss in this package.

Everything here is vectorised, differentiable and free of host syncs. The losses build on:

* :func:`cosine_similarity` -- ``s_ij = cos(x_i, p_j)`` between embeddings and proxies (or centers);
* :func:`pool_similarities` -- the class similarity ``S(x, c)`` pooled over the ``K`` centers of
  each class (MPA paper eq. 1: softmax, or ``max`` / ``mean``);
* :func:`class_masks` -- the positive / negative masks of a batch (``y_i == c``);
* :func:`log1p_sum_exp` -- ``log(1 + sum_{masked} exp(z))`` computed stably (the Proxy-Anchor
  ``log(1 + sum exp)`` term), 0 where the mask is empty;
* :func:`proxy_anchor_terms` -- the per-class positive and negative Proxy-Anchor terms, with
  optional per-pair exponent scales (Proxy-ISA) and PML miner weights;
* :func:`proxy_anchor_loss` -- the reduced Proxy-Anchor loss with PML's normalisation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

POOLINGS = ("softmax", "max", "mean")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses compute in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context in which autocast is off for ``device_type`` (losses compute in float32)."""
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def cosine_similarity(embeddings: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` cosine similarities of ``embeddings (B, D)`` to ``proxies (N, D)``.

    Same formula as PML's ``CosineSimilarity`` (L2-normalise both, then a matrix product).
    """
    return F.normalize(embeddings, p=2, dim=1) @ F.normalize(proxies, p=2, dim=1).t()


def pool_similarities(
    similarities: torch.Tensor,
    centers_per_class: int,
    pooling: str = "softmax",
    gamma: float = 0.1,
) -> torch.Tensor:
    """Pool ``(B, C*K)`` center similarities (class-major) into ``(B, C)`` class similarities.

    ``softmax``: ``S(x, c) = sum_k softmax_k(s_xck / gamma) s_xck`` (MPA eq. 1, SoftTriple);
    ``max``: ``max_k s_xck``; ``mean``: ``mean_k s_xck``. With ``K = 1`` every pooling returns
    the input unchanged.
    """
    if centers_per_class == 1:
        return similarities
    per_class = similarities.view(similarities.shape[0], -1, centers_per_class)
    if pooling == "softmax":
        weights = torch.softmax(per_class / gamma, dim=2)
        return (weights * per_class).sum(dim=2)
    if pooling == "max":
        return per_class.max(dim=2).values
    if pooling == "mean":
        return per_class.mean(dim=2)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def class_masks(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(B, C)`` masks: ``pos[i, c] = (y_i == c)`` and ``neg = ~pos``."""
    pos = F.one_hot(labels, num_classes).bool()
    return pos, ~pos


def log1p_sum_exp(logits: torch.Tensor, mask: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log(1 + sum_{mask} exp(logits))`` along ``dim``, stably; 0 where ``mask`` is empty.

    Equal to PML's ``lmu.logsumexp(logits, keep_mask=mask, add_one=True, dim=dim)`` without the
    concatenation: ``log(1 + sum e^z) = logaddexp(logsumexp(z), 0)``.
    """
    masked = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(masked, dim=dim)
    # logsumexp over an all -inf slice is -inf and logaddexp(-inf, 0) = 0: empty slices give 0
    # and a zero gradient, without NaNs.
    return torch.logaddexp(lse, torch.zeros((), dtype=lse.dtype, device=lse.device))


def proxy_anchor_terms(
    class_similarities: torch.Tensor,
    pos_mask: torch.Tensor,
    alpha: float,
    margin: float,
    pos_scale: torch.Tensor | None = None,
    neg_scale: torch.Tensor | None = None,
    miner_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class Proxy-Anchor terms, each of shape ``(C,)``.

    ``pos[c] = log(1 + sum_{i: y_i = c}  exp(w+_ic alpha (margin - S_ic) + m_i))``
    ``neg[c] = log(1 + sum_{i: y_i != c} exp(w-_ic alpha (S_ic + margin) + m_i))``

    ``pos_scale`` / ``neg_scale`` are optional ``(B, C)`` (or broadcastable) exponent scales
    (Proxy-ISA eq. 12; treated as constants by the caller), ``miner_weights`` optional ``(B,)``
    PML miner weights entering as ``+ (w - 1)`` in the exponent, as in PML's ``ProxyAnchorLoss``.
    """
    pos_logits = alpha * (margin - class_similarities)
    neg_logits = alpha * (class_similarities + margin)
    if pos_scale is not None:
        pos_logits = pos_logits * pos_scale
    if neg_scale is not None:
        neg_logits = neg_logits * neg_scale
    if miner_weights is not None:
        shift = (miner_weights - 1).unsqueeze(1)
        pos_logits = pos_logits + shift
        neg_logits = neg_logits + shift
    pos_term = log1p_sum_exp(pos_logits, pos_mask, dim=0)
    neg_term = log1p_sum_exp(neg_logits, ~pos_mask, dim=0)
    return pos_term, neg_term


def proxy_anchor_loss(
    class_similarities: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 32.0,
    margin: float = 0.1,
) -> torch.Tensor:
    """The Proxy-Anchor loss of ``(B, C)`` class similarities, PML's normalisation.

    ``sum_c pos[c] / |C+| + sum_c neg[c] / C`` with ``C+`` the classes present in the batch.
    """
    num_classes = class_similarities.shape[1]
    pos_mask, _ = class_masks(labels, num_classes)
    pos_term, neg_term = proxy_anchor_terms(class_similarities, pos_mask, alpha, margin)
    num_present = pos_mask.any(dim=0).sum().clamp(min=1)
    return pos_term.sum() / num_present + neg_term.sum() / num_classes
