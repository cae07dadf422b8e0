"""Variational Continual Proxy-Anchor (VCPA) loss.

Method notes (equations implemented, decisions where the paper is silent, the damped and
monotone Newton modes): ``docs/vcpa.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..functional import distributed, proxy_math
from ..functional.validation import check_bool, check_int, check_real
from ..functional.vcpa_math import (
    NORM_EPS,
    NewtonBatch,
    expected_objective,
    gaussian_kl,
    newton_batch,
    newton_update,
    proxy_anchor_newton_terms,
)
from ..hooks.std_projection import track_for_projection
from ..utils.rng_state import (
    CUDA_STATE_BYTES,
    check_generator_state,
    generator_from_state,
    seed_from_state,
)
from .base_proxy_loss import BaseProxyLoss

# the Newton math and the generator-state helpers were defined here: importable from here still
__all__ = [
    "CUDA_STATE_BYTES",
    "FLOAT32_MAX",
    "NORM_EPS",
    "STATS",
    "NewtonBatch",
    "VCPALoss",
    "check_generator_state",
    "expected_objective",
    "gaussian_kl",
    "generator_from_state",
    "newton_batch",
    "newton_update",
    "proxy_anchor_newton_terms",
]

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
STATS = (
    "mean_std",
    "mean_kl",
    "newton_step_size",
    "mean_pos_similarity",
    "mean_neg_similarity",
    "objective_before",
    "objective_after",
    "line_search_step",
)


class VCPALoss(BaseProxyLoss):
    """Variational Continual Proxy-Anchor loss (Kim, Guerrero, Pham, Pavlovic, "Variational
    Continual Proxy-Anchor for Deep Metric Learning", Algorithm 1, eq. 12-13 and supplement
    eq. 15-30; notes in ``docs/vcpa.md``).

    Each class has a Gaussian proxy ``q(p_c) = N(mu_c, diag(sigma_c^2))`` (prior and initial value
    ``mu = 0, sigma = 1``). Every training step (``forward`` in training mode):

    1. warm start from the previous step's ``(mu, sigma)``, which are also the prior of the KL;
    2. ``newton_steps`` diagonal Newton steps on ``L_t = KL(q_t || q_{t-1}) + L_PA(B; p^)/tau``
       with ``p^ = mu + sigma * eps``, a fresh ``eps ~ N(0, I)`` per step, the closed-form
       derivatives of the supplement (eq. 21-29, ``||p^||`` held constant, embeddings detached,
       ``1/|C+|`` and ``1/C`` normalisation), step size ``newton_damping`` and
       ``sigma >= sigma_min`` after each step; with ``newton_line_search`` each step is also
       backtracked per class until a Monte-Carlo estimate of ``L_t`` (``objective_samples``
       fixed draws) does not increase;
    3. a fresh sample ``p^`` gives the returned Proxy-Anchor loss (PML's normalisation), with
       ``p^`` a constant: the gradient reaches the network only.

    With ``sigma -> 0`` (or ``stochastic=False``) the returned loss is PML's ``ProxyAnchorLoss`` on
    the means. ``newton_steps=0`` (the paper's SOP / In-Shop setting) makes ``proxy_mean`` and
    ``proxy_std`` Parameters trained by the loss optimizer through the reparameterised sample
    (at the warm start the KL gradient is zero, so the loss is ``L_PA(B; mu + sigma * eps)``);
    the loss uses ``max(proxy_std, sigma_min)`` (gradient passed straight through), and
    ``proxy_std`` is projected onto ``[sigma_min, inf)`` right after every step of a
    ``torch.optim`` optimizer holding it (a global optimizer post-step hook) and at every
    training forward: projected gradient descent, like the paper's clamp.

    Randomness comes from the loss's own ``torch.Generator`` (seeded by ``seed``; ``None`` draws a
    seed from torch's global generator). Per training step it draws, in this order: the
    ``objective_samples`` line-search draws (``newton_line_search`` only), one ``eps`` per
    Newton step, the returned loss's sample. Means, standard deviations and the generator state
    (a ``uint8`` buffer kept on the CPU, validated on load) are buffers, or Parameters with
    ``newton_steps=0``: ``state_dict`` resumes exactly. State changes only in training mode and
    only once the step succeeded. In eval mode the loss is evaluated at the means, with no
    sampling and no state change.

    Under PML's ``DistributedLossWrapper(efficient=False)`` every rank sees the gathered batch;
    the loss puts it in rank order (so that every rank computes bit-identical updates) and, at
    its first distributed training step, broadcasts its state from rank 0 (so ``seed=None``
    works too). ``efficient=True`` passes ``ref_emb`` and is rejected.

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding dimension ``D``.
        margin: ``delta`` (0.1).
        alpha: scale (32), > 0.
        temperature: ``tau`` (0.01 for CUB in the paper, 0.001 for Cars, SOP, In-Shop), > 0 with
            ``alpha^2 / tau`` finite in float32 (the Hessian scale).
        newton_steps: ``M`` Newton steps per training step (10); 0 trains ``mu, sigma`` by the
            loss optimizer.
        sigma_min: lower bound of ``sigma`` (1e-5), > 0 with ``1 / sigma_min^2`` finite in
            float32 (the KL's inverse variance).
        stochastic: sample ``p^ = mu + sigma * eps``; ``False`` is the paper's ablation I
            (``eps = 0``, ``p^ = mu``), with ``mu`` initialised as Proxy-Anchor's proxies
            (``weight_init_func``, kaiming normal, seeded from ``seed``) instead of 0; ``sigma``
            then never changes (its Newton subproblem is solved by ``sigma = sigma_prev``).
        seed: seed of the loss's generator; ``None`` draws one from torch's global generator
            (so ``torch.manual_seed`` makes runs reproducible).
        newton_damping: step size ``eta`` in ``(0, 1]`` of every Newton step,
            ``theta - eta H^-1 g``; 1.0 is the paper's step (this package's variant below 1).
        newton_line_search: monotone mode (this package's variant): a Newton step (after
            damping) is tried at fractions ``1, 1/2, .., 2^-line_search_backtracks`` of its length
            and each class keeps the largest fraction whose estimate of ``L_t`` does not exceed
            the current one, or does not move. Needs ``newton_steps > 0``.
        objective_samples: ``S``, fixed ``eps`` draws per training step of the Monte-Carlo
            estimate of ``L_t`` (line search and the ``objective_*`` stats) (8).
        line_search_backtracks: halvings tried by the line search (3).
        **kwargs: ``check_inputs`` and PML keyword arguments (``collect_stats``, ``reducer``,
            ``weight_init_func``; ``weight_regularizer`` only with ``newton_steps=0``).

    Attributes:
        proxy_mean, proxy_std: ``(C, D)`` variational parameters (buffers, or Parameters with
            ``newton_steps=0``).
        proxies: the means (for logits, plots, retrieval by proxy).
        rng_state: the generator state (``uint8`` buffer, on the CPU).

    Stats (PML ``collect_stats``, training mode): ``mean_std``, ``mean_kl`` (per class, summed
    over dimensions), ``newton_step_size`` (RMS of the last Newton update of the means),
    ``mean_pos_similarity`` / ``mean_neg_similarity`` (at the sampled proxies) and, with
    ``newton_steps > 0``, ``objective_before`` / ``objective_after``: the estimate of
    ``tau L_t`` (summed over classes, ``S`` fixed draws: the line search's, else draws of a
    generator seeded from the step's ``rng_state``, which leaves the training draws unchanged)
    before and after the Newton steps, and ``line_search_step`` (mean accepted fraction over
    classes and Newton steps, line search only). The ``objective_*`` stats cost
    ``2 S`` extra Proxy-Anchor evaluations per step.

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
        newton_line_search: bool = False,
        objective_samples: int = 8,
        line_search_backtracks: int = 3,
        **kwargs,
    ) -> None:
        margin = check_real("margin", margin)
        alpha = check_real("alpha", alpha, low=0, low_inclusive=False)
        temperature = check_real("temperature", temperature, low=0, low_inclusive=False)
        if not alpha * alpha / temperature <= FLOAT32_MAX:
            raise ValueError(
                f"alpha**2 / temperature must be finite in float32 (the Newton Hessian scales "
                f"by it), got alpha={alpha!r}, temperature={temperature!r}"
            )
        if not alpha * (1.0 + abs(margin)) <= FLOAT32_MAX:
            raise ValueError(
                f"alpha * (1 + |margin|) must be finite in float32 (the exponents), got "
                f"alpha={alpha!r}, margin={margin!r}"
            )
        newton_steps = check_int("newton_steps", newton_steps, low=0)
        sigma_min = check_real("sigma_min", sigma_min, low=0, low_inclusive=False)
        if sigma_min < FLOAT32_MAX**-0.5:
            raise ValueError(
                f"sigma_min must be >= {FLOAT32_MAX**-0.5:.3g} (1 / sigma_min**2, the KL's "
                f"inverse variance, must be finite in float32), got {sigma_min!r}"
            )
        stochastic = check_bool("stochastic", stochastic)
        if seed is not None:
            seed = check_int("seed", seed, low=0, high=2**64 - 1)
        newton_damping = check_real(
            "newton_damping", newton_damping, low=0, high=1, low_inclusive=False
        )
        newton_line_search = check_bool("newton_line_search", newton_line_search)
        objective_samples = check_int("objective_samples", objective_samples, low=1)
        line_search_backtracks = check_int("line_search_backtracks", line_search_backtracks, low=0)
        if newton_steps == 0 and (newton_line_search or newton_damping != 1.0):
            raise ValueError(
                "newton_damping and newton_line_search need newton_steps > 0 (with "
                "newton_steps=0 the loss optimizer trains the proxies)"
            )
        if newton_steps > 0 and kwargs.get("weight_regularizer") is not None:
            raise ValueError(
                "weight_regularizer needs newton_steps=0 (with Newton steps the variational "
                "parameters are buffers, not trained by an optimizer)"
            )
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin = margin
        self.alpha = alpha
        self.temperature = temperature
        self.newton_steps = newton_steps
        self.sigma_min = sigma_min
        self.stochastic = stochastic
        self.seed = seed
        self.newton_damping = newton_damping
        self.newton_line_search = newton_line_search
        self.objective_samples = objective_samples
        self.line_search_backtracks = line_search_backtracks

        if seed is None:
            # drawn from torch's global generator, so torch.manual_seed makes runs reproducible
            seed = int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator().manual_seed(int(seed))
        mean = torch.zeros(self.num_classes, self.embedding_size)
        if not self.stochastic:
            # the initial means follow ``seed`` too: a seed of their own, drawn from the
            # loss's generator, for torch's global generator that weight_init_func uses
            init_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                self.weight_init_func(mean)
        std = torch.ones(self.num_classes, self.embedding_size)
        if self.newton_steps == 0:
            self.proxy_mean = torch.nn.Parameter(mean)
            self.proxy_std = torch.nn.Parameter(std)
            track_for_projection(self)
        else:
            self.register_buffer("proxy_mean", mean)
            self.register_buffer("proxy_std", std)
        self.register_buffer("rng_state", generator.get_state())
        self._generator: torch.Generator | None = None
        self._ranks_synced = False

        self.add_to_recordable_attributes(
            list_of_names=[
                "alpha",
                "margin",
                "temperature",
                "newton_steps",
                "sigma_min",
                "newton_damping",
                "objective_samples",
            ],
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

    @torch.no_grad()
    def project_std_(self) -> None:
        """Project ``proxy_std`` onto ``[sigma_min, inf)`` in place (``newton_steps=0``: run
        after every optimizer step holding it, see the class docstring)."""
        self.proxy_std.clamp_(min=self.sigma_min)

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
        num_samples = check_int("num_samples", num_samples, low=2)
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

    @torch.no_grad()
    def newton_path(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        steps: int = 30,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Diagnostics: the estimate of ``tau L_t`` (summed over classes) after ``m = 0..steps``
        Newton steps of one training step on this batch from the current state, with this
        loss's options and the draws training would use; ``num_samples`` (default
        ``objective_samples``) fixed evaluation draws of a generator seeded by ``seed``. The
        state, generator included, is untouched. Returns ``(steps + 1,)``.
        """
        if self.newton_steps == 0:
            raise ValueError("newton_path needs newton_steps > 0")
        steps = check_int("steps", steps, low=0)
        num_samples = self.objective_samples if num_samples is None else num_samples
        num_samples = check_int("num_samples", num_samples, low=1)
        self.validate_inputs(embeddings, labels)
        labels = c_f.to_device(labels, embeddings).long()
        self.move_to(embeddings.device)
        dtype = self._dtype_for(embeddings)
        batch = newton_batch(F.normalize(embeddings.to(dtype), p=2, dim=1), labels)
        generator = generator_from_state(self.rng_state, embeddings.device)
        evaluation = torch.Generator(device=embeddings.device).manual_seed(int(seed))
        eps = self._objective_draws(num_samples, dtype, evaluation)
        mean_prev, std_prev = self.proxy_mean.to(dtype), self.proxy_std.to(dtype)
        path = []

        def record(mean: torch.Tensor, std: torch.Tensor) -> None:
            path.append(self._objective(batch, mean, std, mean_prev, std_prev, eps).sum())

        record(mean_prev, std_prev)
        self._newton(batch, generator, dtype, steps, on_step=record)
        return torch.stack(path)

    # ------------------------------------------------------------------------ forward
    def on_failed_step(self) -> None:
        self._generator = None  # rebuilt from the committed rng_state buffer

    def compute_proxy_loss(self, embeddings, labels, indices_tuple):
        miner_weights = None
        if indices_tuple is not None:
            miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
        dtype = self._dtype_for(embeddings)
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
        pending: dict[str, Any] = {}
        if self.newton_steps > 0:
            x = F.normalize(embeddings.detach(), p=2, dim=1)
            batch = newton_batch(x, labels, miner_weights)
            mean, std, info = self._newton(batch, generator, dtype, self.newton_steps)
            pending.update(mean=mean, std=std)
            proxies = self._sample(mean, std, generator)
        else:
            track_for_projection(self)  # also copies (deepcopy, pickle) of the loss
            mean = self.parameter_in(self.proxy_mean, dtype)
            raw_std = self.parameter_in(self.proxy_std, dtype)
            # max(raw_std, sigma_min) with the gradient passed straight through
            std = raw_std + (self.sigma_min - raw_std.detach()).clamp(min=0)
            proxies = self._sample(mean, std, generator)
            batch, info = None, {}
        pending["rng_state"] = generator.get_state()
        self.stage_state(pending)
        loss_dict = self._loss_dict(embeddings, labels, proxies, miner_weights)
        if self.collect_stats:
            self._record_stats(embeddings, labels, proxies, pending, info, batch, dtype)
        return loss_dict

    def _sub_loss_names(self):
        return ["pos_loss", "neg_loss"]

    # ------------------------------------------------------------------------ internals
    def _dtype_for(self, embeddings: torch.Tensor) -> torch.dtype:
        if self.proxy_mean.dtype == torch.float64:
            return torch.float64
        return proxy_math.compute_dtype(embeddings.dtype)

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

    def _objective_draws(self, num: int, dtype: torch.dtype, generator: torch.Generator):
        """``(num, C, D)`` fixed draws of the objective estimate (``None`` when deterministic)."""
        if not self.stochastic:
            return None
        shape = (num, self.num_classes, self.embedding_size)
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)

    def _objective(self, batch, mean, std, mean_prev, std_prev, eps, **step) -> torch.Tensor:
        return expected_objective(
            batch, mean, std, mean_prev, std_prev, eps,
            self.alpha, self.margin, self.temperature, **step,
        )  # fmt: skip

    @torch.no_grad()
    def _newton(
        self,
        batch: NewtonBatch,
        generator: torch.Generator,
        dtype: torch.dtype,
        steps: int,
        on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``steps`` Newton steps of Algorithm 1 from the warm start (damped, and line-searched
        with ``newton_line_search``); returns ``(mu, sigma, info)``, ``info`` holding the last
        mean update ``"step"`` and, with the line search, its draws ``"eps"`` and the mean
        accepted fraction ``"fraction"``."""
        mean_prev = self.proxy_mean.to(dtype)
        std_prev = self.proxy_std.to(dtype)
        inv_var_prev = std_prev.pow(-2)
        mean, std = mean_prev, std_prev
        scale = 1.0 / self.temperature
        info: dict[str, Any] = {"step": torch.zeros_like(mean)}
        if self.newton_line_search:
            info["eps"] = self._objective_draws(self.objective_samples, dtype, generator)
            # built on the device (a host-to-device copy would be a host sync on CUDA)
            halvings = torch.arange(
                self.line_search_backtracks + 1, dtype=dtype, device=mean.device
            )
            fractions = torch.cat([halvings.new_zeros(1), 0.5**halvings])
            info["fraction"] = mean.new_zeros(())
        # one noise buffer, refilled every step (newton_update overwrites it in place)
        eps = torch.empty_like(mean) if self.stochastic else None
        for m in range(steps):
            if eps is not None:
                eps.normal_(generator=generator)
            proxies = mean if eps is None else torch.addcmul(mean, std, eps)
            grad, hess = proxy_anchor_newton_terms(
                batch.embeddings, batch.labels, proxies, self.alpha, self.margin, scale,
                batch=batch,
            )  # fmt: skip
            del proxies
            new_mean, new_std, step = newton_update(
                mean, std, eps, mean_prev, inv_var_prev, grad, hess, self.sigma_min, m == 0,
                self.newton_damping,
            )  # fmt: skip
            if self.newton_line_search:
                values = self._objective(
                    batch, mean, std, mean_prev, std_prev, info["eps"],
                    step_mean=new_mean - mean, step_std=new_std - std, fractions=fractions,
                )  # fmt: skip
                fraction = self._accepted_fraction(values, fractions)
                new_mean = torch.addcmul(mean, fraction, new_mean - mean)
                new_std = torch.addcmul(std, fraction, new_std - std).clamp_min_(self.sigma_min)
                step = step.mul_(fraction)
                info["fraction"] = info["fraction"] + fraction.mean() / steps
            mean, std = new_mean, new_std
            info["step"] = step
            if on_step is not None:
                on_step(mean, std)
        return mean, std, info

    @staticmethod
    def _accepted_fraction(values: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
        """Per class, the largest fraction ``fractions[k]`` (``k >= 1``, decreasing) whose
        objective ``values[k]`` does not exceed the current ``values[0]``, else 0: ``(C, 1)``."""
        ok = values[1:] <= values[:1]
        first = ok.to(values.dtype).argmax(dim=0)  # the first maximum: the largest step
        chosen = torch.where(ok.any(dim=0), fractions[1:][first], 0.0)
        return chosen.unsqueeze(1)

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
            self.project_std_()
        self.rng_state = pending["rng_state"]

    @torch.no_grad()
    def _record_stats(self, embeddings, labels, proxies, pending, info, batch, dtype) -> None:
        sims = proxy_math.cosine_similarity(embeddings.detach(), proxies.detach())
        pos = sims.gather(1, labels.unsqueeze(1))
        num_neg = sims.numel() - pos.numel()
        self.mean_pos_similarity = pos.mean().item()
        self.mean_neg_similarity = (
            ((sims.sum() - pos.sum()) / num_neg).item() if num_neg > 0 else 0.0
        )
        if "mean" not in pending:
            self.mean_std = self.std.mean().item()
            return
        mean_prev, std_prev = self.proxy_mean.to(dtype), self.proxy_std.to(dtype)
        kl = gaussian_kl(pending["mean"], pending["std"], mean_prev, std_prev)
        self.mean_kl = kl.mean().item()
        self.mean_std = pending["std"].mean().item()
        self.newton_step_size = info["step"].square().mean().sqrt().item()
        if self.newton_line_search:
            eps = info["eps"]
            self.line_search_step = info["fraction"].item()
        else:  # draws that leave the training draws unchanged
            device = embeddings.device
            stats_gen = torch.Generator(device=device).manual_seed(seed_from_state(self.rng_state))
            eps = self._objective_draws(self.objective_samples, dtype, stats_gen)
        before = self._objective(batch, mean_prev, std_prev, mean_prev, std_prev, eps).sum()
        after = self._objective(batch, pending["mean"], pending["std"], mean_prev, std_prev, eps)
        self.objective_before = before.item()
        self.objective_after = after.sum().item()

    def _generator_for(self, device: torch.device) -> torch.Generator:
        """The loss's generator on ``device``, rebuilt from ``rng_state`` when needed."""
        generator = self._generator
        if generator is None or generator.device != device:
            generator = generator_from_state(self.rng_state, device)
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

    def check_state_value(self, name: str, key: str, value, current: torch.Tensor) -> None:
        if name == "rng_state":  # a CUDA generator's state has another size than a CPU one
            check_generator_state(value, name=key)
        else:
            super().check_state_value(name, key, value, current)

    def check_state_dict(self, state_dict, prefix: str = "") -> None:
        super().check_state_dict(state_dict, prefix)
        std = state_dict.get(prefix + "proxy_std")
        if std is not None and not bool((std >= self.sigma_min).all()):
            raise ValueError(
                f"{prefix}proxy_std holds values below sigma_min={self.sigma_min} "
                f"(min {float(std.min())}): not a valid state of this loss"
            )

    def before_state_load(self, state_dict, prefix: str) -> None:
        value = state_dict.get(prefix + "rng_state")
        if value is not None:  # torch copies only into a buffer of the same size
            self._buffers["rng_state"] = value.detach().to("cpu", copy=True)

    def after_state_load(self) -> None:
        self._generator = None
        self._ranks_synced = False
