"""Image transforms in pure PIL / numpy / torch (torchvision stays optional).

Every random choice draws from torch's global RNG (``torch.rand``, ``torch.empty().uniform_``),
so a pipeline is reproducible under ``torch.manual_seed`` and, inside a ``DataLoader``, under
torch's per-worker seeding. Geometric transforms accept a PIL image or a float tensor (C, H, W)
(uint8 arrays become PIL images, float arrays become tensors).

:meth:`Compose.batch` applies a pipeline to a batch of equally sized images at once (a uint8 or
float tensor ``(B, C, H, W)``): each image draws its random parameters as ``Compose.__call__``
would, in the same order, and the resampling is one batched matrix product per axis
(antialiased bilinear, the filter of PIL's ``BILINEAR`` and of
``F.interpolate(..., antialias=True)``, computed in float32 without PIL's rounding to uint8).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Image.Image | np.ndarray | torch.Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CenterCrop",
    "Compose",
    "ConvertChannels",
    "Invert",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "ToTensor",
]


def _as_image(img: ImageLike) -> Image.Image | torch.Tensor:
    """PIL images and tensors pass through; uint8 arrays -> PIL, other arrays -> float tensor."""
    if isinstance(img, (Image.Image, torch.Tensor)):
        return img
    if isinstance(img, np.ndarray):
        if img.dtype == np.uint8:
            return Image.fromarray(img)
        return ToTensor()(img)
    raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(img).__name__}")


def _size(img: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(height, width)."""
    if isinstance(img, Image.Image):
        return img.height, img.width
    return int(img.shape[-2]), int(img.shape[-1])


def _crop(img, top: int, left: int, height: int, width: int):
    if isinstance(img, Image.Image):
        return img.crop((left, top, left + width, top + height))
    return img[..., top : top + height, left : left + width]


def _resize(img, height: int, width: int):
    if _size(img) == (height, width):
        return img
    if isinstance(img, Image.Image):
        return img.resize((width, height), Image.Resampling.BILINEAR)
    squeeze = img.dim() == 2
    x = img[None, None] if squeeze else img[None]
    x = F.interpolate(x.float(), size=(height, width), mode="bilinear", antialias=True)
    return x[0, 0] if squeeze else x[0]


def _axis_weights(start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int):
    """``(B, size_out, size_in)`` weights resampling the pixels ``[start, start + length)`` of an
    axis of ``size_in`` pixels to ``size_out`` pixels: PIL's antialiased bilinear filter (a
    triangle of half-width ``max(1, length / size_out)`` input pixels around each output pixel's
    centre, taps outside the span dropped, rows normalised to sum 1)."""
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    scale = length / size_out
    support = scale.clamp(min=1.0)
    centre = (torch.arange(size_out, dtype=torch.float32)[:, None] + 0.5) * scale + start
    pos = torch.arange(size_in, dtype=torch.float32) + 0.5  # pixel centres, (size_in,)
    w = (pos - centre).abs_().div_(support).neg_().add_(1.0).clamp_(min=0.0)
    w.mul_((pos > start) & (pos < start + length))
    return w.div_(w.sum(-1, keepdim=True))


def resample(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop ``boxes`` (``(B, 4)`` integer ``top, left, height, width``, or ``(1, 4)``: the same
    box for every image) out of the float images ``x`` ``(B, C, H, W)`` and resize each crop to
    ``size`` (height, width) with antialiased bilinear interpolation: two batched matrix
    products, ``Wy @ x @ Wx^T``."""
    boxes = torch.as_tensor(boxes, dtype=torch.int64).reshape(-1, 4)
    wy = _axis_weights(boxes[:, 0], boxes[:, 2], x.shape[-2], size[0])
    wx = _axis_weights(boxes[:, 1], boxes[:, 3], x.shape[-1], size[1])
    return torch.matmul(torch.matmul(wy[:, None], x), wx[:, None].transpose(-1, -2))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def supports_batch(self) -> bool:
        """Whether every transform has a batched form (:meth:`batch` works)."""
        return all(hasattr(t, "batch") and hasattr(t, "out_size") for t in self.transforms)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """The pipeline applied to equally sized images ``(B, C, H, W)`` or ``(B, H, W)`` (uint8
        in 0..255 or float in [0, 1]) at once: a float tensor ``(B, C', H', W')``.

        Image ``b`` draws its random parameters as ``self(image_b)`` would, images in order (the
        same draws from torch's global RNG as a loop over the images); only the resampling
        arithmetic differs from the PIL path (float32, not rounded to uint8).
        """
        if not self.supports_batch():
            raise TypeError(f"{self!r} has a transform without a batched form")
        x = images[:, None] if images.dim() == 3 else images
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        draws: list[list] = [[] for _ in self.transforms]
        steps: list[Any] = self.transforms  # each has out_size and batch (checked above)
        for _ in range(x.shape[0]):
            size = (int(x.shape[-2]), int(x.shape[-1]))
            for j, t in enumerate(steps):
                if hasattr(t, "draw"):
                    draws[j].append(t.draw(*size))
                size = t.out_size(*size)
        for j, t in enumerate(steps):
            x = t.batch(x, draws[j])
        return x

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"{type(self).__name__}([{inner}\n])"


class ConvertChannels:
    """Convert to ``channels`` (1 or 3) channels: PIL ``convert('L'/'RGB')``; for tensors,
    grey -> RGB repeats the channel and RGB -> grey uses PIL's ITU-R 601-2 luma weights."""

    def __init__(self, channels: int):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def __call__(self, img):
        img = _as_image(img)
        if isinstance(img, Image.Image):
            mode = "L" if self.channels == 1 else "RGB"
            return img if img.mode == mode else img.convert(mode)
        return self._convert(img[None] if img.dim() == 2 else img, 0)

    def _convert(self, img: torch.Tensor, dim: int) -> torch.Tensor:
        c = img.shape[dim]
        if c == self.channels:
            return img
        if c == 1:
            return img.repeat_interleave(3, dim)
        if c in (3, 4):
            w = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype, device=img.device)
            return (img.narrow(dim, 0, 3) * w[:, None, None]).sum(dim, keepdim=True)
        raise ValueError(f"cannot convert a {c}-channel tensor to {self.channels} channels")

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def batch(self, x: torch.Tensor, draws: list) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, channels, H, W)``."""
        return self._convert(x, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


class Resize:
    """Resize. An int ``size`` sets the shorter side (aspect ratio kept, as torchvision);
    ``(height, width)`` sets both. Bilinear with antialiasing."""

    def __init__(self, size: int | Sequence[int]):
        self.size = size if isinstance(size, int) else _pair(size)

    def __call__(self, img):
        img = _as_image(img)
        return _resize(img, *self.out_size(*_size(img)))

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        h, w = height, width
        if not isinstance(self.size, int):
            return self.size
        if h <= w:
            return self.size, max(1, int(self.size * w / h))
        return max(1, int(self.size * h / w)), self.size

    def batch(self, x: torch.Tensor, draws: list) -> torch.Tensor:
        h, w = _size(x)
        size = self.out_size(h, w)
        if size == (h, w):
            return x
        return resample(x, torch.tensor([[0, 0, h, w]]), size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class CenterCrop:
    """Crop the centre ``size`` (int or (height, width)); pads with zeros if the image is smaller."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size)

    def __call__(self, img):
        img = _as_image(img)
        th, tw = self.size
        h, w = _size(img)
        if isinstance(img, torch.Tensor) and (h < th or w < tw):
            ph, pw = max(0, th - h), max(0, tw - w)
            img = F.pad(img, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = _size(img)
        # PIL.crop pads outside the image with zeros by itself
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        return _crop(img, top, left, th, tw)

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return self.size

    def batch(self, x: torch.Tensor, draws: list) -> torch.Tensor:
        return self(x)  # slicing (and padding) of the last two dimensions

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with a random aspect ratio in ``ratio``
    (log-uniform), resized to ``size``; torchvision's algorithm (10 tries, then a centre crop
    clamped to ``ratio``). Defaults as torchvision / the Proxy-Anchor code: scale (0.08, 1),
    ratio (3/4, 4/3)."""

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ):
        self.size = _pair(size)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop, drawn from torch's global RNG."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        img = _as_image(img)
        top, left, h, w = self.get_params(*_size(img))
        return _resize(_crop(img, top, left, h, w), *self.size)

    draw = get_params

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return self.size

    def batch(self, x: torch.Tensor, draws: list) -> torch.Tensor:
        """Image ``b`` cropped to ``draws[b]`` (``get_params``) and resized to ``size``."""
        return resample(x, torch.tensor(draws, dtype=torch.int64), self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (torch's global RNG)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img):
        img = _as_image(img)
        if self.draw(*_size(img)):
            if isinstance(img, Image.Image):
                return img.transpose(Image.FLIP_LEFT_RIGHT)
            return img.flip(-1)
        return img

    def draw(self, height: int, width: int) -> bool:
        """Whether to mirror (one draw of torch's global RNG)."""
        return torch.rand(1).item() < self.p

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def batch(self, x: torch.Tensor, draws: list) -> torch.Tensor:
        flip = torch.tensor(draws, dtype=torch.bool)[:, None, None, None]
        return torch.where(flip, x.flip(-1), x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class ToTensor:
    """PIL image or array -> float32 tensor (C, H, W). uint8 / PIL values are divided by 255;
    float arrays are kept as they are (expected in [0, 1]); (H, W) gets one channel."""

    def __call__(self, img) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            x = img if img.is_floating_point() else img.float() / 255.0
            return x[None] if x.dim() == 2 else x
        if isinstance(img, Image.Image):
            if img.mode not in ("L", "RGB", "RGBA", "F"):
                img = img.convert("RGB" if len(img.getbands()) >= 3 else "L")
            img = np.asarray(img)
        if not isinstance(img, np.ndarray):
            raise TypeError(
                f"expected a PIL image, numpy array or tensor, got {type(img).__name__}"
            )
        # always a fresh, writable float32 array (inputs may be read-only views)
        if img.dtype == np.uint8:
            x = torch.from_numpy(img.astype(np.float32)).div_(255.0)
        else:
            x = torch.from_numpy(np.array(img, dtype=np.float32, copy=True))
        if x.dim() == 2:
            return x[None]
        if x.dim() == 3:
            return x.permute(2, 0, 1).contiguous()
        raise ValueError(f"expected a 2-D or 3-D array, got shape {tuple(img.shape)}")

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def batch(self, x: torch.Tensor, draws: list) -> torch.Tensor:
        return x  # Compose.batch works on floats in [0, 1] from the start

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Invert:
    """x -> 1 - x on a float tensor in [0, 1] (black strokes on white -> white on black)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 - x

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def batch(self, x: torch.Tensor, draws: list) -> torch.Tensor:
        return self(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """(x - mean) / std per channel on a float tensor (C, H, W)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.mean.shape[0]:
            raise ValueError(
                f"Normalize has {self.mean.shape[0]} channels, the image has {x.shape[0]}"
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def batch(self, x: torch.Tensor, draws: list) -> torch.Tensor:
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"Normalize has {self.mean.shape[0]} channels, the images have {x.shape[1]}"
            )
        return (x - self.mean.to(x.dtype)[None]) / self.std.to(x.dtype)[None]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
