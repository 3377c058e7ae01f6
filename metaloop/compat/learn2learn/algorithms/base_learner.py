"""learn2learn's ``BaseLearner`` (a module wrapper that forwards attributes) and the gradient step its algorithms share."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

__all__ = ["BaseLearner", "adaptation_gradients"]


class BaseLearner(nn.Module):
    """Wraps ``module``: calls go to ``module(...)``, and attributes it lacks are looked up on ``module``.

    The base of learn2learn's algorithm wrappers (``MAML``, ``MetaSGD``), so ``maml.fc`` reads
    ``maml.module.fc``.
    """

    def __init__(self, module: nn.Module | None = None) -> None:
        super().__init__()
        self.module = module

    def __getattr__(self, attr: str) -> Any:
        try:
            return super().__getattr__(attr)
        except AttributeError:
            module = self.__dict__["_modules"].get("module")
            if module is None:
                raise
            return getattr(module, attr)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def own_settings(learner: nn.Module, **overrides: bool | None) -> dict[str, bool]:
    """Returns ``overrides`` (in their order) with each None replaced by ``learner``'s own setting of that name.

    ``clone(first_order=None, ...)`` and ``adapt(loss, first_order=None, ...)`` take the learner's settings this way.
    """
    return {name: getattr(learner, name) if value is None else value for name, value in overrides.items()}


def adaptation_gradients(
    loss: Tensor,
    parameters: Iterable[Tensor],
    create_graph: bool,
    allow_unused: bool = False,
    allow_nograd: bool = False,
) -> list[Tensor | None]:
    """Returns ``d loss / d p`` for each parameter, None for those skipped, keeping the graph when ``create_graph``.

    With ``allow_nograd`` parameters that do not require grad get None (they are not adapted);
    with ``allow_unused`` parameters the loss does not depend on get None.

    Raises:
        ValueError: if a parameter does not require grad and ``allow_nograd`` is False, or the
            loss does not depend on a parameter and ``allow_unused`` is False.
    """
    params = list(parameters)
    for i, p in enumerate(params):
        if not p.requires_grad and not allow_nograd:
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}) has requires_grad=False; pass allow_nograd=True to "
                "adapt only the parameters that require grad"
            )
    wrt = [i for i, p in enumerate(params) if p.requires_grad]
    grads: list[Tensor | None] = [None] * len(params)
    if not wrt:
        return grads
    computed = torch.autograd.grad(
        loss,
        [params[i] for i in wrt],
        create_graph=create_graph,
        retain_graph=create_graph,
        allow_unused=True,
    )
    for i, g in zip(wrt, computed):
        if g is None and not allow_unused:
            raise ValueError(
                f"the loss does not depend on parameter {i} (shape {tuple(params[i].shape)}); pass "
                "allow_unused=True to leave unused parameters unchanged"
            )
        grads[i] = g
    return grads
