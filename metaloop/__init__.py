"""metaloop: gradients through training loops, on PyTorch Lightning.

``import metaloop as higher`` runs code written for higher unchanged: ``innerloop_ctx``,
``monkeypatch``, ``patch``, ``optim``, ``utils``, ``register_optim``, ``get_diff_optim``,
``create_diff_optim`` are all here, with higher's argument names and defaults.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from metaloop import optim, patch, utils
from metaloop.optim import create_diff_optim, get_diff_optim, register_optim
from metaloop.optim.differentiable import DifferentiableOptimizer
from metaloop.patch import FunctionalModule, buffer_sync, make_functional, monkeypatch

__version__ = "0.1.0"

__all__ = [
    "innerloop_ctx",
    "monkeypatch",
    "make_functional",
    "buffer_sync",
    "FunctionalModule",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "optim",
    "patch",
    "utils",
]


@contextlib.contextmanager
def innerloop_ctx(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: dict[str, Any] | None = None,
    track_higher_grads: bool = True,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """Yields ``(fmodel, diffopt)``: a functional copy of ``model`` and a differentiable ``opt``.

    ``diffopt.step(loss)`` updates ``fmodel``'s fast weights on the graph; gradients of a
    later loss reach ``fmodel.parameters(time=0)`` (and, with ``copy_initial_weights=False``,
    ``model``'s own parameters) and any hyperparameter given as a tensor in ``override``.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> x, y = torch.randn(4, 2), torch.randn(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with innerloop_ctx(model, opt, override={"lr": lr}) as (fmodel, diffopt):
        ...     new_weights = diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y))
        ...     torch.nn.functional.mse_loss(fmodel(x), y).backward()
        >>> lr.grad < 0  # the first step lowered the loss: a larger step would lower it more
        tensor(True)
    """
    fmodel = monkeypatch(
        model, device, copy_initial_weights=copy_initial_weights, track_higher_grads=track_higher_grads
    )
    diffopt = get_diff_optim(
        opt, model.parameters(), fmodel=fmodel, device=device, override=override,
        track_higher_grads=track_higher_grads,
    )
    yield fmodel, diffopt
