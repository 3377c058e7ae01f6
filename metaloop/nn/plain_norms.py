"""Normalization layers written with plain tensor operations, exact under :func:`torch.func.vmap` at every order.

PyTorch's batching rules for the backward passes of ``batch_norm``, ``instance_norm`` and ``layer_norm``
drop terms that second-order gradients need: a meta-gradient taken through an inner loop that was
vmapped over tasks differs from the task-by-task one (by 1-4% of a tensor's norm on a
conv-BatchNorm net in float64; the true zero gradient of a convolution bias before a BatchNorm
comes out nonzero). ``benchmarks/vmap_batchnorm_bug.py`` reproduces it. First-order gradients, and
``group_norm``, are right.

The same layers computed with ``mean``, ``rsqrt``, ``*`` and ``+`` have ordinary batching rules at
every order, so :func:`exact_norms` routes the three functionals to the plain versions here while
it is active: ``nn.BatchNorm2d`` & co. keep their parameters and names, and a vmapped second-order
meta-gradient equals the task-by-task loop to rounding (1e-13 in float64,
``tests/nn/test_plain_norms.py``). Statistics are computed in float32 at least (under bfloat16
autocast too), and the result has the input's dtype.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.func import functional_call, grad, vmap
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 1))
    >>> weights = dict(net.named_parameters())
    >>> def adapted_loss(x):  # one inner SGD step, then the loss at the adapted weights
    ...     loss = lambda w: functional_call(net, w, (x,)).square().mean()
    ...     step = grad(loss)(weights)
    ...     return loss({k: w - 0.1 * step[k] for k, w in weights.items()})
    >>> with exact_norms():
    ...     losses = vmap(adapted_loss)(torch.randn(8, 5, 3))
    >>> losses.shape
    torch.Size([8])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["batch_norm", "exact_norms", "instance_norm", "layer_norm"]


def _normalize(x: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    """Returns ``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), in float32 at least."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    mean = xc.mean(dims, keepdim=True)
    centred = xc - mean
    return centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Returns :func:`torch.nn.functional.batch_norm`'s result, with batch statistics computed by plain operations.

    With ``training`` or without running statistics the input ``(n, C, ...)`` is normalised by its own
    mean and biased variance over every dimension but the channels; otherwise by the running
    statistics. Running statistics are not updated here (:func:`exact_norms` hands a call that would
    update them to PyTorch).
    """
    shape = [1, -1] + [1] * (input.ndim - 2)
    if training or running_mean is None or running_var is None:
        y = _normalize(input, [0, *range(2, input.ndim)], eps)
    else:
        compute = torch.promote_types(input.dtype, torch.float32)
        y = (input.to(compute) - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(y, weight, bias, shape).to(input.dtype)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Returns :func:`torch.nn.functional.instance_norm`'s result: each sample and channel normalised over its own positions."""
    shape = [1, -1] + [1] * (input.ndim - 2)
    if use_input_stats or running_mean is None or running_var is None:
        y = _normalize(input, list(range(2, input.ndim)), eps)
    else:
        compute = torch.promote_types(input.dtype, torch.float32)
        y = (input.to(compute) - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(y, weight, bias, shape).to(input.dtype)


def layer_norm(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Returns :func:`torch.nn.functional.layer_norm`'s result: normalised over the last ``len(normalized_shape)`` dimensions."""
    dims = list(range(input.ndim - len(normalized_shape), input.ndim))
    y = _normalize(input, dims, eps)
    return _affine(y, weight, bias, list(normalized_shape)).to(input.dtype)


def _batch_norm_route(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Tensor] | None:
    """Returns the plain ``batch_norm`` unless the call would update running statistics (PyTorch's own then)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    bound = {**dict(zip(names, args)), **kwargs}
    updates_buffers = bound.get("training", False) and bound.get("running_mean") is not None
    return None if updates_buffers else batch_norm


def _instance_norm_route(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Tensor] | None:
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    bound = {**dict(zip(names, args)), **kwargs}
    updates_buffers = bound.get("use_input_stats", True) and bound.get("running_mean") is not None
    return None if updates_buffers else instance_norm


_ROUTES: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], Callable[..., Tensor] | None]] = {
    F.batch_norm: _batch_norm_route,
    F.instance_norm: _instance_norm_route,
    F.layer_norm: lambda args, kwargs: layer_norm,
}


class _ExactNorms(TorchFunctionMode):
    """Routes ``F.batch_norm``, ``F.instance_norm`` and ``F.layer_norm`` to their plain-operation versions."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        plain = route(args, kwargs) if route is not None else None
        return (plain or func)(*args, **kwargs)


@contextlib.contextmanager
def exact_norms() -> Iterator[None]:
    """Computes BatchNorm, InstanceNorm and LayerNorm with plain operations inside the block (exact under vmap at any order).

    Wrap a :func:`torch.func.vmap` over tasks whose inner loop takes second-order gradients through
    normalization layers. The backward pass may run after the block: the graph already holds the
    plain operations. A call that would update running statistics in place (a BatchNorm in training
    mode with ``track_running_stats=True``) is left to PyTorch; vmap cannot update buffers per task anyway.
    """
    with _ExactNorms():
        yield
