"""Learned preconditioned SGD as a ``torch.optim`` optimizer and its differentiable twin.

The rule is :func:`transform_step`, ``p <- p - lr * T_p(g)``, with ``T_p`` a trainable
transform of parameter ``p``'s gradient (Kronecker factors as in Arnold et al. 2019,
Meta-Curvature as in Park & Oliva 2019). :class:`TransformOptimizer` applies it in an
ordinary training loop and owns the transforms; :class:`DifferentiableTransformOptimizer`
applies it to fast weights inside :func:`metaloop.innerloop_ctx`, calling the same live
transforms, so the outer loss trains them. Importing this module registers the pair with
:func:`metaloop.optim.register_optim`, so Kronecker-preconditioned MAML or Meta-Curvature is
a choice of optimizer, not new code::

    opt = TransformOptimizer(model.parameters(), KroneckerTransform(KroneckerLinear), lr=0.1)
    meta_opt = torch.optim.Adam([*model.parameters(), *opt.transform_parameters()])
    with metaloop.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(loss(fmodel(x_support), y_support))
        loss(fmodel(x_query), y_query).backward()
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.optim.optimizer import ParamsT

from metaloop.optim import DifferentiableOptimizer, register_optim
from metaloop.optim.hyperparams import Override
from metaloop.patch import FunctionalModule
from metaloop.transforms.gradient_transforms import TransformFactory, apply_transform, build_transforms

__all__ = ["transform_step", "TransformOptimizer", "DifferentiableTransformOptimizer"]


def transform_step(
    param: Tensor, grad: Tensor, transform: Callable[[Tensor], Tensor], lr: float | Tensor, name: str = "the parameter"
) -> Tensor:
    """Returns ``param - lr * transform(grad)``: one step of learned preconditioned gradient descent.

    Pure: inputs are not modified, and the result is differentiable in ``param``, ``grad``,
    ``lr`` and the transform's parameters. ``name`` only labels errors.

    Raises:
        ValueError: if the transform's output is not shaped like ``grad``.
    """
    return param - apply_transform(transform, grad, name) * lr


class TransformOptimizer(torch.optim.Optimizer):
    """SGD on a learned transform of the gradient: ``p <- p - lr * T_p(grad)``.

    ``transform`` is a factory called once per parameter (``KroneckerTransform(...)``,
    ``MetaCurvatureTransform``, ``ModuleTransform(...)``, or any ``param -> nn.Module | None``);
    the optimizer owns the resulting modules as :attr:`transforms` (an ``nn.ModuleList`` in
    param-group order) and hands their parameters to an outer optimizer through
    :meth:`transform_parameters`. ``step()`` does not train the transforms: they are learned
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
        self.transforms.extend(build_transforms(self._transform_factory, named))

    def group_transforms(self) -> list[list[nn.Module]]:
        """Returns the transforms arranged like ``param_groups``: ``[g][i]`` belongs to ``param_groups[g]['params'][i]``."""
        grouped, start = [], 0
        for group in self.param_groups:
            grouped.append(list(self.transforms[start : start + len(group["params"])]))
            start += len(group["params"])
        return grouped

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
            for g, (group, transforms) in enumerate(zip(self.param_groups, self.group_transforms())):
                for i, (p, transform) in enumerate(zip(group["params"], transforms)):
                    if p.grad is not None:
                        name = f"param_groups[{g}]['params'][{i}]"
                        p.copy_(transform_step(p, p.grad, transform, group["lr"], name))
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Returns ``torch.optim``'s state dict plus the transforms' weights under ``"transforms"``."""
        state = super().state_dict()
        state["transforms"] = self.transforms.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict from :meth:`state_dict`, transforms' weights included."""
        state_dict = dict(state_dict)
        transforms = state_dict.pop("transforms", None)
        super().load_state_dict(state_dict)
        if transforms is not None:
            self.transforms.load_state_dict(transforms)


class DifferentiableTransformOptimizer(DifferentiableOptimizer):
    """The differentiable version of :class:`TransformOptimizer`: ``p <- p - lr * T_p(g)`` on fast weights.

    It calls the live transforms of the optimizer it branches from (never copies), so a
    loss on the unrolled weights has gradients with respect to the transforms' parameters,
    and an ``lr`` given as a tensor (``override``, possibly one per parameter) is learned too.
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: FunctionalModule | None = None,
        device: torch.device | str | None = None,
        override: Override | None = None,
        grad_callback: Callable[[list[Tensor | None]], Sequence[Tensor | None]] | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(other, TransformOptimizer):
            raise TypeError(
                f"DifferentiableTransformOptimizer branches from a TransformOptimizer, got {type(other).__name__}"
            )
        super().__init__(
            other, reference_params, fmodel=fmodel, device=device, override=override,
            grad_callback=grad_callback, track_higher_grads=track_higher_grads, **kwargs,
        )
        self._transforms = other.group_transforms()

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """Writes ``p - lr * T_p(g)`` into ``self.param_groups[g]["params"][i]`` for each gradient."""
        for g, (group, grads, transforms) in enumerate(zip(self.param_groups, grouped_grads, self._transforms)):
            lr = group["lr"]
            for i, grad in enumerate(grads):
                if grad is None:
                    continue
                lr_i = lr[i] if isinstance(lr, list) else lr
                name = f"param_groups[{g}]['params'][{i}]"
                group["params"][i] = transform_step(group["params"][i], grad, transforms[i], lr_i, name)


register_optim(TransformOptimizer, DifferentiableTransformOptimizer)
