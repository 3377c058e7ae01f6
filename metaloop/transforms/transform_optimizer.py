"""Learned preconditioned SGD as a ``torch.optim`` optimizer and its differentiable twin.

The rule is :data:`metaloop.optim.TRANSFORM`, ``p <- p - lr * T_p(g)``
(:func:`~metaloop.optim.rules.transform_step`), with ``T_p`` a trainable transform of parameter
``p``'s gradient (Kronecker factors as in Arnold et al. 2019, Meta-Curvature as in Park & Oliva
2019). ``T_p`` is a per-parameter hyperparameter: :class:`TransformOptimizer` keeps its
transforms in each param group's ``"transform"`` entry (one per parameter), so every shell
that reads param groups, :class:`DifferentiableTransformOptimizer` (made from the table row
this module registers) and the Lightning module's inner loop alike, calls the same live
transforms and the outer loss trains them. Kronecker-preconditioned MAML or Meta-Curvature is
a choice of optimizer, not new code::

    opt = TransformOptimizer(model.parameters(), KroneckerTransform(KroneckerLinear), lr=0.1)
    meta_opt = torch.optim.Adam([*model.parameters(), *opt.transform_parameters()])
    with metaloop.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(loss(fmodel(x_support), y_support))
        loss(fmodel(x_query), y_query).backward()
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.optim.optimizer import ParamsT

from metaloop.optim import TRANSFORM, differentiable_version, register_optim
from metaloop.optim.rules import transform_step
from metaloop.transforms.gradient_transforms import TransformFactory, build_transforms

__all__ = ["transform_step", "TransformOptimizer", "DifferentiableTransformOptimizer"]


class TransformOptimizer(torch.optim.Optimizer):
    """SGD on a learned transform of the gradient: ``p <- p - lr * T_p(grad)``.

    ``transform`` is a factory called once per parameter (``KroneckerTransform(...)``,
    ``MetaCurvatureTransform``, ``ModuleTransform(...)``, or any ``param -> nn.Module | None``);
    the optimizer owns the resulting modules as :attr:`transforms` (an ``nn.ModuleList`` in
    param-group order), lists each group's in its ``"transform"`` entry, and hands their
    parameters to an outer optimizer through :meth:`transform_parameters`. ``step()`` does not train the transforms: they are learned
    through :class:`DifferentiableTransformOptimizer`, which ``metaloop.innerloop_ctx``
    picks for this optimizer. ``state_dict()`` includes the transforms' weights.
    """

    def __init__(self, params: ParamsT, transform: TransformFactory, lr: float | Tensor = 1.0) -> None:
        if not callable(transform):
            raise TypeError(
                "transform must be a factory transform(param) -> nn.Module, e.g. KroneckerTransform(KroneckerLinear) "
                f"or MetaCurvatureTransform; got {transform!r}"
            )
        if not isinstance(lr, Tensor) and lr < 0:
            raise ValueError(f"lr={lr} must be >= 0 (the transform, not lr, should carry any sign change)")
        self._transform_factory = transform
        self.transforms = nn.ModuleList()
        super().__init__(params, {"lr": lr})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group and builds the transforms of its parameters."""
        super().add_param_group(param_group)
        g = len(self.param_groups) - 1
        named = ((f"param_groups[{g}]['params'][{i}]", p) for i, p in enumerate(self.param_groups[g]["params"]))
        built = build_transforms(self._transform_factory, named)
        self.transforms.extend(built)
        self.param_groups[g]["transform"] = list(built)

    def transform_parameters(self) -> Iterator[nn.Parameter]:
        """Returns an iterator over the transforms' trainable parameters (for an outer optimizer)."""
        return self.transforms.parameters()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Returns ``closure()``'s loss (or None) after ``p <- p - lr * T_p(p.grad)`` for each parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for g, group in enumerate(self.param_groups):
                for i, (p, transform) in enumerate(zip(group["params"], group["transform"])):
                    if p.grad is not None:
                        name = f"param_groups[{g}]['params'][{i}]"
                        p.copy_(transform_step(p, p.grad, transform, group["lr"], name))
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Returns ``torch.optim``'s state dict plus the transforms' weights under ``"transforms"``.

        The groups' ``"transform"`` entries (the live modules) are left out: their weights are
        saved under ``"transforms"``.
        """
        state = super().state_dict()
        for group in state["param_groups"]:
            group.pop("transform", None)
        state["transforms"] = self.transforms.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict from :meth:`state_dict`, transforms' weights included."""
        state_dict = dict(state_dict)
        transforms = state_dict.pop("transforms", None)
        live = [group["transform"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, modules in zip(self.param_groups, live):
            group["transform"] = modules
        if transforms is not None:
            self.transforms.load_state_dict(transforms)


register_optim(TransformOptimizer, TRANSFORM)
DifferentiableTransformOptimizer = differentiable_version(TransformOptimizer)
"""The differentiable version of :class:`TransformOptimizer`: ``p <- p - lr * T_p(g)`` on fast weights.

It calls the live transforms of the optimizer it branches from (never copies), so a loss on
the unrolled weights has gradients with respect to the transforms' parameters, and an ``lr``
given as a tensor (``override``, possibly one per parameter) is learned too.
"""
