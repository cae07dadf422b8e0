"""Losses of pml-proxies, PML ``BaseMetricLossFunction`` subclasses."""

from .all_pairs_multi_proxy_anchor_loss import AllPairsMultiProxyAnchorLoss
from .base_multi_proxy_loss import BaseMultiProxyLoss
from .base_proxy_loss import BaseProxyLoss
from .data_wise_multi_proxy_anchor_loss import DataWiseMultiProxyAnchorLoss
from .multi_proxy_anchor_loss import MultiProxyAnchorLoss
from .proxy_isa_loss import ProxyISALoss
from .vcpa_loss import VCPALoss

__all__ = [
    "AllPairsMultiProxyAnchorLoss",
    "BaseMultiProxyLoss",
    "BaseProxyLoss",
    "DataWiseMultiProxyAnchorLoss",
    "MultiProxyAnchorLoss",
    "ProxyISALoss",
    "VCPALoss",
]
