"""learn2learn's ``learn2learn.utils``: module and distribution cloning, the DiCE magic box, accuracy, config flattening.

``clone_module``, ``update_module`` and ``detach_module`` are :mod:`~metaloop.compat.learn2learn.utils.module_updates`'s;
``utils.lightning`` holds ``EpisodicBatcher``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import warnings
from typing import Any, Iterable, Mapping, TypeVar

import torch
from torch import Tensor, nn

from metaloop.compat.learn2learn.utils.module_updates import clone_module, detach_module, update_module

__all__ = [
    "magic_box",
    "clone_parameters",
    "clone_named_parameters",
    "clone_module",
    "update_module",
    "detach_module",
    "clone_distribution",
    "detach_distribution",
    "accuracy",
    "flatten_config",
    "warn_once",
]

T = TypeVar("T")


def magic_box(x: T) -> T:
    r"""Returns ``exp(x - stop_gradient(x))``: ones whose gradient is ``dx`` (DiCE, Foerster et al. 2018); non-tensors pass through.

    Multiplying a cost by ``magic_box(sum of log-probabilities)`` gives a surrogate loss whose
    derivatives of every order are unbiased score-function estimators.
    """
    if isinstance(x, Tensor):
        return torch.exp(x - x.detach())
    return x


def clone_parameters(param_list: Iterable[Tensor]) -> list[Tensor]:
    """Returns ``[p.clone() for p in param_list]``: copies that stay on the graph."""
    return [p.clone() for p in param_list]


def clone_named_parameters(param_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Returns ``{name: p.clone()}``: copies that stay on the graph."""
    return {k: p.clone() for k, p in param_dict.items()}


D = TypeVar("D", bound=torch.distributions.Distribution)


def clone_distribution(dist: D) -> D:
    """Returns a copy of ``dist`` whose graph-carrying tensors, modules and nested distributions are differentiable clones.

    Tensors that require grad are ``clone()``d (gradients still reach the original's
    parameters), modules go through ``clone_module``; other attributes are deep copies.
    """
    memo = {id(v): v for v in vars(dist).values() if isinstance(v, Tensor) and v.requires_grad}
    clone = copy.deepcopy(dist, memo)  # tensors on the graph are shared here, then replaced by clones below
    for key, item in vars(dist).items():
        if isinstance(item, Tensor) and item.requires_grad:
            setattr(clone, key, item.clone())
        elif isinstance(item, nn.Module):
            setattr(clone, key, clone_module(item))
        elif isinstance(item, torch.distributions.Distribution):
            setattr(clone, key, clone_distribution(item))
    return clone


def detach_distribution(dist: D) -> D:
    """Returns ``dist`` after detaching, in place, its tensors that require grad, its modules and nested distributions."""
    for key, item in list(vars(dist).items()):
        if isinstance(item, Tensor) and item.requires_grad:
            setattr(dist, key, item.detach())
        elif isinstance(item, nn.Module):
            detach_module(item)
        elif isinstance(item, torch.distributions.Distribution):
            detach_distribution(item)
    return dist


def accuracy(preds: Tensor, targets: Tensor) -> Tensor:
    """Returns the fraction (a float tensor) of rows of ``preds`` whose argmax equals ``targets``."""
    return (preds.argmax(dim=1).long() == targets.long()).sum().float() / preds.size(0)


def flatten_config(args: Any, prefix: str | None = None) -> dict[str, Any]:
    """Returns a flat ``{"a.b.c": value}`` dict of a nested argparse namespace, dataclass or dict (for loggers)."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if dataclasses.is_dataclass(args) and not isinstance(args, type):
        items = [(f.name, getattr(args, f.name)) for f in dataclasses.fields(args)]
    elif isinstance(args, dict):
        items = list(args.items())
    else:
        return {prefix: args}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten_config(value, prefix=str(key) if prefix is None else f"{prefix}.{key}"))
    return flat


class _WarnOnce:
    """``warn_once(message, severity=None)`` warns about each message once; severity ``"error"`` raises instead."""

    categories: dict[str, type[Warning]] = {"default": UserWarning, "deprecation": DeprecationWarning}

    def __init__(self) -> None:
        self.warned_messages: list[str] = []

    def __call__(self, message: str, severity: str | type[Warning] | None = None) -> None:
        if message in self.warned_messages:
            return
        severity = "default" if severity is None else severity
        if severity == "error":
            raise RuntimeError(message)
        if isinstance(severity, str):
            if severity not in self.categories:
                raise ValueError(f"severity={severity!r} is not one of {sorted(self.categories) + ['error']} or a Warning class")
            severity = self.categories[severity]
        warnings.warn(message, category=severity, stacklevel=2)
        self.warned_messages.append(message)


warn_once = _WarnOnce()
