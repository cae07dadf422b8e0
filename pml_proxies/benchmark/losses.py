"""The losses the benchmark compares: a view of the library's registry
(:mod:`pml_proxies.registry`, which holds each loss's class, its papers' default
hyper-parameters per data set and its search space), plus the proxies of a trained loss for the
plots.

Every entry builds ``(loss, miner)`` from ``(num_classes, embedding_size)``; asking for a loss
that is missing raises a clear ``ValueError``.
"""

from __future__ import annotations

import torch

from ..registry import (
    LOSS_NAMES,
    LOSSES,
    LossSpec,
    build_loss,
    convert_loss_params,
    effective_kwargs,
    loss_kwargs,
    loss_parameters,
)

__all__ = [
    "DATASET_DEFAULTS",
    "LOSSES",
    "LOSS_NAMES",
    "LossSpec",
    "build_loss",
    "convert_loss_params",
    "effective_kwargs",
    "get_proxies",
    "loss_kwargs",
    "loss_parameters",
]

#: Dataset-specific defaults from the papers (applied before user overrides), per loss: a view
#: of :attr:`pml_proxies.registry.LossSpec.dataset_kwargs`.
DATASET_DEFAULTS: dict[str, dict[str, dict]] = {
    name: spec.dataset_kwargs for name, spec in LOSSES.items() if spec.dataset_kwargs
}


def get_proxies(loss: torch.nn.Module, num_classes: int):
    """Learned proxies of ``loss`` for plots: ``(proxies (N, D), proxy_labels (N,), std or None)``
    as numpy arrays, or ``None`` when the loss has no proxies. ``std`` is a per-proxy scalar
    uncertainty (VCPA's ``proxy_uncertainty``, supplement eq. 30, when present)."""
    weight = None
    for attr in ("proxies", "fc", "W"):
        w = getattr(loss, attr, None)
        if isinstance(w, torch.Tensor):
            weight = w.detach()
            break
    if weight is None:
        return None
    if weight.dim() != 2:
        return None
    if attr in ("fc", "W"):  # PML stores these as (D, C*K)
        weight = weight.t()
    if weight.shape[0] % num_classes != 0:
        return None
    per_class = weight.shape[0] // num_classes
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    std = None
    unc = getattr(loss, "proxy_uncertainty", None) or getattr(loss, "uncertainty", None)
    if callable(unc):
        try:
            std = unc().detach().float().cpu().numpy().ravel()
            if std.shape[0] != weight.shape[0]:
                std = None
        except Exception:  # noqa: BLE001 - plots only; a missing uncertainty is not fatal
            std = None
    return weight.float().cpu().numpy(), labels.numpy(), std
