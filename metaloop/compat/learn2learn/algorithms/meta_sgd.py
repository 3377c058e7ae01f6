"""learn2learn's ``MetaSGD`` and ``meta_sgd_update``: MAML with a learned learning rate per parameter element."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from metaloop.compat.learn2learn.algorithms.base_learner import BaseLearner, adaptation_gradients
from metaloop.compat.learn2learn.utils.module_updates import clone_module, update_module

__all__ = ["MetaSGD", "meta_sgd_update"]


def meta_sgd_update(
    model: nn.Module,
    lrs: Sequence[Tensor] | None = None,
    grads: Sequence[Tensor | None] | None = None,
) -> nn.Module:
    """Returns ``model`` with each parameter ``p`` replaced, in place and on the graph, by ``p - lr_p * g_p`` (elementwise).

    ``lrs`` has one learning-rate tensor per entry of ``model.parameters()`` (broadcastable to
    it); ``grads`` defaults to each parameter's ``.grad`` (None entries are skipped).

    Raises:
        ValueError: if ``lrs`` is missing, or ``lrs`` or ``grads`` does not have one entry per parameter.
    """
    params = list(model.parameters())
    if lrs is None:
        raise ValueError("meta_sgd_update needs lrs, one learning-rate tensor per parameter (MetaSGD.lrs)")
    lrs = list(lrs)
    if len(lrs) != len(params):
        raise ValueError(
            f"meta_sgd_update got {len(lrs)} learning rates for {len(params)} parameters; give one per parameter"
        )
    if grads is None:
        grads = [p.grad for p in params]
    return update_module(model, [None if g is None else -lr * g for lr, g in zip(lrs, grads)])


class MetaSGD(BaseLearner):
    """Meta-SGD (Li et al. 2017): MAML whose inner step ``p - lr_p * g`` uses learned, elementwise ``lr_p``.

    ``lrs`` (one tensor per parameter, default ``lr`` everywhere) are ``nn.Parameter``s of this
    module, so ``parameters()`` holds the model's and the learning rates (twice as many
    elements) and the outer optimizer trains both.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        first_order: bool = False,
        lrs: Sequence[Tensor] | None = None,
    ) -> None:
        super().__init__(model)
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in model.parameters()])
        self.lrs = lrs
        self.first_order = first_order

    def clone(self) -> MetaSGD:
        """Returns a ``MetaSGD`` around a differentiable copy of the module and of the learning rates."""
        return MetaSGD(clone_module(self.module), lrs=[lr.clone() for lr in self.lrs], first_order=self.first_order)

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> None:
        """Takes one step ``p <- p - lr_p * dloss/dp`` on the wrapped module, in place (returns None)."""
        first_order = self.first_order if first_order is None else first_order
        grads = adaptation_gradients(loss, self.module.parameters(), create_graph=not first_order)
        self.module = meta_sgd_update(self.module, self.lrs, grads)
