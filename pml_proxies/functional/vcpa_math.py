"""The closed-form math of VCPA's Newton steps (Kim, Guerrero, Pham, Pavlovic, "Variational
Continual Proxy-Anchor for Deep Metric Learning", eq. 12-13 and supplement eq. 21-29; notes in
``docs/vcpa.md``), as pure functions of tensors.

With Gaussian proxies ``q_t(p_c) = N(mu_c, diag(sigma_c^2))``, a training step minimises::

    L_t = KL(q_t || q_{t-1}) + L_PA(B; p^) / tau,    p^ = mu + sigma * eps,  eps ~ N(0, I)

by diagonal Newton steps on ``(mu, sigma)`` (:func:`newton_update`), with the derivatives of the
Proxy-Anchor loss w.r.t. the sampled proxies in closed form
(:func:`proxy_anchor_newton_terms`, ``||p^||`` held constant) and, for the monotone mode, a
Monte-Carlo estimate of ``tau L_t`` (:func:`expected_objective`).
:class:`pml_proxies.losses.VCPALoss` runs them; these functions hold no state and draw no random
numbers (the noise ``eps`` is an argument).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import proxy_math

NORM_EPS = 1e-12  # as F.normalize


class NewtonBatch(NamedTuple):
    """What the Newton steps of one training step share (computed once per batch)."""

    embeddings: torch.Tensor  # (B, D), L2-normalised
    both: torch.Tensor  # (B, 2D): [x, x^2]
    labels: torch.Tensor  # (B,)
    not_same: torch.Tensor  # (B, B): y_i != y_j
    a_pos: torch.Tensor  # (B,): 1/|C+| on the first sample of each class, else 0
    a_sum: torch.Tensor  # (): 1/|C+|
    num_present: torch.Tensor  # (): |C+|
    shift: torch.Tensor | None  # (B,): miner weights - 1


def newton_batch(
    embeddings: torch.Tensor, labels: torch.Tensor, miner_weights: torch.Tensor | None = None
) -> NewtonBatch:
    """Precompute the batch quantities of :func:`proxy_anchor_newton_terms`."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    first = ~torch.tril(same, diagonal=-1).any(dim=1)  # one sample per present class
    num_present = first.sum().to(embeddings.dtype)
    a_sum = num_present.reciprocal()
    a_pos = first.to(embeddings.dtype) * a_sum
    both = torch.cat([embeddings, embeddings * embeddings], dim=1)
    shift = None if miner_weights is None else miner_weights.to(embeddings.dtype) - 1
    return NewtonBatch(embeddings, both, labels, ~same, a_pos, a_sum, num_present, shift)


def proxy_anchor_newton_terms(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    alpha: float,
    margin: float,
    scale: float = 1.0,
    miner_weights: torch.Tensor | None = None,
    batch: NewtonBatch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradient and diagonal Hessian of the Proxy-Anchor loss w.r.t. the proxies.

    VCPA supplement eq. 23-25 with the ``1/|C+|``, ``1/C`` normalisation of ``docs/vcpa.md``
    (section "VCPA"): the derivatives of

        L = 1/|C+| sum_c log(1 + sum_{i: y_i=c}  exp(alpha (delta - s_ic)))
          + 1/C    sum_c log(1 + sum_{i: y_i!=c} exp(alpha (s_ic + delta)))

    with ``s_ic = x_i . p_c / ||p_c||`` and ``||p_c||`` held constant::

        grad_c = alpha / ||p_c||   (a- G-_c - a+ G+_c)
        hess_c = alpha^2/||p_c||^2 (a+ (Q+_c - (G+_c)^2) + a- (Q-_c - (G-_c)^2))

    where ``G`` / ``Q`` are the ``h / (1 + sum h)``-weighted means of ``x`` / ``x^2``, computed as a
    softmax with an extra zero logit (log space, stable). The negative terms are two
    ``(C, B) x (B, D)`` products. The positive terms have two algorithms with the same values
    (both tested against autograd), chosen by cost: :func:`_with_positives_dense` folds them into
    the dense products (cheapest when ``C < 2B``), :func:`_with_positives_by_sample` goes through
    the ``(B, B)`` same-label weights, ``O(B^2 D)`` instead of a third ``O(C B D)`` product
    (cheapest when ``C >= 2B``, e.g. SOP's 11,318 classes).

    Args:
        embeddings: ``(B, D)`` L2-normalised embeddings (constants).
        labels: ``(B,)`` labels in ``[0, C)``.
        proxies: ``(C, D)`` proxies ``p^`` (not normalised).
        alpha: scale. margin: ``delta``.
        scale: multiplies both results (``1 / temperature`` in VCPA).
        miner_weights: optional ``(B,)`` PML miner weights, ``+ (w - 1)`` in the exponents.
        batch: :func:`newton_batch` of ``embeddings, labels, miner_weights`` when already
            computed (the Newton steps of one training step share it).

    Returns:
        ``(grad, hess)``, each ``(C, D)``, times ``scale``.
    """
    if batch is None:
        batch = newton_batch(embeddings, labels, miner_weights)
    x, labels = batch.embeddings, batch.labels
    num_classes = proxies.shape[0]
    inv_norm = proxies.norm(dim=1).clamp_min(NORM_EPS).reciprocal()
    sims = (x @ proxies.t()).mul_(inv_norm)
    col = labels.unsqueeze(1)
    pos_logits = sims.gather(1, col).squeeze(1).sub_(margin).mul_(-alpha)
    neg_logits = sims.add_(margin).mul_(alpha)
    if batch.shift is not None:
        pos_logits = pos_logits.add_(batch.shift)
        neg_logits = neg_logits.add_(batch.shift.unsqueeze(1))
    # negatives: the positive entries get -inf, hence weight 0
    neg_logits.scatter_(1, col, float("-inf"))
    neg_weights = proxy_math.softmax_with_zero_logit(neg_logits, dim=0)  # h- / (1 + sum h-)
    # positives: row i holds the weights of the samples of class y_i
    pos_weights = proxy_math.softmax_with_zero_logit(
        pos_logits.unsqueeze(0).masked_fill(batch.not_same, float("-inf")), dim=1
    )
    k1 = (scale * alpha) * inv_norm  # (C,): scale alpha / n
    k2 = k1.square().mul_(1.0 / scale)  # scale alpha^2 / n^2
    if num_classes < 2 * len(labels):
        return _with_positives_dense(batch, neg_weights, pos_weights, k1, k2, scale)
    return _with_positives_by_sample(batch, neg_weights, pos_weights, k1, k2, scale)


def _with_positives_dense(batch, neg_weights, pos_weights, k1, k2, scale):
    """Few classes: the positives as ``(i, y_i)`` entries of ``(B, C)`` weights, dense products
    (one of them shared with the negatives' Hessian)."""
    x, col = batch.embeddings, batch.labels.unsqueeze(1)
    a_neg = 1.0 / neg_weights.shape[1]
    pos_w = pos_weights.diagonal()  # weight of sample i in its class's softmax
    neg_w1 = neg_weights * (k1 * a_neg)
    grad = neg_w1.t() @ x  # u = scale a- alpha/n G-
    pos_w1 = torch.zeros_like(neg_w1).scatter_(1, col, (pos_w * batch.a_sum).unsqueeze(1))
    pos_w1.mul_(k1)
    pos_grad = pos_w1.t() @ x  # v = scale a+ alpha/n G+
    neg_w2 = neg_weights.mul_(k2 * a_neg)
    neg_w2.scatter_(1, col, (pos_w * batch.a_sum * k2[batch.labels]).unsqueeze(1))
    dim = x.shape[1]
    hess = neg_w2.t() @ batch.both[:, dim:]  # scale alpha^2/n^2 (a- Q- + a+ Q+)
    # minus u^2 / (scale a-) + v^2 / (scale a+) (a tensor factor: no host sync); Q - G^2 >= 0
    hess.addcmul_(grad, grad, value=-1.0 / (scale * a_neg))
    hess.sub_(pos_grad.square().mul_(batch.num_present / scale)).clamp_min_(0)
    return grad.sub_(pos_grad), hess


def _with_positives_by_sample(batch, neg_weights, pos_weights, k1, k2, scale):
    """Many classes: per-class sums ``[G+, Q+]`` of class ``y_i`` through the ``(B, B)`` weights,
    added once per present class (the other rows add exact zeros: order-independent,
    deterministic, unlike an atomic ``index_add_``)."""
    x, labels = batch.embeddings, batch.labels
    dim = x.shape[1]
    a_neg = 1.0 / neg_weights.shape[1]
    grad = (neg_weights * (k1 * a_neg)).t() @ x  # scale a- alpha/n G-
    hess = neg_weights.mul_(k2 * a_neg).t() @ batch.both[:, dim:]  # scale a- alpha^2/n^2 Q-
    # scale a- alpha^2/n^2 (G-)^2 = grad^2 / (scale a-); Q - G^2 >= 0 (clamp rounding)
    hess.addcmul_(grad, grad, value=-1.0 / (scale * a_neg)).clamp_min_(0)
    pos = pos_weights @ batch.both
    pos_mean = pos[:, :dim]
    pos_var = pos[:, dim:].sub_(pos_mean * pos_mean).clamp_min_(0)
    k1_pos, k2_pos = k1[labels].mul_(batch.a_pos), k2[labels].mul_(batch.a_pos)
    rows = labels.unsqueeze(1).expand(-1, dim)
    grad.scatter_add_(0, rows, pos_mean * k1_pos.neg_().unsqueeze(1))
    hess.scatter_add_(0, rows, pos_var * k2_pos.unsqueeze(1))
    return grad, hess


def gaussian_kl(
    mean: torch.Tensor, std: torch.Tensor, mean_prev: torch.Tensor, std_prev: torch.Tensor
) -> torch.Tensor:
    """Per-class ``KL(N(mean, std^2) || N(mean_prev, std_prev^2))``, diagonal, summed over the last
    dimension: ``(..., C, D)`` to ``(..., C)``::

        KL_c = 1/2 sum_d (r_cd + (mu_cd - mu'_cd)^2 / sigma'_cd^2 - 1 - log r_cd),
        r_cd = sigma_cd^2 / sigma'_cd^2
    """
    ratio = (std / std_prev).square()
    dist = ((mean - mean_prev) / std_prev).square()
    return 0.5 * (ratio + dist - 1 - ratio.log()).sum(dim=-1)


def expected_objective(
    batch: NewtonBatch,
    mean: torch.Tensor,
    std: torch.Tensor,
    mean_prev: torch.Tensor,
    std_prev: torch.Tensor,
    eps: torch.Tensor | None,
    alpha: float,
    margin: float,
    temperature: float,
    step_mean: torch.Tensor | None = None,
    step_std: torch.Tensor | None = None,
    fractions: torch.Tensor | None = None,
    max_elements: int = 2**22,
) -> torch.Tensor:
    """Monte-Carlo estimate of ``tau L_t = tau KL(q_t || q_{t-1}) + E_eps L_PA(B; mu + sigma eps)``
    per class (the objective separates over classes), with the true ``||p^||``.

    ``eps`` holds the ``S`` fixed draws ``(S, C, D)`` (``None``: the means, exact for the
    deterministic mode). Without a step the result is ``(1, C)`` at ``(mean, std)``; with
    ``step_mean``, ``step_std`` and ``fractions`` ``(T,)`` it is ``(T, C)`` at
    ``(mean + t step_mean, std + t step_std)`` for every ``t``: the similarities are linear in
    ``t`` and the squared norms quadratic, so each draw costs two ``(B, D) x (D, C)`` products
    whatever ``T``. The draws are processed in chunks of at most ``max_elements`` values of the
    ``(T, S, B, C)`` similarities (memory bound), vectorised within a chunk.
    """
    x = batch.embeddings
    num_classes = mean.shape[0]
    pos_mask = batch.labels.unsqueeze(1) == torch.arange(num_classes, device=x.device)
    if step_mean is None or step_std is None or fractions is None:
        t = mean.new_zeros(1, 1, 1)  # (T, 1, 1)
        mean_t, std_t = mean.unsqueeze(0), std.unsqueeze(0)
        step_mean = step_std = None
    else:
        t = fractions.to(mean.dtype).view(-1, 1, 1)
        mean_t, std_t = mean + t * step_mean, std + t * step_std
    total = gaussian_kl(mean_t, std_t, mean_prev, std_prev).mul_(temperature)  # (T, C)
    draws = mean.new_zeros(1, *mean.shape) if eps is None else eps  # eps = 0: the means
    data = torch.zeros_like(total)
    # draws in chunks, vectorised within a chunk: at most ~max_elements values per (T, S, B, C)
    chunk = max(1, max_elements // (t.shape[0] * x.shape[0] * num_classes))
    for e in draws.split(chunk):
        p = torch.addcmul(mean, std, e)  # (S, C, D)
        dot = torch.matmul(p, x.t()).transpose(1, 2).unsqueeze(0)  # (1, S, B, C)
        sq = (p * p).sum(dim=2).unsqueeze(0)  # (1, S, C)
        if step_mean is not None and step_std is not None:
            d = torch.addcmul(step_mean, step_std, e)
            dot = dot + t.unsqueeze(3) * torch.matmul(d, x.t()).transpose(1, 2)  # (T, S, B, C)
            sq = sq + t * (2 * (p * d).sum(dim=2) + t * (d * d).sum(dim=2))  # (T, S, C)
        sims = dot / sq.sqrt().clamp_min(NORM_EPS).unsqueeze(2)
        pos_logits = (margin - sims).mul_(alpha)
        neg_logits = sims.add_(margin).mul_(alpha)
        if batch.shift is not None:
            shift = batch.shift.unsqueeze(1)
            pos_logits, neg_logits = pos_logits.add_(shift), neg_logits.add_(shift)
        pos = proxy_math.log1p_sum_exp(pos_logits, pos_mask, dim=2).sum(dim=1)  # (T, C)
        neg = proxy_math.log1p_sum_exp(neg_logits, ~pos_mask, dim=2).sum(dim=1)
        data.add_(pos * batch.a_sum).add_(neg, alpha=1.0 / num_classes)
    return total.add_(data, alpha=1.0 / draws.shape[0])


def newton_update(
    mean: torch.Tensor,
    std: torch.Tensor,
    eps: torch.Tensor | None,
    mean_prev: torch.Tensor,
    inv_var_prev: torch.Tensor,
    grad_p: torch.Tensor,
    hess_p: torch.Tensor,
    sigma_min: float,
    first_step: bool = False,
    damping: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One (damped) diagonal Newton step (eq. 13 with eq. 21-29): ``mu - eta g_mu / H_mu`` and
    ``max(sigma - eta g_sigma / H_sigma, sigma_min)``; returns ``(mean, std, mean_step)``.

    ``g_mu = (mu - mu_prev) / sigma_prev^2 + grad_p``, ``H_mu = 1 / sigma_prev^2 + hess_p``,
    ``g_sigma = sigma / sigma_prev^2 - 1 / sigma + eps grad_p``,
    ``H_sigma = 1 / sigma_prev^2 + 1 / sigma^2 + eps^2 hess_p`` (``grad_p``, ``hess_p`` already
    times ``1 / tau``), computed in place to save passes and allocations over the ``(C, D)``
    tensors: ``eps``, ``grad_p`` and ``hess_p`` are overwritten. ``eta = damping`` (1: the
    paper). ``eps=None`` (deterministic proxies) leaves ``std`` unchanged (``sigma_prev`` is then
    the exact minimiser of its subproblem). ``first_step`` skips ``mean - mean_prev = 0``.
    """
    if eps is not None:
        inv_std = std.reciprocal()
        h_sigma = torch.addcmul(inv_var_prev, inv_std, inv_std)
        g_sigma = torch.mul(std, inv_var_prev).sub_(inv_std).addcmul_(eps, grad_p)
        del inv_std
        h_sigma.addcmul_(eps.mul_(eps), hess_p)
        std = torch.sub(std, g_sigma.div_(h_sigma), alpha=damping).clamp_min_(sigma_min)
        del g_sigma, h_sigma
    h_mu = hess_p.add_(inv_var_prev)
    g_mu = grad_p if first_step else grad_p.addcmul_(mean - mean_prev, inv_var_prev)
    step = g_mu.div_(h_mu)
    if damping != 1.0:
        step.mul_(damping)
    return mean - step, std, step
