"""learn2learn's ``GBML``: gradient-based meta-learning whose inner step applies a learned transform of the gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metaloop.compat.learn2learn.algorithms.base_learner import own_settings
from metaloop.transforms.gradient_transforms import TransformFactory
from metaloop.compat.learn2learn.optim.learnable_optimizer import ModuleSGD, ParameterUpdate
from metaloop.compat.learn2learn.utils.module_updates import clone_module

__all__ = ["GBML"]


class GBML(nn.Module):
    """A ``MAML``-like learner whose inner step is ``p <- p - lr * T_p(dloss/dp)`` with trainable transforms ``T_p``.

    ``transform(param)`` builds one transform per parameter (e.g.
    ``ModuleTransform(nn.Linear)``, ``KroneckerTransform(KroneckerLinear)``,
    ``MetaCurvatureTransform``): a ``Scale`` transform gives Meta-SGD (Li et al. 2017),
    Kronecker-factored ones KFO (Arnold et al. 2019), Meta-Curvature (Park & Oliva 2019).
    With ``adapt_transform`` the transforms are adapted too: from the second ``adapt`` on,
    each call first takes an SGD step on the transforms' parameters (Alpha MAML, Behl et al. 2019).

    ``compute_update`` is the :class:`~metaloop.compat.learn2learn.optim.ParameterUpdate` holding the
    transforms; ``clone()`` passes a differentiable copy of it (users leave it None).
    """

    def __init__(
        self,
        module: nn.Module,
        transform: TransformFactory,
        lr: float | Tensor = 1.0,
        adapt_transform: bool = False,
        first_order: bool = False,
        allow_unused: bool = False,
        allow_nograd: bool = False,
        compute_update: ParameterUpdate | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(
                f"GBML got unexpected arguments {sorted(kwargs)}; it accepts compute_update besides learn2learn's"
            )
        self.module, self.transform, self.lr = module, transform, lr
        self.adapt_transform = adapt_transform
        self.first_order, self.allow_unused, self.allow_nograd = first_order, allow_unused, allow_nograd
        self.compute_update = ParameterUpdate(module.parameters(), transform) if compute_update is None else compute_update
        self.diff_sgd = ModuleSGD(lr=lr)
        # True once the module took a step with the current transforms: only then does a loss depend on them.
        self._params_updated = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
        adapt_transform: bool | None = None,
    ) -> GBML:
        """Returns a ``GBML`` around differentiable copies of the module and of the transforms.

        Each argument left None takes this learner's own setting.
        """
        return GBML(
            module=clone_module(self.module),
            transform=self.transform,
            lr=self.lr,
            compute_update=clone_module(self.compute_update),
            **own_settings(
                self,
                adapt_transform=adapt_transform,
                first_order=first_order,
                allow_unused=allow_unused,
                allow_nograd=allow_nograd,
            ),
        )

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_nograd: bool | None = None,
        allow_unused: bool | None = None,
    ) -> None:
        """Takes one step ``p <- p - lr * T_p(dloss/dp)`` on the wrapped module, in place (returns None).

        With ``adapt_transform``, a step ``theta <- theta - lr * dloss/dtheta`` on the
        transforms' parameters comes first (from the second call on). Arguments left None take
        this learner's own settings.

        Raises:
            ValueError: if a parameter does not require grad and ``allow_nograd`` is False.
        """
        first_order, allow_unused, allow_nograd = own_settings(
            self, first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd
        ).values()
        second_order = not first_order
        if self.adapt_transform and self._params_updated:
            # The graph is kept: the module's step below differentiates the same loss again.
            transform_grads = torch.autograd.grad(
                loss,
                list(self.compute_update.parameters()),
                create_graph=second_order,
                retain_graph=True,
                allow_unused=allow_unused,
            )
            self.diff_sgd(self.compute_update, transform_grads)
            self._params_updated = False
        updates = self.compute_update(
            loss,
            self.module.parameters(),
            create_graph=second_order or self.adapt_transform,
            retain_graph=second_order or self.adapt_transform,
            allow_unused=allow_unused,
            allow_nograd=allow_nograd,
        )
        self.diff_sgd(self.module, updates)
        self._params_updated = True

