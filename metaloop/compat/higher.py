"""higher's private names that code written for higher imports from ``higher.optim`` (``_add``, ``_GradCallbackType``, ...).

``import metaloop as higher`` makes :mod:`metaloop.optim` ``higher.optim``; that module holds metaloop's own
names only and resolves the names listed in :data:`OPTIM_NAMES` from here when they are asked for, so
``higher.optim._add`` and ``from higher.optim import _maybe_mask`` work as with higher.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from metaloop.optim.differentiable import GradCallback, GroupedGrads

__all__ = ["OPTIM_NAMES"]

_GradCallbackType = GradCallback
_GroupedGradsType = GroupedGrads
_GradClosureType = Callable[[Tensor], Tensor]
_OverrideType = dict[str, list[Any]]


def _add(tensor: Tensor, a1: float | int | Tensor, a2: Tensor | None = None) -> Tensor:
    """Returns ``tensor + a1`` or, given ``a2``, ``tensor + a1 * a2``, out of place (higher's helper)."""
    return tensor + a1 if a2 is None else tensor + a1 * a2


def _addcdiv(tensor: Tensor, a1: float | int | Tensor, a2: Tensor, a3: Tensor | None = None) -> Tensor:
    """Returns ``tensor + a1 / a2`` or, given ``a3``, ``tensor + a1 * (a2 / a3)``, out of place (higher's helper)."""
    return tensor + a1 / a2 if a3 is None else tensor + a1 * (a2 / a3)


def _addcmul(tensor: Tensor, a1: float | int | Tensor, a2: Tensor, a3: Tensor | None = None) -> Tensor:
    """Returns ``tensor + a1 * a2`` or, given ``a3``, ``tensor + a1 * a2 * a3``, out of place (higher's helper)."""
    return tensor + a1 * a2 if a3 is None else tensor + a1 * a2 * a3


def _get_mask_closure(mask: Tensor) -> _GradClosureType:
    """Returns a gradient hook that zeroes the gradient where ``mask`` is True (higher's helper)."""

    def closure(grad: Tensor) -> Tensor:
        grad = torch.where(mask, torch.zeros_like(grad), grad)
        if grad.requires_grad:
            grad.register_hook(_get_mask_closure(mask))
        return grad

    return closure


def _maybe_mask(tensor: Tensor, mask: Tensor) -> None:
    """Registers :func:`_get_mask_closure` on ``tensor`` if it requires grad (higher's helper)."""
    if tensor.requires_grad:
        tensor.register_hook(_get_mask_closure(mask))


# what higher.optim holds beyond metaloop.optim's own names
OPTIM_NAMES = frozenset({
    "_add", "_addcdiv", "_addcmul", "_get_mask_closure", "_maybe_mask",
    "_GradCallbackType", "_GradClosureType", "_GroupedGradsType", "_OverrideType",
})
