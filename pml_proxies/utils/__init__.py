"""Evaluation utilities: the accuracy calculator (nDCG@k, Recall@k) and the pure-torch kNN."""

from . import accuracy_calculator, knn
from .accuracy_calculator import AccuracyCalculator
from .knn import TorchKNN

__all__ = ["AccuracyCalculator", "TorchKNN", "accuracy_calculator", "knn"]
