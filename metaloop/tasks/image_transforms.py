"""Image transforms in plain torch (torchvision cannot sit beside a CPU Lightning here): the few that few-shot benchmarks use.

Each is a callable on one image. :class:`ToTensor` takes a PIL image or an ``(H, W, C)`` uint8
array and returns a float ``(C, H, W)`` tensor in [0, 1]; the others take and return such tensors
(:func:`rotate` also takes PIL images). They match torchvision's transforms of the same names in
the cases these benchmarks use, and any callable (a torchvision transform, where installed) can
stand in for them. Random transforms draw from torch's global generator, as torchvision's do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["Compose", "ToTensor", "Normalize", "RandomCrop", "RandomHorizontalFlip", "ColorJitter", "rotate"]


class Compose:
    """Returns ``transforms[-1](...transforms[0](x))``."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for transform in self.transforms:
            x = transform(x)
        return x


class ToTensor:
    """Returns a PIL image or ``(H, W[, C])`` uint8 array as a float32 ``(C, H, W)`` tensor in [0, 1]; tensors pass through unchanged."""

    def __call__(self, image: Image.Image | np.ndarray | Tensor) -> Tensor:
        if isinstance(image, Tensor):
            return image
        array = np.array(image, dtype=np.uint8, copy=True)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


class Normalize:
    """Returns ``(x - mean) / std`` per channel of a ``(C, H, W)`` tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if any(s <= 0 for s in std):
            raise ValueError(f"std={list(std)} must be positive")
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)


class RandomCrop:
    """Returns a random ``size`` x ``size`` crop of a ``(C, H, W)`` tensor zero-padded by ``padding`` on every side."""

    def __init__(self, size: int, padding: int = 0) -> None:
        if size < 1 or padding < 0:
            raise ValueError(f"size={size} must be positive and padding={padding} non-negative")
        self.size, self.padding = size, padding

    def __call__(self, x: Tensor) -> Tensor:
        x = F.pad(x, (self.padding,) * 4)
        h, w = x.shape[-2:]
        if h < self.size or w < self.size:
            raise ValueError(f"RandomCrop size={self.size} exceeds the padded image of {h}x{w}; lower size or pad more")
        top = int(torch.randint(0, h - self.size + 1, ()))
        left = int(torch.randint(0, w - self.size + 1, ()))
        return x[..., top : top + self.size, left : left + self.size]


class RandomHorizontalFlip:
    """Returns a ``(C, H, W)`` tensor mirrored left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: Tensor) -> Tensor:
        return x.flip(-1) if float(torch.rand(())) < self.p else x


def _gray(x: Tensor) -> Tensor:
    """Returns the ITU-R 601 luma of an RGB ``(3, H, W)`` tensor, as ``(1, H, W)``."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


class ColorJitter:
    """Returns an RGB ``(3, H, W)`` tensor in [0, 1] with brightness, contrast and saturation scaled by factors drawn from ``[1 - v, 1 + v]``.

    As torchvision: brightness scales the image, contrast blends with the mean luma, saturation
    with the per-pixel luma; the three are applied in a random order, clamped to [0, 1].
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0) -> None:
        if min(brightness, contrast, saturation) < 0:
            raise ValueError(f"brightness={brightness}, contrast={contrast}, saturation={saturation} must be non-negative")
        self.ranges = {"brightness": brightness, "contrast": contrast, "saturation": saturation}

    def __call__(self, x: Tensor) -> Tensor:
        for i in torch.randperm(3).tolist():
            name = ("brightness", "contrast", "saturation")[i]
            v = self.ranges[name]
            if v == 0:
                continue
            factor = float(torch.empty(()).uniform_(max(0.0, 1 - v), 1 + v))
            other = torch.zeros_like(x) if name == "brightness" else _gray(x).mean() if name == "contrast" else _gray(x)
            x = (factor * x + (1 - factor) * other).clamp(0, 1)
        return x


def rotate(image: Tensor | Image.Image, degrees: float) -> Tensor | Image.Image:
    """Returns ``image`` rotated ``degrees`` counter-clockwise about its centre, same size, corners filled with 0.

    Multiples of 90 on square tensors are exact (``torch.rot90``); other angles on tensors use
    nearest-neighbour sampling, as torchvision's ``RandomRotation`` does. PIL images use PIL's rotate.
    """
    if isinstance(image, Image.Image):
        return image.rotate(degrees)
    if degrees % 90 == 0 and image.shape[-1] == image.shape[-2]:
        return torch.rot90(image, int(degrees // 90) % 4, (-2, -1))
    theta = math.radians(degrees)
    # affine_grid maps output to input coordinates: a counter-clockwise turn of the image is a clockwise turn of the grid
    matrix = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]], dtype=image.dtype)
    h, w = image.shape[-2:]
    aspect = torch.tensor([[1.0, w / h, 1.0], [h / w, 1.0, 1.0]], dtype=image.dtype)
    batch = image.reshape(-1, *image.shape[-3:]) if image.dim() >= 3 else image[None, None]
    grid = F.affine_grid((matrix * aspect)[None].expand(len(batch), 2, 3), list(batch.shape), align_corners=False)
    out = F.grid_sample(batch.float(), grid.float(), mode="nearest", padding_mode="zeros", align_corners=False)
    return out.to(image.dtype).reshape(image.shape)
