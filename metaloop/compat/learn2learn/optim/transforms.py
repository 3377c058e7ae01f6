"""learn2learn's ``learn2learn.optim.transforms`` (implemented in :mod:`metaloop.transforms.gradient_transforms`)."""

from __future__ import annotations

from metaloop.transforms.gradient_transforms import (
    KroneckerTransform,
    MetaCurvatureTransform,
    ModuleTransform,
    ReshapedTransform,
)

__all__ = ["ModuleTransform", "ReshapedTransform", "KroneckerTransform", "MetaCurvatureTransform"]
