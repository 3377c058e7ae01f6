"""learn2learn's learnable update rules on ordinary modules: meta-descent and differentiable SGD.

:class:`LearnableOptimizer` trains a model with updates produced by a trainable transform
of its gradient and keeps each update on the graph, so the next loss also trains the
transform (meta-descent). :class:`ParameterUpdate` is the ``torch.autograd.grad``
counterpart returning transformed updates, and :class:`ModuleSGD` applies plain
gradient steps to a module on the graph. All edit the module with
:mod:`metaloop.compat.learn2learn.utils.module_updates`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from metaloop.optim.rules import transform_step
from metaloop.transforms.gradient_transforms import TransformFactory, apply_transform, build_transforms
from metaloop.compat.learn2learn.utils.module_updates import _map_tensors, update_module

__all__ = ["LearnableOptimizer", "ParameterUpdate", "ModuleSGD"]


class LearnableOptimizer(nn.Module):
    """An optimizer whose update ``-lr * T_p(grad)`` comes from a trainable transform, kept on the graph.

    One transform per parameter of ``model`` is built by ``transform(param)`` (e.g.
    ``ModuleTransform(nn.Linear)``, ``KroneckerTransform(KroneckerLinear)``). ``step()``
    replaces each parameter ``p`` that has a gradient by ``p.detach() - lr * T_p(p.grad)``:
    the model moves, and the next backward pass also reaches the transforms' parameters,
    which ``parameters()`` returns for an outer optimizer (meta-descent: Sutton 1992;
    Baydin et al. 2017, "Online Learning Rate Adaptation with Hypergradient Descent";
    Majumder et al. 2019; Jacobsen et al. 2019). Only one step is kept on the graph: the
    previous step is detached each time.

    The model is held but not registered as a submodule, so ``parameters()`` and
    ``state_dict()`` are the transforms' alone.
    """

    def __init__(self, model: nn.Module, transform: TransformFactory, lr: float = 1.0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"LearnableOptimizer updates an nn.Module, got {type(model).__name__}")
        object.__setattr__(self, "model", model)
        self.transforms = build_transforms(transform, model.named_parameters())
        self.lr = lr

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Returns ``closure()``'s loss (or None) after updating the model by ``-lr * T_p(p.grad)``.

        Parameters without a gradient are left alone.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        named = list(self.model.named_parameters())
        if len(named) != len(self.transforms):
            raise RuntimeError(
                f"the model now has {len(named)} parameters but this optimizer built {len(self.transforms)} "
                "transforms; build a new LearnableOptimizer after changing the model"
            )
        replacements: dict[Tensor, Tensor] = {}
        for (name, p), transform in zip(named, self.transforms):
            if p.grad is None:
                continue
            new = transform_step(p.detach(), p.grad.detach(), transform, self.lr, f"parameter {name!r}")
            if p.requires_grad and not new.requires_grad:  # a transform without parameters
                new.requires_grad_()
            replacements[p] = new
        _map_tensors(self.model, lambda t: replacements.get(t, t), {})
        for new in replacements.values():
            if new.grad_fn is not None:
                new.retain_grad()  # the next step reads p.grad of these non-leaf tensors
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the model's gradients (not the transforms', which the outer optimizer owns).

        As in ``torch.optim``, gradients become None by default; ``set_to_none=False``
        gives fresh zero tensors (learn2learn's behaviour; never zeroed in place, which would
        corrupt the retained gradients of the graph).
        """
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad = None if set_to_none else torch.zeros_like(p.grad)


class ParameterUpdate(nn.Module):
    """Like ``torch.autograd.grad``, but returns ``T_p(grad)`` for each parameter: a learned update.

    ``parameters`` (a list of tensors or a module, whose ``parameters()`` are used) fixes
    the parameters, and ``transform(param)`` builds one transform per parameter; a factory
    returning None leaves that gradient unchanged. The sign is the transform's: pass
    ``[-u for u in updates]`` to :func:`~metaloop.compat.learn2learn.utils.update_module` for a descent step.
    """

    def __init__(self, parameters: Iterable[Tensor] | nn.Module, transform: TransformFactory) -> None:
        super().__init__()
        if isinstance(parameters, nn.Module):
            named: Iterable[tuple[str, Tensor]] = parameters.named_parameters()
        else:
            named = ((f"parameters[{i}]", p) for i, p in enumerate(parameters))
        self.transforms = build_transforms(transform, named)

    def forward(
        self,
        loss: Tensor,
        parameters: Iterable[Tensor],
        create_graph: bool = False,
        retain_graph: bool = False,
        allow_unused: bool = False,
        allow_nograd: bool = False,
    ) -> list[Tensor | None]:
        """Returns the update ``T_p(d loss / d p)`` of each parameter (None where it has no gradient).

        ``create_graph``, ``retain_graph`` and ``allow_unused`` are ``torch.autograd.grad``'s
        (the graph is retained whenever ``create_graph`` is set). With ``allow_nograd``,
        parameters that do not require grad get None.

        Raises:
            ValueError: if the number of parameters differs from construction, or a parameter
                does not require grad and ``allow_nograd`` is False.
        """
        params = list(parameters)
        if len(params) != len(self.transforms):
            raise ValueError(
                f"got {len(params)} parameters but this ParameterUpdate was built for {len(self.transforms)}; "
                "pass the same parameters it was constructed with"
            )
        if not allow_nograd:
            for i, p in enumerate(params):
                if not p.requires_grad:
                    raise ValueError(
                        f"parameters[{i}] (shape {tuple(p.shape)}) does not require grad; pass allow_nograd=True "
                        "to get None as its update, or call requires_grad_() on it"
                    )
        wrt = [i for i, p in enumerate(params) if p.requires_grad]
        grads: list[Tensor | None] = [None] * len(params)
        if wrt:
            computed = torch.autograd.grad(
                loss,
                [params[i] for i in wrt],
                create_graph=create_graph,
                retain_graph=retain_graph or create_graph,
                allow_unused=allow_unused,
            )
            for i, g in zip(wrt, computed):
                grads[i] = g
        return [
            None if g is None else apply_transform(t, g, f"parameters[{i}]")
            for i, (g, t) in enumerate(zip(grads, self.transforms))
        ]


class ModuleSGD(nn.Module):
    """Gradient descent ``p <- p - lr * g`` applied to a module in place, on the graph.

    learn2learn calls it ``DifferentiableSGD`` (:mod:`metaloop.compat.learn2learn` keeps that
    name); here it is ``ModuleSGD``, as ``metaloop.optim.DifferentiableSGD`` is higher's, which
    returns fast weights for a functional model. This one edits an ordinary module with
    :func:`~metaloop.compat.learn2learn.utils.update_module`, so later losses differentiate through the step.
    """

    def __init__(self, lr: float | Tensor) -> None:
        super().__init__()
        self.lr = lr

    def forward(self, module: nn.Module, gradients: Sequence[Tensor | None] | None = None) -> nn.Module:
        """Returns ``module`` with each parameter ``p`` replaced by ``p - lr * g``.

        ``gradients`` (one per ``module.parameters()`` entry, None to skip) defaults to each
        parameter's ``.grad``; pass ``torch.autograd.grad(..., create_graph=True)``'s result
        for second-order meta-gradients.
        """
        if gradients is None:
            gradients = [p.grad for p in module.parameters()]
        return update_module(module, [None if g is None else g * -self.lr for g in gradients])
