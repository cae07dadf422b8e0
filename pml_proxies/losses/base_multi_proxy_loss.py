"""Shared constructor and similarity pooling of the MPA family."""

from __future__ import annotations

import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..functional import proxy_math
from ..functional.validation import check_choice, check_int, check_real
from ..regularizers import IntraClassCenterRegularizer
from .base_proxy_loss import BaseProxyLoss

DEFAULT = "default"


class BaseMultiProxyLoss(BaseProxyLoss):
    """Base of the MPA family: ``K`` learnable centers per class and pooled class similarities.

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding dimension ``D``.
        centers_per_class: ``K``, centers per class (paper: 10; 2 for SOP).
        alpha: scale ``alpha`` (paper silent; 32 as in Proxy-Anchor), finite and > 0.
        margin: margin ``delta`` (0.1), finite.
        gamma: softmax pooling temperature ``gamma`` of eq. 1 (0.1), finite and > 0.
        pooling: ``"softmax"`` (eq. 1), ``"max"`` or ``"mean"`` pooling of the K similarities.
        weight_regularizer: PML regulariser on the centers; by default the paper's center
            regulariser (eq. 3) :class:`~pml_proxies.regularizers.IntraClassCenterRegularizer`;
            ``None`` turns it off.
        weight_reg_weight: its weight ``tau`` (0.2), finite and >= 0 (checked by
            :class:`BaseProxyLoss`).
        **kwargs: PML keyword arguments (``reducer``, ``weight_init_func``, ``collect_stats``, ...).

    Attributes:
        proxies: the centers, a Parameter of shape ``(C * K, D)``, class-major (rows
            ``c*K .. c*K + K - 1`` belong to class ``c``), initialised as PML's ``ProxyAnchorLoss``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        alpha: float = 32.0,
        margin: float = 0.1,
        gamma: float = 0.1,
        pooling: str = "softmax",
        weight_regularizer=DEFAULT,
        weight_reg_weight: float = 0.2,
        **kwargs,
    ) -> None:
        centers_per_class = check_int("centers_per_class", centers_per_class, low=1)
        alpha = check_real("alpha", alpha, low=0, low_inclusive=False)
        margin = check_real("margin", margin)
        gamma = check_real("gamma", gamma, low=0, low_inclusive=False)
        pooling = check_choice("pooling", pooling, proxy_math.POOLINGS)
        if isinstance(weight_regularizer, str) and weight_regularizer == DEFAULT:
            weight_regularizer = IntraClassCenterRegularizer(centers_per_class)
        super().__init__(
            num_classes,
            embedding_size,
            weight_regularizer=weight_regularizer,
            weight_reg_weight=weight_reg_weight,
            **kwargs,
        )
        self.centers_per_class = centers_per_class
        self.alpha = alpha
        self.margin = margin
        self.gamma = gamma
        self.pooling = pooling
        self.proxies = torch.nn.Parameter(
            torch.empty(self.num_classes * self.centers_per_class, self.embedding_size)
        )
        self.weight_init_func(self.proxies)
        self.add_to_recordable_attributes(
            list_of_names=["centers_per_class", "alpha", "margin", "gamma"], is_stat=False
        )

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` pooled class similarities ``S(x, c)`` (eq. 1)."""
        dtype = proxy_math.compute_dtype(embeddings.dtype)
        centers = self.parameter_in(self.proxies, dtype)
        sims = proxy_math.cosine_similarity_to_many(embeddings.to(dtype), centers)
        return proxy_math.pool_similarities(sims, self.centers_per_class, self.pooling, self.gamma)

    def miner_weights(self, indices_tuple, labels: torch.Tensor, dtype: torch.dtype):
        """PML miner weights per sample (as ``ProxyAnchorLoss``), or ``None`` without a miner."""
        if indices_tuple is None:
            return None
        return lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)

    def element_loss_dict(self, losses: torch.Tensor, miner_weights) -> dict:
        """Loss dict of per-sample losses averaged over the batch (MPA-DW, MPA-AP)."""
        if miner_weights is not None:
            losses = losses * miner_weights
        loss_dict = {
            "loss": {
                "losses": losses,
                "indices": torch.arange(losses.shape[0], device=losses.device),
                "reduction_type": "element",
                "divisor": losses.shape[0],
            }
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.proxies)
        return loss_dict
