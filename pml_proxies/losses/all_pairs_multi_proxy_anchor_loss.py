"""All-pairs Multi Proxy Anchor (MPA-AP) loss."""

from __future__ import annotations

import torch

from ..functional import proxy_math
from .base_multi_proxy_loss import BaseMultiProxyLoss


class AllPairsMultiProxyAnchorLoss(BaseMultiProxyLoss):
    """All-pairs Multi Proxy Anchor loss, MPA-AP (Saeki et al., eq. 15-17).

    Positive and negative similarities share one log-sum-exp per sample::

        S'(x, c) = delta - S(x, c)  if c = y,  else  S(x, c) + delta
        L = 1/B sum_i log(1 + sum_{c=1..C} exp(alpha S'(x_i, c))) + tau R

    PML miners' ``indices_tuple`` weight the per-sample losses (as PML's ``SoftTripleLoss``).

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding dimension ``D``.
        centers_per_class: ``K`` (10).
        alpha: scale (32).
        margin: ``delta`` (0.1).
        gamma: softmax pooling temperature (0.1).
        pooling: ``"softmax"``, ``"max"`` or ``"mean"``.
        weight_regularizer: center regulariser (default: eq. 3; ``None`` disables it).
        weight_reg_weight: ``tau`` (0.2).
        **kwargs: PML keyword arguments.
    """

    def compute_proxy_loss(self, embeddings, labels, indices_tuple):
        sims = self.get_logits(embeddings)
        pos_mask, _ = proxy_math.class_masks(labels, self.num_classes)
        shifted = torch.where(pos_mask, self.margin - sims, sims + self.margin)
        everything = torch.ones_like(pos_mask)
        losses = proxy_math.log1p_sum_exp(self.alpha * shifted, everything, dim=1)
        return self.element_loss_dict(losses, self.miner_weights(indices_tuple, labels, sims.dtype))
