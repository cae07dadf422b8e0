"""Shared math of every Proxy-Anchor-style loss in this package.

Everything here is vectorised, differentiable and free of host syncs. The losses build on:

* :func:`cosine_similarity` -- ``s_ij = cos(x_i, p_j)`` between embeddings and proxies (or centers);
* :func:`unit_cosine_similarity` -- the same, with the unit vectors and a fused backward;
* :func:`cosine_similarity_to_many` -- the same, with a cheaper backward for many proxies;
* :func:`pool_similarities` -- the class similarity ``S(x, c)`` pooled over the ``K`` centers of
  each class (MPA paper eq. 1: softmax, or ``max`` / ``mean``);
* :func:`class_masks` -- the positive / negative masks of a batch (``y_i == c``);
* :func:`log1p_sum_exp` -- ``log(1 + sum_{masked} exp(z))`` computed stably (the Proxy-Anchor
  ``log(1 + sum exp)`` term), 0 where the mask is empty;
* :func:`proxy_anchor_terms` -- the per-class positive and negative Proxy-Anchor terms, with
  optional per-pair exponent scales (Proxy-ISA) and PML miner weights (a fused backward);
* :func:`softmax_with_zero_logit` -- ``exp(z) / (1 + sum exp(z))``, the derivative of
  :func:`log1p_sum_exp` (the Proxy-Anchor weights ``h / (1 + sum h)``), stably.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

POOLINGS = ("softmax", "max", "mean")
P = ParamSpec("P")
R = TypeVar("R")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses compute in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context in which autocast is off for ``device_type`` (losses compute in float32)."""
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def run_eagerly(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, always run eagerly: ``torch.compile`` calls it between its graphs instead of
    tracing it (``torch.compiler.disable``; ``torch._dynamo.disable`` before torch 2.1)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "disable"):
        return compiler.disable(fn)
    return importlib.import_module("torch._dynamo").disable(fn)


def cosine_similarity(embeddings: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` cosine similarities of ``embeddings (B, D)`` to ``proxies (N, D)``.

    Same formula as PML's ``CosineSimilarity`` (L2-normalise both, then a matrix product), with
    the fused first-order backward of :func:`unit_cosine_similarity`.
    """
    return unit_cosine_similarity(embeddings, proxies)[2]


class _UnitCosine(torch.autograd.Function):
    """Unit embeddings, unit proxies and their cosines ``S = x^ p^T``, with a fused backward.

    The forward is PML's ``CosineSimilarity`` (``F.normalize`` of both, then a matrix product;
    the same values). With ``g = dL/dS`` and ``r = sum g * S`` (over classes for a sample, over
    samples for a proxy), ``dL/dx_b = (sum_c g_bc p^_c - r_b x^_b) / |x_b|`` and
    ``dL/dp_c = (sum_b g_bc x^_b - r_c p^_c) / |p_c|``: two matrix products and two in-place
    updates, where autograd through ``F.normalize`` makes several ``(B, D)`` / ``(C, D)``
    temporaries. The unit vectors are returned as constants. First-order gradients only.
    """

    @staticmethod
    def forward(ctx, embeddings, proxies, eps: float):
        units, inverse_norms, radial = [], [], []
        for rows in (embeddings, proxies):
            norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
            denominators = norms.clamp_min(eps)
            units.append(rows / denominators)
            inverse = denominators.reciprocal()
            inverse_norms.append(inverse)
            # below eps the norm is the constant eps (as in F.normalize): no radial part
            radial.append(torch.where(norms > eps, inverse, 0))
        sims = units[0] @ units[1].t()
        ctx.save_for_backward(sims, *units, *inverse_norms, *radial)
        ctx.mark_non_differentiable(*units)
        return units[0], units[1], sims

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_x, _grad_p, grad_sims):
        sims, unit_x, unit_p, inverse_x, inverse_p, radial_x, radial_p = ctx.saved_tensors
        weighted = grad_sims * sims
        grad_embeddings = grad_proxies = None
        if ctx.needs_input_grad[0]:
            grad_embeddings = (grad_sims * inverse_x) @ unit_p
            coefficient = weighted.sum(dim=1, keepdim=True).mul_(radial_x)
            grad_embeddings.addcmul_(unit_x, coefficient, value=-1)
        if ctx.needs_input_grad[1]:
            grad_proxies = (grad_sims * inverse_p.t()).t() @ unit_x
            coefficient = weighted.sum(dim=0).unsqueeze(1).mul_(radial_p)
            grad_proxies.addcmul_(unit_p, coefficient, value=-1)
        return grad_embeddings, grad_proxies, None


def unit_cosine_similarity(
    embeddings: torch.Tensor, proxies: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x^, p^, S)``: the L2-normalised ``embeddings (B, D)`` and ``proxies (N, D)`` (constants)
    and their ``(B, N)`` cosine similarities, the values of :func:`cosine_similarity`, with a
    fused first-order backward (no double backward)."""
    return _UnitCosine.apply(embeddings, proxies, 1e-12)


class _CosineToProxies(torch.autograd.Function):
    """``s_bj = <x_b, w_j> / |w_j|`` for unit ``x``, with a fused backward.

    ``dL/dw_j = sum_b g_bj (x_b - s_bj w_j / |w_j|) / |w_j|``: one matrix product plus one
    in-place update of the ``(N, D)`` gradient, where autograd through ``F.normalize(w)`` makes
    several ``(N, D)`` temporaries (a large cost when ``N = C K`` is in the 100,000s).
    """

    @staticmethod
    def forward(ctx, unit_embeddings, proxies, eps: float):
        norms = torch.linalg.vector_norm(proxies, dim=1)
        inv_norms = norms.clamp(min=eps).reciprocal()
        sims = (unit_embeddings @ proxies.t()).mul_(inv_norms)
        # below eps the norm is the constant eps (as in F.normalize): no gradient through it
        inv_norms_sq = torch.where(norms > eps, inv_norms * inv_norms, 0)
        ctx.save_for_backward(unit_embeddings, proxies, inv_norms, inv_norms_sq, sims)
        return sims

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sims):
        unit_embeddings, proxies, inv_norms, inv_norms_sq, sims = ctx.saved_tensors
        scaled = grad_sims * inv_norms
        grad_embeddings = grad_proxies = None
        if ctx.needs_input_grad[0]:
            grad_embeddings = scaled @ proxies
        if ctx.needs_input_grad[1]:
            radial = (grad_sims * sims).sum(dim=0).mul_(inv_norms_sq)
            grad_proxies = scaled.t() @ unit_embeddings
            grad_proxies.addcmul_(proxies, radial.unsqueeze(1), value=-1)
        return grad_embeddings, grad_proxies, None


def cosine_similarity_to_many(embeddings: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """:func:`cosine_similarity` (same values up to rounding) for many proxies / centers.

    Scales the ``(B, N)`` product by the inverse proxy norms instead of normalising the ``(N, D)``
    proxies, with a fused backward: faster and lighter when ``N`` is large and ``B < D``
    (MPA at C = 11,318, K = 10). First-order gradients only (no double backward).
    """
    unit = F.normalize(embeddings, p=2, dim=1)
    return _CosineToProxies.apply(unit, proxies, 1e-12)


class _SoftmaxPooling(torch.autograd.Function):
    """``S = sum_k softmax_k(s_k / gamma) s_k`` over the last dim, with a fused backward.

    ``dS/ds_k = p_k (1 + (s_k - S) / gamma)`` with ``p = softmax(s / gamma)``. Autograd's version
    (``softmax`` + product + sum) makes several ``(B, C, K)`` temporaries and CPU's softmax over a
    short last dimension is slow; this one keeps ``p`` and ``S`` and needs one temporary each way.
    """

    @staticmethod
    def forward(ctx, sims: torch.Tensor, gamma: float) -> torch.Tensor:
        probs = torch.sub(sims, sims.amax(dim=2, keepdim=True)).div_(gamma).exp_()
        probs.div_(probs.sum(dim=2, keepdim=True))
        pooled = (probs * sims).sum(dim=2)
        ctx.save_for_backward(sims, probs, pooled)
        ctx.gamma = gamma
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pooled: torch.Tensor):
        sims, probs, pooled = ctx.saved_tensors
        grad = torch.sub(sims, pooled.unsqueeze(2)).div_(ctx.gamma).add_(1)
        return grad.mul_(probs).mul_(grad_pooled.unsqueeze(2)), None


def pool_similarities(
    similarities: torch.Tensor,
    centers_per_class: int,
    pooling: str = "softmax",
    gamma: float = 0.1,
) -> torch.Tensor:
    """Pool ``(B, C*K)`` center similarities (class-major) into ``(B, C)`` class similarities.

    ``softmax``: ``S(x, c) = sum_k softmax_k(s_xck / gamma) s_xck`` (MPA eq. 1, SoftTriple);
    ``max``: ``max_k s_xck``; ``mean``: ``mean_k s_xck``. With ``K = 1`` every pooling returns
    the input unchanged. The softmax pooling has a fused first-order backward (no double backward).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if centers_per_class == 1:
        return similarities
    per_class = similarities.reshape(similarities.shape[0], -1, centers_per_class)
    if pooling == "softmax":
        return _SoftmaxPooling.apply(per_class, float(gamma))
    if pooling == "max":
        return per_class.amax(dim=2)
    return per_class.mean(dim=2)


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


class _ProxyAnchorTerms(torch.autograd.Function):
    """:func:`proxy_anchor_terms` with a fused closed-form backward (same math).

    The two masks are complementary, so one ``(B, C)`` logits matrix
    ``z = where(pos, -a+ S + a+ margin, a- S + a- margin) + m`` (``a+ = alpha w+``,
    ``a- = alpha w-``) carries both terms. Each column is shifted by its per-mask maximum
    ``M`` (at least 0, the extra zero logit), one ``exp`` gives ``e = exp(z - M)``, and the
    masked column sums ``s`` give ``term = M + log1p(s + expm1(-M))``. The gradient is
    ``dterm/dz_ic = e_ic / (exp(-M_c) + s_c)`` (the Proxy-Anchor weights ``h / (1 + sum h)``),
    times ``dz/dS = where(pos, -a+, a-)``: three passes over ``(B, C)`` from saved tensors,
    where autograd records about twenty. Empty columns give 0 and a zero gradient, no NaN.
    First-order gradients only (no double backward).
    """

    @staticmethod
    def forward(ctx, sims, pos_mask, alpha, margin, pos_scale, neg_scale, miner_weights):
        # 0 / 1 masks as numbers: arithmetic on them is exact (x * 1 + y * 0 = x) and much
        # cheaper than torch.where on a boolean mask on CPU
        pos = pos_mask.to(sims.dtype)
        neg = 1 - pos
        pos_slope = alpha if pos_scale is None else pos_scale * alpha
        neg_slope = alpha if neg_scale is None else neg_scale * alpha
        # dz/dS: -a+ on positives, a- on negatives
        slope = torch.mul(neg, neg_slope).sub_(pos * pos_slope)
        if pos_scale is None and neg_scale is None:
            logits = torch.mul(slope, sims).add_(alpha * margin)
        else:
            intercept = torch.mul(neg, neg_slope * margin).add_(pos * (pos_slope * margin))
            logits = intercept.addcmul_(slope, sims)
        if miner_weights is not None:
            logits.add_((miner_weights - 1).unsqueeze(1))
        # per-(column, mask) maxima, with the zero logit (an empty mask gives 0): entries of the
        # other mask are pushed to about -finfo.max, below any logit
        lowest = -torch.finfo(sims.dtype).max
        pos_max = torch.add(logits, neg, alpha=lowest).amax(dim=0).clamp_(min=0)
        neg_max = torch.add(logits, pos, alpha=lowest).amax(dim=0).clamp_(min=0)
        exps = logits.sub_(torch.mul(pos, pos_max).addcmul_(neg, neg_max)).exp_()
        pos_sum = torch.mul(exps, pos).sum(dim=0)
        neg_sum = torch.mul(exps, neg).sum(dim=0)
        pos_term = pos_max + torch.log1p(pos_sum + torch.expm1(-pos_max))
        neg_term = neg_max + torch.log1p(neg_sum + torch.expm1(-neg_max))
        # 1 / (1 + sum h) in the shifted scale: the weights are exps * this, per column
        pos_norm = pos_sum.add_(pos_max.neg_().exp_()).reciprocal_()
        neg_norm = neg_sum.add_(neg_max.neg_().exp_()).reciprocal_()
        ctx.save_for_backward(sims, pos, neg, exps, slope, pos_norm, neg_norm, pos_scale, neg_scale)
        ctx.alpha, ctx.margin = alpha, margin
        return pos_term, neg_term

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pos, grad_neg):
        sims, pos, neg, exps, slope, pos_norm, neg_norm, pos_scale, neg_scale = ctx.saved_tensors
        # dL/dz = weight * incoming gradient, per column and mask
        grad_logits = torch.mul(pos, grad_pos * pos_norm).addcmul_(neg, grad_neg * neg_norm)
        grad_logits.mul_(exps)
        needs = ctx.needs_input_grad
        grad_sims = grad_pos_scale = grad_neg_scale = grad_miner = None
        if needs[4]:
            # dz/dw+ = alpha (margin - S) on positives
            dz = torch.sub(ctx.margin, sims).mul_(ctx.alpha).mul_(pos).mul_(grad_logits)
            grad_pos_scale = dz.sum_to_size(pos_scale.shape)
        if needs[5]:
            # dz/dw- = alpha (S + margin) on negatives
            dz = torch.add(sims, ctx.margin).mul_(ctx.alpha).mul_(neg).mul_(grad_logits)
            grad_neg_scale = dz.sum_to_size(neg_scale.shape)
        if needs[6]:
            grad_miner = grad_logits.sum(dim=1)
        if needs[0]:
            grad_sims = grad_logits.mul_(slope)
        return grad_sims, None, None, None, grad_pos_scale, grad_neg_scale, grad_miner


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
    Differentiable in all three and in ``class_similarities``, with a fused closed-form first-order
    backward (:class:`_ProxyAnchorTerms`; no double backward).
    """
    return _ProxyAnchorTerms.apply(
        class_similarities,
        pos_mask,
        float(alpha),
        float(margin),
        pos_scale,
        neg_scale,
        miner_weights,
    )


def softmax_with_zero_logit(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``exp(z) / (1 + sum exp(z))`` along ``dim``: a softmax with an extra zero logit.

    The derivative of ``log(1 + sum exp(z))`` (:func:`log1p_sum_exp`) with respect to ``z``, i.e.
    the Proxy-Anchor weights ``h / (1 + sum h)`` with ``h = exp(z)``, computed in log space.
    Entries equal to ``-inf`` (masked out) get weight 0; an all ``-inf`` slice gives zeros, no NaN.
    """
    lse = torch.logsumexp(logits, dim=dim, keepdim=True)
    lse = torch.logaddexp(lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
    return torch.exp(logits - lse)
