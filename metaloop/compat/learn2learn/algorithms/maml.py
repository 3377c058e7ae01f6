"""learn2learn's ``MAML`` and ``maml_update`` on metaloop's differentiable module edits."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from metaloop.compat.learn2learn.algorithms.base_learner import BaseLearner, adaptation_gradients, own_settings
from metaloop.compat.learn2learn.utils.module_updates import clone_module, update_module

__all__ = ["MAML", "maml_update"]


def maml_update(model: nn.Module, lr: float | Tensor, grads: Sequence[Tensor | None] | None = None) -> nn.Module:
    """Returns ``model`` with each parameter ``p`` replaced, in place and on the graph, by ``p - lr * g``.

    ``grads`` holds one gradient per entry of ``model.parameters()`` (None leaves a parameter
    alone); without it, each tensor's ``.update`` attribute is applied as by
    :func:`~metaloop.compat.learn2learn.utils.update_module`. The parameters' tensors are new (nothing is
    modified in place), so a later loss differentiates through the step.

    Raises:
        ValueError: if ``grads`` does not have one entry per parameter.
    """
    if grads is None:
        return update_module(model)
    return update_module(model, [None if g is None else g * -lr for g in grads])


class MAML(BaseLearner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017): ``clone()`` a task learner, ``adapt(loss)`` it by SGD.

    ``learner = maml.clone()`` copies the module with parameters that stay differentiable
    functions of ``maml``'s; ``learner.adapt(loss)`` replaces them by ``p - lr * dloss/dp``,
    keeping the graph (second order) unless ``first_order``. A query loss of the adapted
    learner then backpropagates into ``maml.parameters()`` (the meta-gradient).
    ``allow_unused`` (default: ``allow_nograd``) leaves parameters the loss does not use
    unchanged; ``allow_nograd`` leaves parameters with ``requires_grad=False`` unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | Tensor,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
    ) -> None:
        super().__init__(model)
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> None:
        """Takes one gradient step ``p <- p - lr * dloss/dp`` on the wrapped module, in place (returns None).

        Each argument left None takes this learner's own setting.

        Raises:
            ValueError: if a parameter does not require grad (without ``allow_nograd``) or is
                unused by ``loss`` (without ``allow_unused``).
        """
        first_order, allow_unused, allow_nograd = own_settings(
            self, first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd
        ).values()
        grads = adaptation_gradients(
            loss,
            self.module.parameters(),
            create_graph=not first_order,
            allow_unused=allow_unused,
            allow_nograd=allow_nograd,
        )
        self.module = maml_update(self.module, self.lr, grads)

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> MAML:
        """Returns a ``MAML`` around a :func:`~metaloop.compat.learn2learn.utils.clone_module` copy of the module (graph kept).

        Each argument left None takes this learner's own setting.
        """
        return MAML(
            clone_module(self.module),
            lr=self.lr,
            **own_settings(self, first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd),
        )
