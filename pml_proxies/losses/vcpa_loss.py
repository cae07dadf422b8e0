"""Variational Continual Proxy-Anchor (VCPA) loss."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..functional import distributed, proxy_math
from .base_proxy_loss import BaseProxyLoss

NORM_EPS = 1e-12  # as F.normalize
STATS = (
    "mean_std",
    "mean_kl",
    "newton_step_size",
    "mean_pos_similarity",
    "mean_neg_similarity",
)


# ------------------------------------------------------------------------------ closed forms
class NewtonBatch(NamedTuple):
    """What the Newton steps of one training step share (computed once per batch)."""

    embeddings: torch.Tensor  # (B, D), L2-normalised
    both: torch.Tensor  # (B, 2D): [x, x^2]
    labels: torch.Tensor  # (B,)
    not_same: torch.Tensor  # (B, B): y_i != y_j
    a_pos: torch.Tensor  # (B,): 1/|C+| on the first sample of each class, else 0
    a_sum: torch.Tensor  # (): 1/|C+|
    shift: torch.Tensor | None  # (B,): miner weights - 1


def newton_batch(
    embeddings: torch.Tensor, labels: torch.Tensor, miner_weights: torch.Tensor | None = None
) -> NewtonBatch:
    """Precompute the batch quantities of :func:`proxy_anchor_newton_terms`."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    first = ~torch.tril(same, diagonal=-1).any(dim=1)  # one sample per present class
    a_sum = first.sum().to(embeddings.dtype).reciprocal()
    a_pos = first.to(embeddings.dtype) * a_sum
    both = torch.cat([embeddings, embeddings * embeddings], dim=1)
    shift = None if miner_weights is None else miner_weights.to(embeddings.dtype) - 1
    return NewtonBatch(embeddings, both, labels, ~same, a_pos, a_sum, shift)


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

    VCPA supplement eq. 23-25 with SPEC section 4's normalisation: the derivatives of

        L = 1/|C+| sum_c log(1 + sum_{i: y_i=c}  exp(alpha (delta - s_ic)))
          + 1/C    sum_c log(1 + sum_{i: y_i!=c} exp(alpha (s_ic + delta)))

    with ``s_ic = x_i . p_c / ||p_c||`` and ``||p_c||`` held constant::

        grad_c = alpha / ||p_c||   (a- G-_c - a+ G+_c)
        hess_c = alpha^2/||p_c||^2 (a+ (Q+_c - (G+_c)^2) + a- (Q-_c - (G-_c)^2))

    where ``G`` / ``Q`` are the ``h / (1 + sum h)``-weighted means of ``x`` / ``x^2``, computed as a
    softmax with an extra zero logit (log space, stable). Vectorised: two ``(C, B) x (B, D)``
    products for the negatives, the positives through the ``(B, B)`` same-label matrix.

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
    num_classes, dim = proxies.shape
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
    a_neg = 1.0 / num_classes
    k1 = (scale * alpha) * inv_norm  # (C,)
    k2 = k1.square().mul_(1.0 / scale)  # scale alpha^2 / n^2
    if num_classes < 2 * len(labels):
        # few classes: positives as (i, y_i) entries of (B, C) weights, dense products
        pos_w = pos_weights.diagonal()  # weight of sample i in its class's softmax
        neg_w1 = neg_weights * (k1 * a_neg)
        grad = neg_w1.t() @ x  # u = scale a- alpha/n G-
        pos_w1 = torch.zeros_like(neg_w1).scatter_(1, col, (pos_w * batch.a_sum).unsqueeze(1))
        pos_w1.mul_(k1)
        pos_grad = pos_w1.t() @ x  # v = scale a+ alpha/n G+
        neg_w2 = neg_weights.mul_(k2 * a_neg)
        neg_w2.scatter_(1, col, (pos_w * batch.a_sum * k2[labels]).unsqueeze(1))
        hess = neg_w2.t() @ batch.both[:, dim:]  # scale alpha^2/n^2 (a- Q- + a+ Q+)
        # minus u^2 / (scale a-) + v^2 / (scale a+); Q - G^2 >= 0 (clamp rounding)
        hess.addcmul_(grad, grad, value=-1.0 / (scale * a_neg))
        hess.addcmul_(pos_grad, pos_grad, value=-1.0 / (scale * batch.a_sum)).clamp_min_(0)
        return grad.sub_(pos_grad), hess
    grad = (neg_weights * (k1 * a_neg)).t() @ x  # scale a- alpha/n G-
    hess = neg_weights.mul_(k2 * a_neg).t() @ batch.both[:, dim:]  # scale a- alpha^2/n^2 Q-
    # scale a- alpha^2/n^2 (G-)^2 = grad^2 / (scale a-); Q - G^2 >= 0 (clamp rounding)
    hess.addcmul_(grad, grad, value=-1.0 / (scale * a_neg)).clamp_min_(0)
    # many classes: per-class sums [G+, Q+] of class y_i through the (B, B) weights, added
    # once per present class (the other rows add exact zeros: order-independent, deterministic)
    pos = pos_weights @ batch.both
    pos_mean = pos[:, :dim]
    pos_var = pos[:, dim:].sub_(pos_mean * pos_mean).clamp_min_(0)
    k1_pos, k2_pos = k1[labels].mul_(batch.a_pos), k2[labels].mul_(batch.a_pos)
    rows = col.expand(-1, dim)
    grad.scatter_add_(0, rows, pos_mean * k1_pos.neg_().unsqueeze(1))
    hess.scatter_add_(0, rows, pos_var * k2_pos.unsqueeze(1))
    return grad, hess


def mean_derivatives(
    mean: torch.Tensor,
    mean_prev: torch.Tensor,
    inv_var_prev: torch.Tensor,
    grad_p: torch.Tensor,
    hess_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``g_mu, H_mu`` of ``KL(q_t || q_{t-1}) + (1/tau) L_PA`` (supplement eq. 21-22, 26-29).

    ``grad_p`` and ``hess_p`` are the Proxy-Anchor derivatives already multiplied by ``1/tau``.
    """
    g_mu = torch.addcmul(grad_p, mean - mean_prev, inv_var_prev)
    h_mu = inv_var_prev + hess_p
    return g_mu, h_mu


def std_derivatives(
    std: torch.Tensor,
    eps: torch.Tensor,
    inv_var_prev: torch.Tensor,
    grad_p: torch.Tensor,
    hess_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``g_sigma, H_sigma`` (supplement eq. 21-22, 26-29), ``grad_p`` / ``hess_p`` times ``1/tau``."""
    inv_std = std.reciprocal()
    g_sigma = (std * inv_var_prev).sub_(inv_std).addcmul_(eps, grad_p)
    h_sigma = torch.addcmul(inv_var_prev, inv_std, inv_std).addcmul_(eps * eps, hess_p)
    return g_sigma, h_sigma


def gaussian_kl(
    mean: torch.Tensor, std: torch.Tensor, mean_prev: torch.Tensor, std_prev: torch.Tensor
) -> torch.Tensor:
    """Per-class ``KL(N(mean, std^2) || N(mean_prev, std_prev^2))``, diagonal, shape ``(C,)``."""
    ratio = (std / std_prev).square()
    dist = ((mean - mean_prev) / std_prev).square()
    return 0.5 * (ratio + dist - 1 - ratio.log()).sum(dim=1)


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
    """One diagonal Newton step (eq. 13 with eq. 21-29): ``mu - g_mu / H_mu`` and
    ``max(sigma - g_sigma / H_sigma, sigma_min)``; returns ``(mean, std, mean_step)``.

    Same values as :func:`mean_derivatives` / :func:`std_derivatives`, computed in place to save
    passes and allocations over the ``(C, D)`` tensors: ``eps``, ``grad_p`` and ``hess_p`` are
    overwritten. ``eps=None`` (deterministic proxies) leaves ``std`` unchanged (``sigma_prev`` is
    then the exact minimiser of its subproblem). ``first_step`` skips ``mean - mean_prev = 0``.
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


def _seed_from_state(state: torch.Tensor) -> int:
    """A deterministic 63-bit seed from a generator state of another device type."""
    digest = hashlib.blake2b(state.cpu().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------- loss
class VCPALoss(BaseProxyLoss):
    """Variational Continual Proxy-Anchor loss (Kim, Guerrero, Pham, Pavlovic, "Variational
    Continual Proxy-Anchor for Deep Metric Learning", Algorithm 1, eq. 12-13 and supplement
    eq. 15-30; SPEC section 4).

    Each class has a Gaussian proxy ``q(p_c) = N(mu_c, diag(sigma_c^2))`` (prior and initial value
    ``mu = 0, sigma = 1``). Every training step (``forward`` in training mode):

    1. warm start from the previous step's ``(mu, sigma)``, which are also the prior of the KL;
    2. ``newton_steps`` diagonal Newton steps on ``KL(q_t || q_{t-1}) + L_PA(B; p^)/temperature``
       with ``p^ = mu + sigma * eps``, a fresh ``eps ~ N(0, I)`` per step, the closed-form
       derivatives of the supplement (eq. 21-29, ``||p^||`` held constant, embeddings detached,
       SPEC's ``1/|C+|`` and ``1/C`` normalisation) and ``sigma >= sigma_min`` after each step;
    3. a fresh sample ``p^`` gives the returned Proxy-Anchor loss (PML's normalisation), with
       ``p^`` a constant: the gradient reaches the network only.

    With ``sigma -> 0`` (or ``stochastic=False``) the returned loss is PML's ``ProxyAnchorLoss`` on
    the means. ``newton_steps=0`` (the paper's SOP / In-Shop setting) makes ``proxy_mean`` and
    ``proxy_std`` Parameters trained by the loss optimizer through the reparameterised sample
    (at the warm start the KL gradient is zero, so the loss is ``L_PA(B; mu + sigma * eps)``);
    ``sigma`` is then projected onto ``[sigma_min, inf)`` at every training step and the loss always
    uses ``max(proxy_std, sigma_min)`` (gradient passed straight through: projected gradient
    descent, like the paper's clamp).

    Randomness comes from the loss's own ``torch.Generator`` (seeded by ``seed``; ``None`` draws a
    seed from torch's global generator). Means, standard deviations and the generator state (a
    ``uint8`` buffer kept on the CPU) are buffers, or Parameters with ``newton_steps=0``: ``state_dict`` resumes exactly.
    State changes only in training mode and only once the step succeeded. In eval mode the loss
    is evaluated at the means, with no sampling and no state change.

    Under PML's ``DistributedLossWrapper(efficient=False)`` every rank sees the gathered batch;
    the loss puts it in rank order (so that every rank computes bit-identical updates) and, at
    its first distributed training step, broadcasts its state from rank 0 (so ``seed=None``
    works too). ``efficient=True`` passes ``ref_emb`` and is rejected.

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding dimension ``D``.
        margin: ``delta`` (0.1).
        alpha: scale (32).
        temperature: ``tau`` (0.01 for CUB in the paper, 0.001 for Cars, SOP, In-Shop).
        newton_steps: ``M`` Newton steps per training step (10); 0 trains ``mu, sigma`` by the
            loss optimizer.
        sigma_min: lower bound of ``sigma`` (1e-5).
        stochastic: sample ``p^ = mu + sigma * eps``; ``False`` is the paper's ablation I
            (``eps = 0``, ``p^ = mu``), with ``mu`` initialised as Proxy-Anchor's proxies
            (``weight_init_func``, kaiming normal) instead of 0 (SPEC decision); ``sigma`` then
            never changes (its Newton subproblem is solved by ``sigma = sigma_prev``).
        seed: seed of the loss's generator; ``None`` draws one from torch's global generator
            (so ``torch.manual_seed`` makes runs reproducible).
        **kwargs: ``check_inputs`` and PML keyword arguments (``collect_stats``, ``reducer``,
            ``weight_init_func``; ``weight_regularizer`` only with ``newton_steps=0``).

    Attributes:
        proxy_mean, proxy_std: ``(C, D)`` variational parameters (buffers, or Parameters with
            ``newton_steps=0``).
        proxies: the means (for logits, plots, retrieval by proxy).
        rng_state: the generator state (``uint8`` buffer, on the CPU).

    Stats (PML ``collect_stats``, training mode): ``mean_std``, ``mean_kl`` (per class, summed
    over dimensions), ``newton_step_size`` (RMS of the last Newton update of the means),
    ``mean_pos_similarity`` / ``mean_neg_similarity`` (at the sampled proxies).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` in ``[0, C)``; output a scalar.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        temperature: float = 0.01,
        newton_steps: int = 10,
        sigma_min: float = 1e-5,
        stochastic: bool = True,
        seed: int | None = None,
        newton_damping: float = 1.0,
        **kwargs,
    ) -> None:
        if int(newton_steps) != newton_steps or newton_steps < 0:
            raise ValueError(f"newton_steps must be an integer >= 0, got {newton_steps}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if newton_steps > 0 and kwargs.get("weight_regularizer") is not None:
            raise ValueError(
                "weight_regularizer needs newton_steps=0 (with Newton steps the variational "
                "parameters are buffers, not trained by an optimizer)"
            )
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin = float(margin)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.newton_steps = int(newton_steps)
        self.sigma_min = float(sigma_min)
        self.stochastic = bool(stochastic)
        self.seed = seed
        self.newton_damping = float(newton_damping)

        mean = torch.zeros(self.num_classes, self.embedding_size)
        if not self.stochastic:
            self.weight_init_func(mean)
        std = torch.ones(self.num_classes, self.embedding_size)
        if self.newton_steps == 0:
            self.proxy_mean = torch.nn.Parameter(mean)
            self.proxy_std = torch.nn.Parameter(std)
        else:
            self.register_buffer("proxy_mean", mean)
            self.register_buffer("proxy_std", std)
        if seed is None:
            # drawn from torch's global generator, so torch.manual_seed makes runs reproducible
            seed = int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator().manual_seed(int(seed))
        self.register_buffer("rng_state", generator.get_state())
        self._generator: torch.Generator | None = None
        self._ranks_synced = False

        self.add_to_recordable_attributes(
            list_of_names=["alpha", "margin", "temperature", "newton_steps", "sigma_min"],
            is_stat=False,
        )
        for name in STATS:
            setattr(self, name, 0.0)
        self.add_to_recordable_attributes(list_of_names=list(STATS), is_stat=True)

    # ----------------------------------------------------------------------- public helpers
    @property
    def proxies(self) -> torch.Tensor:
        """The proxy means ``(C, D)``."""
        return self.proxy_mean

    @property
    def std(self) -> torch.Tensor:
        """The standard deviations in use, ``max(proxy_std, sigma_min)`` (detached)."""
        return self.proxy_std.detach().clamp_min(self.sigma_min)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` cosine similarities of ``embeddings`` to the proxy means."""
        dtype = proxy_math.compute_dtype(embeddings.dtype)
        means = self.parameter_in(self.proxy_mean, dtype)
        return proxy_math.cosine_similarity(embeddings.to(dtype), means)

    @torch.no_grad()
    def proxy_uncertainty(
        self, num_samples: int = 1000, seed: int = 0, max_elements: int = 2**24
    ) -> torch.Tensor:
        """Normalised standard deviation of each proxy (supplement eq. 30), shape ``(C,)``.

        ``sum_d std_k(p^k_d / ||p^k||)`` over ``num_samples`` samples ``p^k = mu + sigma eps^k``
        (sample standard deviation, Bessel-corrected as ``torch.std``). Uses its own generator
        seeded by ``seed``; the loss's state is untouched. Classes are processed in chunks of at
        most ``max_elements`` sampled values.
        """
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}")
        mean = self.proxy_mean.detach()
        std = self.std.to(mean.dtype)
        generator = torch.Generator(device=mean.device).manual_seed(int(seed))
        chunk = max(1, max_elements // (num_samples * self.embedding_size))
        out = []
        for start in range(0, self.num_classes, chunk):
            m, s = mean[start : start + chunk], std[start : start + chunk]
            eps = torch.randn(
                (num_samples, *m.shape), generator=generator, dtype=m.dtype, device=m.device
            )
            samples = F.normalize(m + s * eps, p=2, dim=2)
            out.append(samples.std(dim=0).sum(dim=1))
        return torch.cat(out)

    # ------------------------------------------------------------------------ forward
    def on_failed_step(self) -> None:
        self._generator = None  # rebuilt from the committed rng_state buffer

    def compute_proxy_loss(self, embeddings, labels, indices_tuple):
        miner_weights = None
        if indices_tuple is not None:
            miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
        dtype = embeddings.dtype
        if self.proxy_mean.dtype == torch.float64:
            dtype = torch.float64
        embeddings = embeddings.to(dtype)
        if not self.training:
            proxies = self.parameter_in(self.proxy_mean, dtype)
            return self._loss_dict(embeddings, labels, proxies, miner_weights)

        order = distributed.gathered_batch_rank_order(embeddings.shape[0], embeddings.device)
        if order is not None:
            embeddings, labels = embeddings[order], labels[order]
            miner_weights = None if miner_weights is None else miner_weights[order]
        self._sync_ranks()
        generator = self._generator_for(embeddings.device)
        pending = {}
        if self.newton_steps > 0:
            mean, std, step = self._newton(embeddings, labels, miner_weights, generator, dtype)
            pending.update(mean=mean, std=std)
            proxies = self._sample(mean, std, generator)
        else:
            mean = self.parameter_in(self.proxy_mean, dtype)
            raw_std = self.parameter_in(self.proxy_std, dtype)
            # max(raw_std, sigma_min) with the gradient passed straight through
            std = raw_std + (self.sigma_min - raw_std.detach()).clamp(min=0)
            proxies = self._sample(mean, std, generator)
            step = None
        pending["rng_state"] = generator.get_state()
        self.stage_state(pending)
        loss_dict = self._loss_dict(embeddings, labels, proxies, miner_weights)
        if self.collect_stats:
            self._record_stats(embeddings, labels, proxies, pending, step, dtype)
        return loss_dict

    def _sub_loss_names(self):
        return ["pos_loss", "neg_loss"]

    # ------------------------------------------------------------------------ internals
    def _loss_dict(self, embeddings, labels, proxies, miner_weights) -> dict:
        """PML loss dict of Proxy-Anchor at ``proxies`` (PML's normalisation)."""
        sims = proxy_math.cosine_similarity(embeddings, proxies)
        pos_mask, _ = proxy_math.class_masks(labels, self.num_classes)
        pos_term, neg_term = proxy_math.proxy_anchor_terms(
            sims, pos_mask, self.alpha, self.margin, miner_weights=miner_weights
        )
        loss_dict = self.proxy_anchor_loss_dict(
            pos_term, neg_term, pos_mask.any(dim=0).sum(), self.num_classes
        )
        if self.newton_steps == 0:
            self.add_weight_regularization_to_loss_dict(loss_dict, self.proxy_mean)
        return loss_dict

    @torch.no_grad()
    def _newton(self, embeddings, labels, miner_weights, generator, dtype):
        """The M Newton steps of Algorithm 1 from the warm start; returns ``(mu, sigma, step)``."""
        x = F.normalize(embeddings.detach(), p=2, dim=1)
        mean_prev = self.proxy_mean.to(dtype)
        std_prev = self.proxy_std.to(dtype)
        inv_var_prev = std_prev.pow(-2)
        mean, std, step = mean_prev, std_prev, None
        scale = 1.0 / self.temperature
        batch = newton_batch(x, labels, miner_weights)
        # one noise buffer, refilled every step (newton_update overwrites it in place)
        eps = torch.empty_like(mean) if self.stochastic else None
        for m in range(self.newton_steps):
            if eps is not None:
                eps.normal_(generator=generator)
            proxies = mean if eps is None else torch.addcmul(mean, std, eps)
            grad, hess = proxy_anchor_newton_terms(
                x, labels, proxies, self.alpha, self.margin, scale, batch=batch
            )
            del proxies
            mean, std, step = newton_update(
                mean, std, eps, mean_prev, inv_var_prev, grad, hess, self.sigma_min, m == 0,
                self.newton_damping,
            )
        return mean, std, step

    def _noise(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    def _sample(self, mean, std, generator) -> torch.Tensor:
        if not self.stochastic:
            return mean
        return mean + std * self._noise(mean.detach(), generator)

    @torch.no_grad()
    def commit_state(self, pending: dict) -> None:
        """Write the step's new state (only after the whole step succeeded)."""
        if "mean" in pending:
            self.proxy_mean.copy_(pending["mean"])
            self.proxy_std.copy_(pending["std"])
        else:
            self.proxy_std.clamp_(min=self.sigma_min)
        self.rng_state = pending["rng_state"]

    @torch.no_grad()
    def _record_stats(self, embeddings, labels, proxies, pending, step, dtype) -> None:
        sims = proxy_math.cosine_similarity(embeddings.detach(), proxies.detach())
        pos = sims.gather(1, labels.unsqueeze(1))
        num_neg = sims.numel() - pos.numel()
        self.mean_pos_similarity = pos.mean().item()
        self.mean_neg_similarity = (
            ((sims.sum() - pos.sum()) / num_neg).item() if num_neg > 0 else 0.0
        )
        if "mean" in pending:
            std_prev = self.proxy_std.to(dtype)
            kl = gaussian_kl(pending["mean"], pending["std"], self.proxy_mean.to(dtype), std_prev)
            self.mean_kl = kl.mean().item()
            self.mean_std = pending["std"].mean().item()
            self.newton_step_size = step.square().mean().sqrt().item()
        else:
            self.mean_std = self.std.mean().item()

    def _generator_for(self, device: torch.device) -> torch.Generator:
        """The loss's generator on ``device``, rebuilt from ``rng_state`` when needed.

        A state saved on another device type (CPU <-> CUDA) cannot be set directly; the new
        generator is then seeded deterministically from it.
        """
        generator = self._generator
        if generator is None or generator.device != device:
            generator = torch.Generator(device=device)
            try:
                generator.set_state(self.rng_state)
            except RuntimeError:
                generator.manual_seed(_seed_from_state(self.rng_state))
            self._generator = generator
        return generator

    @torch.no_grad()
    def _sync_ranks(self) -> None:
        """At the first distributed training step, broadcast the state from rank 0."""
        _, world = distributed.world()
        if world <= 1 or self._ranks_synced:
            return
        dist = torch.distributed
        dist.broadcast(self.proxy_mean.data, src=0)
        dist.broadcast(self.proxy_std.data, src=0)
        rng_state = self.rng_state.to(self.proxy_mean.device)
        dist.broadcast(rng_state, src=0)
        self.rng_state = rng_state.cpu()
        self._generator = None
        self._ranks_synced = True

    # ------------------------------------------------------------------- state handling
    def _apply(self, fn, recurse=True):
        # torch.Generator.get_state/set_state work on CPU uint8 tensors: rng_state stays there
        rng_state = self._buffers.get("rng_state")
        result = super()._apply(fn, recurse)
        if rng_state is not None:
            self._buffers["rng_state"] = rng_state
        return result

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "rng_state"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.ndim == 1:
            # the state of a CUDA generator has another size than a CPU one
            self._buffers["rng_state"] = value.detach().to("cpu", copy=True)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._generator = None
        self._ranks_synced = False
