"""Metric names and settings shared by the calculator's tests (streamed and positive-rank)."""

import torch

from pml_proxies.utils.accuracy_calculator import AccuracyCalculator
from pml_proxies.utils.knn import TorchKNN

CPU = torch.device("cpu")
PML_KNN_METRICS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
)
OURS = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "ndcg_at_3", "ndcg_at_10")
TINY_MB = 0.01  # 10 KiB: a few queries per chunk


def calc(**kwargs) -> AccuracyCalculator:
    """The calculator under test: CPU, the pure-torch kNN, nDCG@3 and @10 (``kwargs`` override)."""
    kwargs.setdefault("device", CPU)
    kwargs.setdefault("knn_func", TorchKNN())
    kwargs.setdefault("ndcg_ks", (3, 10))
    return AccuracyCalculator(**kwargs)
