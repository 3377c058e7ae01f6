"""The adapted model: a module run with a task's adapted weights in place of its parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["AdaptedModel"]


class AdaptedModel:
    """A callable model: ``fmodel(x)`` runs ``module`` with ``weights`` in place of its parameters.

    What :meth:`MetaLightningModule.adapt <metaloop.lightning.MetaLightningModule.adapt>` returns
    and what the inner-loss hooks receive; ``weights`` maps parameter names to tensors (see
    :func:`torch.func.functional_call`; parameters not named keep the module's own).
    """

    def __init__(self, module: nn.Module, weights: Mapping[str, Tensor]) -> None:
        self.module = module
        self.weights = dict(weights)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Returns ``module(*args, **kwargs)`` computed with the adapted weights."""
        return functional_call(self.module, self.weights, args, kwargs)
