"""Small modules and helpers that meta-learning models are built from: ``Lambda``, ``Flatten``, ``Scale``, ``freeze``, ``unfreeze``."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Lambda", "Flatten", "Scale", "freeze", "unfreeze"]


class Lambda(nn.Module):
    """A module whose forward is ``lmb(*args, **kwargs)``, to put a function in an ``nn.Sequential``."""

    def __init__(self, lmb: Callable[..., Any]) -> None:
        super().__init__()
        if not callable(lmb):
            raise TypeError(f"Lambda wraps a callable, got {type(lmb).__name__}")
        self.lmb = lmb

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.lmb(*args, **kwargs)


class Flatten(nn.Module):
    """Returns its input reshaped to ``(batch_size, -1)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.size(0), -1)


class Scale(nn.Module):
    """Multiplies its input by a learnable tensor ``alpha`` of shape ``shape``, initialised to ``alpha`` everywhere.

    ``shape`` is an int, a sequence of ints or None (a single scalar, ``(1,)``). As a
    gradient transform (``GBML(model, transform=lambda p: Scale(p.shape, lr))``) it gives
    Meta-SGD's per-element learning rates.
    """

    def __init__(self, shape: int | Sequence[int] | torch.Size | None = None, alpha: float = 1.0) -> None:
        super().__init__()
        if shape is None:
            shape = (1,)
        elif isinstance(shape, int):
            shape = (shape,)
        shape = tuple(shape)
        if not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"Scale shape={shape} must hold positive ints, e.g. (3, 2) or 4")
        self.alpha = nn.Parameter(torch.full(shape, float(alpha)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.alpha


def freeze(module: nn.Module) -> nn.Module:
    """Returns ``module`` after detaching each of its parameters and setting ``requires_grad=False``, in place."""
    for p in module.parameters():
        p.detach_()
        p.requires_grad_(False)
    return module


def unfreeze(module: nn.Module) -> nn.Module:
    """Returns ``module`` after setting ``requires_grad=True`` on each of its parameters, in place."""
    for p in module.parameters():
        p.requires_grad_(True)
    return module
