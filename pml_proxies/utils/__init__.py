from . import accuracy_calculator, knn, proxy_math
from .accuracy_calculator import AccuracyCalculator
from .knn import TorchKNN

__all__ = ["AccuracyCalculator", "TorchKNN", "accuracy_calculator", "knn", "proxy_math"]
