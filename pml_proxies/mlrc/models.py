"""Small models for powerful-benchmarker runs without a pretrained network (smoke tests, CI)."""

from __future__ import annotations

import torch


class TinyConvTrunk(torch.nn.Module):
    """A two-layer convolutional trunk for smoke runs on the CPU (not for benchmarking).

    powerful-benchmarker replaces the trunk's ``fc`` layer by an identity and reads its
    ``in_features`` as the embedder's input size, and the transform factory reads ``mean`` and
    ``std`` for normalisation, so the trunk exposes all three like a torchvision model.

    Args:
        channels: output channels of the convolutions; the trunk's feature size.
        num_classes: output size of the (discarded) ``fc`` layer.
    """

    def __init__(self, channels: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, channels, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(channels),
            torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            torch.nn.ReLU(inplace=True),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.fc = torch.nn.Linear(channels, num_classes)
        self.mean = [0.485, 0.456, 0.406]
        self.std = [0.229, 0.224, 0.225]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
