"""Informative Sample-Aware Proxy (Proxy-ISA) loss."""

from __future__ import annotations

import math

import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..functional import distributed, proxy_math
from ..functional.validation import check_choice, check_int, check_real
from ..utils.class_memory_bank import BUFFERS as MEMORY_BUFFERS
from ..utils.class_memory_bank import ClassMemoryBank
from .base_proxy_loss import BaseProxyLoss

POSITIVE_WEIGHTINGS = ("none", "inverse_effective_number", "lower_bound", "decay")
NEGATIVE_WEIGHTINGS = ("none", "inverse_effective_number")
BATCH_LAYOUTS = ("pml", "as_given")
STATS = (
    "mean_effective_number",
    "memory_fill",
    "outlier_fraction",
    "mean_positive_weight",
    "mean_negative_weight",
    "mean_learned_similarity",
)


# the per-class weights compute in float32: 1 + e^-tau (eq. 17) must stay finite there
_MIN_DECAY_TIMING = -math.log(torch.finfo(torch.float32).max)


def _check_volume_bound(value) -> float:
    volume_bound = check_real("volume_bound", value, low=1)
    if (volume_bound - 1.0) / volume_bound == 1.0:
        raise ValueError(
            f"volume_bound={value!r} is too large: beta = (V - 1) / V rounds to 1 in float64, so "
            "the effective number (1 - beta^n) / (1 - beta) (eq. 8) would be 0 / 0"
        )
    return volume_bound


def _check_decay_timing(value) -> float:
    decay_timing = check_real("decay_timing", value)
    if decay_timing < _MIN_DECAY_TIMING:
        raise ValueError(
            f"decay_timing={value!r} is too small: 1 + e^-tau in the decay function (eq. 17) "
            f"overflows float32; use decay_timing >= {_MIN_DECAY_TIMING:.2f}"
        )
    return decay_timing


def _memory_key(name: str) -> str:
    """The ``state_dict`` key of the memory buffer ``name``: ``memory_<name>``, flat, as the keys
    were before the memory had a class of its own (saved states keep loading)."""
    return "memory_" + name


def _flat_memory_keys(module: ProxyISALoss, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook: the memory's ``memory.<name>`` entries as ``memory_<name>``
    (same order: the submodule's entries come last, as its buffers were registered last)."""
    for name in MEMORY_BUFFERS:
        state_dict[prefix + _memory_key(name)] = state_dict.pop(prefix + "memory." + name)
    getattr(state_dict, "_metadata", {}).pop(prefix + "memory", None)


def _memory_buffer(name: str) -> property:
    return property(
        lambda self: getattr(self.memory, name),
        doc=f"The memory's ``{name}`` buffer (``state_dict`` key ``{_memory_key(name)}``).",
    )


class ProxyISALoss(BaseProxyLoss):
    """Informative Sample-Aware Proxy loss (Li et al., "Informative Sample-Aware Proxy for Deep
    Metric Learning", MMAsia 2022, eq. 12-17 and Algorithm 1; docs/proxy-isa.md).

    Proxy-Anchor whose exponents are scaled by per-pair weights ``w+`` / ``w-`` that depend on a
    per-class state: the number of clean samples seen ``n_c``, the effective number
    ``E_c = (1 - beta^n_c) / (1 - beta)`` with ``beta = (V - 1) / V`` (eq. 8), and the learned
    similarity ``s_c = h * mean cos(memory entries of class c, p_c)`` (eq. 10) estimated from a
    FIFO memory of the last ``T`` clean embeddings. With the state before the step::

        nu_c    = 1 / (1 + log(1 + E_c))                                   (eq. 14)
        sigma_c = 1 + (1 + e^-tau)(nu_c - 1) / (1 + e^(V - E_c - tau))     (eq. 17)
        eta_c   = (1 + k (1 - s_c)) nu_c + lambda                          (eq. 15)
        out_c   = s_c - eta_c
        w+_ic = 1 + P_c if out_c <= s_ic <= s_c else P_c   (P_c = sigma_c by default; eq. 16)
        w-_ic = 1 / max(1, E_c) if s_ic < out_c else 1                     (eq. 16)
        L = sum_{c in C+} log(1 + sum_{y_i = c}  exp(w+ alpha (delta - s_ic))) / sum_{c in C+} mean w+
          + sum_c         log(1 + sum_{y_i != c} exp(w- alpha (s_ic + delta))) / sum_{c} mean w-

    (eq. 13; the second divisor runs over the classes that have negatives in the batch). The
    weights are constants. Positive weights are used once the *filter* is on (before: ``w+ = 1``);
    negative weights at every step. After the loss, in training mode only: positives with
    ``s_ic < out_c`` are outliers (filter on only); ``n_c`` counts the other samples; while the
    *memory* is on, the non-outliers (normalised, detached) enter the memory and ``s_c`` is
    re-estimated for the classes of the batch with the current proxies. The first step equals
    PML's ``ProxyAnchorLoss``; with both weightings ``"none"`` every step does.

    The memory switches on at ``memory_start_epoch`` and the filter at ``filter_start_epoch``
    (epochs counted from 1, as PML trainers do): call :meth:`set_epoch` at the start of every
    epoch, or use :class:`pml_proxies.hooks.SetEpochHook` with a PML trainer. All state lives in
    registered buffers (``state_dict`` resumes exactly, ``.to(device)`` moves it); a step that
    raises changes nothing; eval mode changes nothing.

    Every argument is checked at construction (``ValueError`` / ``TypeError`` naming it).

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding dimension ``D``.
        margin: ``delta`` (0.1), finite.
        alpha: scale ``alpha`` (32), finite and > 0.
        volume_bound: ``V``, the upper bound of the effective number (100), finite, >= 1 and
            small enough that ``beta = (V - 1) / V < 1`` in float64 (about ``V < 9e15``).
        hardness_scale: ``h``, scales the memory's mean similarity into ``s_c`` (0.15), >= 0.
        sensitivity: ``k``, sensitivity of the search length to class hardness (0.9; the authors
            use 0.4 for Cars-196 and 0.1 for In-Shop), >= 0.
        search_margin: ``lambda``, the margin of the search length (0.1), finite.
        decay_timing: ``tau``, timing of the decay function sigma (1.5), finite and >= -88.72
            (below, ``1 + e^-tau`` overflows float32).
        memory_size: ``T``, capacity of the memory ring buffer (55,000), an integer >= 1.
        memory_start_epoch: first epoch (from 1) with the memory on (3), an integer >= 1.
        filter_start_epoch: first epoch (from 1) with the filter / positive weights on (4), an
            integer >= 1.
        positive_weighting: ``P_c`` of the positive rule (paper Table 3): ``"decay"`` (sigma_c,
            default), ``"lower_bound"`` (nu_c), ``"inverse_effective_number"``
            (``1 / max(1, E_c)``) or ``"none"`` (``w+ = 1``).
        negative_weighting: ``"inverse_effective_number"`` (default) or ``"none"`` (``w- = 1``).
        distributed_batch_layout: under ``torch.distributed`` with more than one process,
            ``"pml"`` (default) assumes the batch comes from PML's
            ``DistributedLossWrapper(efficient=False)`` (this rank's chunk first, then the other
            ranks in order) and restores rank order, so that every rank pushes the same memory
            entries in the same order and holds identical state; ``"as_given"`` uses the batch
            as it comes.
        **kwargs: PML keyword arguments (``weight_regularizer``, ``weight_reg_weight``,
            ``weight_init_func``, ``reducer``, ``collect_stats``, ``check_inputs``, ...).

    Attributes:
        proxies: Parameter ``(C, D)``, initialised as PML's ``ProxyAnchorLoss``.
        epoch, memory_enabled, filter_enabled: the schedule (buffers).
        sample_counts, effective_numbers, learned_similarities: ``n_c``, ``E_c``, ``s_c``.
        memory: the :class:`~pml_proxies.utils.class_memory_bank.ClassMemoryBank` of the last
            ``T`` clean embeddings, with exact (int64 fixed-point) per-class sums. Its buffers
            are saved under the keys ``memory_embeddings``, ``memory_labels`` (-1 = empty),
            ``memory_write_position``, ``memory_count``, ``memory_class_counts`` and
            ``memory_class_sums``, and read as attributes of those names.

    Statistics (PML recordable stats, only with ``collect_stats=True``): ``mean_effective_number``,
    ``memory_fill`` (fraction of ``T``), ``outlier_fraction`` (of the batch's positives),
    ``mean_positive_weight``, ``mean_negative_weight`` (over the batch's pairs),
    ``mean_learned_similarity`` (over all classes).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` in ``[0, C)``; output a scalar.
    """

    memory: ClassMemoryBank

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        volume_bound: float = 100.0,
        hardness_scale: float = 0.15,
        sensitivity: float = 0.9,
        search_margin: float = 0.1,
        decay_timing: float = 1.5,
        memory_size: int = 55000,
        memory_start_epoch: int = 3,
        filter_start_epoch: int = 4,
        positive_weighting: str = "decay",
        negative_weighting: str = "inverse_effective_number",
        distributed_batch_layout: str = "pml",
        **kwargs,
    ) -> None:
        margin = check_real("margin", margin)
        alpha = check_real("alpha", alpha, low=0, low_inclusive=False)
        volume_bound = _check_volume_bound(volume_bound)
        hardness_scale = check_real("hardness_scale", hardness_scale, low=0)
        sensitivity = check_real("sensitivity", sensitivity, low=0)
        search_margin = check_real("search_margin", search_margin)
        decay_timing = _check_decay_timing(decay_timing)
        T = check_int("memory_size", memory_size, low=1)
        memory_start_epoch = check_int("memory_start_epoch", memory_start_epoch, low=1)
        filter_start_epoch = check_int("filter_start_epoch", filter_start_epoch, low=1)
        check_choice("positive_weighting", positive_weighting, POSITIVE_WEIGHTINGS)
        check_choice("negative_weighting", negative_weighting, NEGATIVE_WEIGHTINGS)
        check_choice("distributed_batch_layout", distributed_batch_layout, BATCH_LAYOUTS)
        super().__init__(num_classes, embedding_size, **kwargs)
        C, D = self.num_classes, self.embedding_size
        self.margin = margin
        self.alpha = alpha
        self.volume_bound = volume_bound
        self.hardness_scale = hardness_scale
        self.sensitivity = sensitivity
        self.search_margin = search_margin
        self.decay_timing = decay_timing
        self.memory_size = T
        self.memory_start_epoch = memory_start_epoch
        self.filter_start_epoch = filter_start_epoch
        self.positive_weighting = positive_weighting
        self.negative_weighting = negative_weighting
        self.distributed_batch_layout = distributed_batch_layout

        self.proxies = torch.nn.Parameter(torch.empty(C, D))
        self.weight_init_func(self.proxies)

        long = torch.long
        self.register_buffer("epoch", torch.ones((), dtype=long))
        self.register_buffer("memory_enabled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("filter_enabled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("sample_counts", torch.zeros(C, dtype=long))
        self.register_buffer("effective_numbers", torch.zeros(C))
        self.register_buffer("learned_similarities", torch.ones(C))
        self.memory = ClassMemoryBank(T, C, D)
        self.register_state_dict_post_hook(_flat_memory_keys)

        # Python mirrors of the schedule buffers (no host sync per step); refreshed by
        # set_epoch and load_state_dict.
        self._epoch = 1
        self._memory_on = False
        self._filter_on = False
        self.set_epoch(1)

        self.add_to_recordable_attributes(list_of_names=["alpha", "margin"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=list(STATS), is_stat=True)

    # ----------------------------------------------------------------- schedule
    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch starts (counted from 1, as PML trainers do).

        Turns the memory on from ``memory_start_epoch`` and the filter from
        ``filter_start_epoch`` (the idiom of ``DistributedSampler.set_epoch``).
        """
        epoch = check_int("epoch", epoch, low=0)
        memory_on = epoch >= self.memory_start_epoch
        filter_on = epoch >= self.filter_start_epoch
        if (epoch, memory_on, filter_on) == (self._epoch, self._memory_on, self._filter_on):
            return
        self.epoch.fill_(epoch)
        self.memory_enabled.fill_(memory_on)
        self.filter_enabled.fill_(filter_on)
        self._epoch, self._memory_on, self._filter_on = epoch, memory_on, filter_on

    # the memory's buffers, read as the attributes they were before it had a class of its own
    memory_embeddings = _memory_buffer("embeddings")
    memory_labels = _memory_buffer("labels")
    memory_write_position = _memory_buffer("write_position")
    memory_count = _memory_buffer("count")
    memory_class_counts = _memory_buffer("class_counts")
    memory_class_sums = _memory_buffer("class_sums")

    @property
    def fixed_point_bits(self) -> int:
        """Fraction bits of the memory's int64 per-class sums (40, fewer for T >= 2^22)."""
        return self.memory.fixed_point_bits

    @property
    def sync_free_memory_updates(self) -> bool | None:
        """How the memory chooses its slots (``memory.sync_free_updates``): ``None`` by device
        (host-side sizes on CPU, fixed-shape updates elsewhere); ``True``/``False`` force one."""
        return self.memory.sync_free_updates

    @sync_free_memory_updates.setter
    def sync_free_memory_updates(self, value: bool | None) -> None:
        self.memory.sync_free_updates = value

    # ----------------------------------------------------------------- state loading
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        # the loss's buffers, the memory's under their state_dict keys, then the parameters
        own = super()._state_tensors()
        tensors = {name: tensor for name, tensor in own.items() if name in self._buffers}
        tensors.update((_memory_key(n), b) for n, b in self.memory.named_buffers())
        tensors.update((name, tensor) for name, tensor in own.items() if name not in tensors)
        return tensors

    def check_state_dict(self, state_dict, prefix: str = "") -> None:
        # every tensor on its own (shape, finite, integral), then the state as it will be after
        # the load (loaded tensors, the current buffers for keys a partial load leaves out)
        super().check_state_dict(state_dict, prefix)
        state = {
            name: state_dict.get(prefix + name, tensor)
            for name, tensor in self._state_tensors().items()
        }
        self._check_state(state)

    def before_state_load(self, state_dict, prefix: str) -> None:
        # the memory's flat keys to the submodule's, which torch loads next
        for name in MEMORY_BUFFERS:
            key = prefix + _memory_key(name)
            if key in state_dict:
                state_dict[prefix + "memory." + name] = state_dict.pop(key)

    def after_state_load(self) -> None:
        self._epoch = int(self.epoch)
        self._memory_on = bool(self.memory_enabled)
        self._filter_on = bool(self.filter_enabled)

    def _check_state(self, state: dict) -> None:
        """Raise ``ValueError`` unless ``state`` (``state_dict`` key -> tensor, each of the
        buffer's shape, finite and integral where the buffer is) is a consistent state of this
        loss: the memory's bookkeeping (:meth:`ClassMemoryBank.check_layout`), counts that cannot
        be negative, and the memory's rows and fixed-point sums
        (:meth:`ClassMemoryBank.check_rows`)."""
        C, D, T = self.num_classes, self.embedding_size, self.memory_size

        def fail(message: str):
            raise ValueError(
                f"invalid {type(self).__name__} state for num_classes={C}, embedding_size={D}, "
                f"memory_size={T}: {message}"
            )

        memory = {name: state[_memory_key(name)] for name in MEMORY_BUFFERS}
        self.memory.check_layout(memory, _memory_key(""), fail)
        for name in ("sample_counts", "effective_numbers", "epoch"):
            value = state[name].detach().to("cpu")
            if bool((value < 0).any()):
                fail(f"{name} must be >= 0, got {float(value.min()):g}")
        self.memory.check_rows(memory, _memory_key(""), fail)

    # ----------------------------------------------------------------- forward
    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if self.collect_stats:
            self._state_stats()
        return loss

    def commit_state(self, update: dict) -> None:
        self._commit(**update)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` cosine similarities of ``embeddings`` to the proxies (as PML's
        ``ProxyAnchorLoss.get_logits``), in float32 (float64 stays float64)."""
        dtype = proxy_math.compute_dtype(embeddings.dtype)
        return self._similarities(embeddings.to(dtype))[2]

    def _similarities(self, embeddings: torch.Tensor):
        """Unit embeddings, unit proxies (in the embeddings' dtype) and their cosines ``s_ic``."""
        proxies = self.parameter_in(self.proxies, embeddings.dtype)
        return proxy_math.unit_cosine_similarity(embeddings, proxies)

    @proxy_math.run_eagerly
    def _class_state(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of ``E_c`` and ``s_c`` in ``dtype``, made outside any compiled graph.

        The step's weights must not read the buffers themselves: the state commit overwrites
        them in place before the backward runs, and a compiled backward (AOT autograd)
        recomputes the weights from its graph's inputs instead of saving them, which then fails
        with "modified by an inplace operation". A copy made inside the graph would be
        recomputed from the buffer all the same."""
        E = self.effective_numbers.to(dtype, copy=True)
        return E, self.learned_similarities.to(dtype, copy=True)

    def class_weights(self, dtype: torch.dtype, names=None) -> dict:
        """Per-class quantities of the current state (``(C,)`` each, detached): ``nu``,
        ``sigma``, ``inverse_effective_number``, ``learned`` (``s_c``) and ``outlier``
        (``out_c``); only ``names`` (and ``learned``, ``outlier``) if given."""
        E, learned = self._class_state(dtype)
        nu = torch.log1p(E).add_(1.0).reciprocal_()
        # eta = (1 + k (1 - s)) nu + lambda;  out = s - eta
        eta = (1.0 + self.sensitivity) - self.sensitivity * learned
        out = learned - eta.mul_(nu).add_(self.search_margin)
        weights = {"nu": nu, "learned": learned, "outlier": out}
        if names is None or "sigma" in names:
            tau = self.decay_timing
            # 1 / (1 + e^(V - E - tau)) = sigmoid(E + tau - V), without overflow
            decay = torch.sigmoid(E + (tau - self.volume_bound))
            weights["sigma"] = (nu - 1.0).mul_(decay).mul_(1.0 + math.exp(-tau)).add_(1.0)
        if names is None or "inverse_effective_number" in names:
            weights["inverse_effective_number"] = E.clamp(min=1.0).reciprocal_()
        return weights

    def compute_proxy_loss(self, embeddings, labels, indices_tuple):
        dtype = embeddings.dtype
        C, B = self.num_classes, embeddings.shape[0]
        miner_weights = None
        if indices_tuple is not None:
            miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
        if self.training:
            order = self._rank_order(B, embeddings.device)
            if order is not None:
                embeddings, labels = embeddings[order], labels[order]
                if miner_weights is not None:
                    miner_weights = miner_weights[order]

        x, p, sims = self._similarities(embeddings)
        pos_mask, _ = proxy_math.class_masks(labels, C)
        detached = sims.detach()
        penalty = None
        if self._filter_on and self.positive_weighting != "none":
            penalty = {
                "inverse_effective_number": "inverse_effective_number",
                "lower_bound": "nu",
                "decay": "sigma",
            }[self.positive_weighting]
        needed = {penalty}
        if self.negative_weighting != "none":
            needed.add("inverse_effective_number")
        cw = self.class_weights(dtype, needed)
        outlier_threshold = cw["outlier"]

        # per-class sample counts of the batch (exact integers; no host sync)
        counts = pos_mask.sum(0, dtype=dtype)

        # positive weights: one per sample (its positive pair)
        label_column = labels.unsqueeze(1)
        pos_sims = detached.gather(1, label_column).squeeze(1)
        pos_outlier_threshold = outlier_threshold[labels]
        outliers = pos_sims < pos_outlier_threshold if self._filter_on else None
        pos_weights = None
        if penalty is not None:
            in_band = (pos_sims >= pos_outlier_threshold) & (pos_sims <= cw["learned"][labels])
            pos_weights = cw[penalty][labels] + in_band.to(dtype)

        neg_weights = None
        if self.negative_weighting != "none":
            neg_weights = torch.where(
                detached < outlier_threshold, cw["inverse_effective_number"], 1.0
            )

        pos_term, neg_term = proxy_math.proxy_anchor_terms(
            sims,
            pos_mask,
            self.alpha,
            self.margin,
            pos_scale=None if pos_weights is None else pos_weights.unsqueeze(1),
            neg_scale=neg_weights,
            miner_weights=miner_weights,
        )

        # eq. 13 divisors: sum over C+ of the mean w+, sum over classes with negatives of mean w-
        neg_counts = B - counts
        if pos_weights is None:
            pos_divisor = (counts > 0).sum()
        else:
            per_class = torch.zeros_like(counts).index_add_(0, labels, pos_weights)
            pos_divisor = (per_class / counts.clamp(min=1)).sum()
        if neg_weights is None:
            neg_divisor = (neg_counts > 0).sum()
            neg_weight_sum = None
        else:
            at_pos = neg_weights.gather(1, label_column).squeeze(1)
            neg_weight_sum = neg_weights.sum(0) - torch.zeros_like(counts).index_add_(
                0, labels, at_pos
            )
            neg_divisor = (neg_weight_sum / neg_counts.clamp(min=1)).sum()

        if self.collect_stats:
            self._batch_stats(B, C, outliers, pos_weights, neg_weight_sum)

        if self.training:
            self.stage_state(
                {
                    "entries": x.detach(),
                    "labels": labels,
                    "outliers": outliers,
                    "proxies": p.detach(),
                }
            )

        loss_dict = self.proxy_anchor_loss_dict(pos_term, neg_term, pos_divisor, neg_divisor)
        self.add_weight_regularization_to_loss_dict(loss_dict, self.proxies)
        return loss_dict

    def _sub_loss_names(self):
        return ["pos_loss", "neg_loss"]

    # ----------------------------------------------------------------- state update
    @torch.no_grad()
    def _commit(self, entries, labels, outliers, proxies) -> None:
        """Apply the step's state update (called once the whole forward succeeded).

        Everything that can fail is done first, out of place: the new counters, the new memory
        rows, the new per-class memory counts (which also checks every class index used below)
        and the change of the per-class sums. Only then are the buffers written, so a commit that
        raises changes nothing."""
        keep = None if outliers is None else ~outliers
        kept = torch.ones_like(labels) if keep is None else keep.long()
        sample_counts = self.sample_counts.index_add(0, labels, kept)
        beta = (self.volume_bound - 1.0) / self.volume_bound
        # E = (1 - beta^n) / (1 - beta) = (beta^n - 1) / (beta - 1), in float64
        effective_numbers = torch.float_power(beta, sample_counts).sub_(1.0).div_(beta - 1.0)
        push = self.memory.stage(entries, labels, keep) if self._memory_on else None
        # ---- writes only from here on
        self.sample_counts.copy_(sample_counts)
        self.effective_numbers.copy_(effective_numbers)
        if push is not None:
            self.memory.write(push)
            self._update_learned_similarities(labels, proxies)

    def _update_learned_similarities(self, labels, proxies) -> None:
        """``s_c = h * mean_{memory entries of c} cos(entry, p_c)`` for the batch's classes."""
        memory = self.memory
        scale = self.hardness_scale * 2.0**-memory.fixed_point_bits
        current = self.learned_similarities
        if self.num_classes <= labels.shape[0]:
            # fewer classes than samples: compute every class, update those of the batch
            counts, sums = memory.class_counts, memory.class_sums
            converted = memory.scratch("converted", sums.shape, proxies.dtype, sums.device)
            dots = converted.copy_(sums).mul_(proxies).sum(1)
            estimate = dots.mul_(scale).div_(counts.clamp(min=1)).to(current.dtype)
            update = torch.zeros_like(counts, dtype=torch.bool).index_fill_(0, labels, True)
            torch.where(update.logical_and_(counts > 0), estimate, current, out=current)
            return
        counts = memory.class_counts.index_select(0, labels)
        sums = memory.class_sums.index_select(0, labels).to(proxies.dtype)
        dots = (sums * proxies.index_select(0, labels)).sum(1)
        estimate = dots.mul_(scale).div_(counts.clamp(min=1)).to(current.dtype)
        updated = torch.where(counts > 0, estimate, current.index_select(0, labels))
        current.index_put_((labels,), updated)

    # ----------------------------------------------------------------- helpers
    def _rank_order(self, batch_size: int, device: torch.device):
        """Rank-order permutation of a batch gathered by PML's ``DistributedLossWrapper``."""
        if self.distributed_batch_layout != "pml":
            return None
        return distributed.gathered_batch_rank_order(batch_size, device)

    def _state_stats(self) -> None:
        self.mean_effective_number = self.effective_numbers.double().mean().item()
        self.mean_learned_similarity = self.learned_similarities.double().mean().item()
        self.memory_fill = self.memory.count.item() / self.memory_size

    def _batch_stats(self, B, C, outliers, pos_weights, neg_weight_sum) -> None:
        self.outlier_fraction = 0.0 if outliers is None else outliers.double().mean().item()
        self.mean_positive_weight = 1.0 if pos_weights is None else pos_weights.mean().item()
        if neg_weight_sum is None or C == 1:
            self.mean_negative_weight = 1.0
        else:
            self.mean_negative_weight = (neg_weight_sum.sum() / (B * (C - 1))).item()
