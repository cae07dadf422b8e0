"""Keep a loss's standard deviations at or above their bound after every optimizer step.

A loss whose ``proxy_std`` Parameter is trained by a ``torch.optim`` optimizer (VCPA with
``newton_steps=0``) registers itself with :func:`track_for_projection`; one process-wide
optimizer post-step hook (installed on the first registration) then calls its
``project_std_()`` right after every step of an optimizer holding that Parameter: projected
gradient descent. Losses are held weakly (a deleted loss drops out).
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class ProjectedLoss(Protocol):
    """What :func:`track_for_projection` needs of a loss."""

    proxy_std: torch.Tensor

    def project_std_(self) -> None: ...


_PROJECTED_LOSSES: weakref.WeakSet[Any] = weakref.WeakSet()
_optimizer_hook: Any = None


def _project_std_after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer post-step hook: every live tracked loss (e.g.
    ``VCPALoss(newton_steps=0)``) whose
    ``proxy_std`` this optimizer holds is projected onto ``[sigma_min, inf)`` right away."""
    for loss in list(_PROJECTED_LOSSES):
        std = loss.proxy_std
        if any(p is std for group in optimizer.param_groups for p in group["params"]):
            loss.project_std_()


def track_for_projection(loss: ProjectedLoss) -> None:
    """Project ``loss.proxy_std`` after every step of an optimizer holding it (idempotent)."""
    global _optimizer_hook
    _PROJECTED_LOSSES.add(loss)
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_project_std_after_optimizer_step)
