"""Tasks folded into channels: one network call runs a meta-batch of tasks, each with its own weights, exactly.

A meta-batch of ``T`` tasks of ``N`` images ``(T, N, C, H, W)`` is laid out as ``(N, T*C, H, W)``: task ``t``
owns channels ``t*C .. (t+1)*C``. A convolution whose weights are the ``T`` tasks' weights stacked
``(T*C_out, C_in, k, k)`` with ``groups=T`` then convolves each task with its own filters; the native
``batch_norm`` over ``T*C`` channels computes each task's own batch statistics (exact at every order of
differentiation, unlike ``batch_norm`` under :func:`torch.func.vmap`, see :mod:`metaloop.nn.plain_norms`);
``group_norm`` with ``T*G`` groups each task's own groups; pooling and activations act per channel.
After flattening, features are ``(T, N, F)`` and a linear layer is one batched matrix product. The
meta-batch's gradient is then that of the sum of the tasks' losses: the tasks share no operation, so
each task's stacked slice receives exactly its own gradient, at any order.

A second-order MAML step on a conv-4 this way dispatches a few thousand kernels where the vmapped
loop dispatches tens of thousands (``benchmarks/batched_second_order.py``). :func:`fold` reads the
network's forward pass once (:func:`torch.fx.symbolic_trace`) and says why it cannot fold it
(:func:`fold_problems`): only the layers listed in :data:`FOLDABLE` are folded, so a network with another
layer, buffers or data-dependent control flow runs another way.

Example:
    >>> import torch
    >>> from metaloop.nn import Conv4
    >>> net = Conv4(5).double()
    >>> folded = fold(net)
    >>> weights = {n: p.expand(3, *p.shape) for n, p in net.named_parameters()}  # 3 tasks, the same weights
    >>> x = torch.randn(3, 10, 1, 28, 28, dtype=torch.float64)
    >>> out = folded(weights, x)
    >>> out.shape
    torch.Size([3, 10, 5])
    >>> torch.allclose(out[1], net(x[1]))
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["FOLDABLE", "FoldedModel", "fold", "fold_problems", "try_fold"]


class _Value(NamedTuple):
    """An activation of the folded network: ``(N, T*C, ...)`` maps (``channels`` = C) or ``(T, N, ...)`` features (``channels`` None)."""

    tensor: Tensor
    channels: int | None


Weights = Mapping[str, Tensor]


def _conv(module: nn.Conv2d, prefix: str, weights: Weights, x: _Value, tasks: int) -> _Value:
    w = weights[f"{prefix}weight"]  # (T, C_out, C_in / g, k, k)
    b = weights.get(f"{prefix}bias")
    y = F.conv2d(
        x.tensor, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1), module.stride, module.padding,
        module.dilation, module.groups * tasks,
    )
    return _Value(y, module.out_channels)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, prefix: str, weights: Weights, x: _Value, tasks: int) -> _Value:
    w, b = weights.get(f"{prefix}weight"), weights.get(f"{prefix}bias")
    flat = x.channels is None  # (T, N, F) features: fold to (N, T*F) and back
    t = x.tensor.transpose(0, 1).reshape(x.tensor.shape[1], -1) if flat else x.tensor
    y = F.batch_norm(
        t, None, None, None if w is None else w.reshape(-1), None if b is None else b.reshape(-1), True, 0.0, module.eps
    )
    if flat:
        y = y.reshape(x.tensor.shape[1], tasks, -1).transpose(0, 1)
    return _Value(y, x.channels)


def _group_norm(module: nn.GroupNorm, prefix: str, weights: Weights, x: _Value, tasks: int) -> _Value:
    w, b = weights.get(f"{prefix}weight"), weights.get(f"{prefix}bias")
    y = F.group_norm(
        x.tensor, module.num_groups * tasks, None if w is None else w.reshape(-1), None if b is None else b.reshape(-1),
        module.eps,
    )
    return _Value(y, x.channels)


def _per_task(x: _Value, tasks: int, fn: Callable[[Tensor], Tensor]) -> _Value:
    """Returns ``fn`` applied to the activation laid out per task, ``(T, N, ...)``, in the activation's own layout.

    For layers that act on the last dimension (linear layers, LayerNorm): on folded maps ``(N, T*C, ..., W)``
    they would mix the tasks' weights, so the maps are unfolded first and folded back after.
    """
    y = fn(_unfold(x, tasks))
    if x.channels is None:
        return _Value(y, None)
    return _Value(y.transpose(0, 1).reshape(y.shape[1], -1, *y.shape[3:]), x.channels)


def _lead(w: Tensor, dims: int, trailing: int) -> Tensor:
    """Returns a per-task weight ``(T, *shape)`` viewed to broadcast over ``(T, N, ...)`` of ``dims`` dimensions, its
    ``trailing`` last dimensions kept."""
    return w.reshape(w.shape[0], *([1] * (dims - 1 - trailing)), *w.shape[w.dim() - trailing:])


def _layer_norm(module: nn.LayerNorm, prefix: str, weights: Weights, x: _Value, tasks: int) -> _Value:
    w, b = weights.get(f"{prefix}weight"), weights.get(f"{prefix}bias")

    def norm(t: Tensor) -> Tensor:  # (T, N, ..., F): per example
        y = F.layer_norm(t, module.normalized_shape, None, None, module.eps)
        if w is not None:
            y = y * _lead(w, y.dim(), 1)
        return y if b is None else y + _lead(b, y.dim(), 1)

    return _per_task(x, tasks, norm)


def _linear(module: nn.Linear, prefix: str, weights: Weights, x: _Value, tasks: int) -> _Value:
    w, b = weights[f"{prefix}weight"], weights.get(f"{prefix}bias")  # (T, out, in), (T, out)

    def linear(t: Tensor) -> Tensor:  # (T, N, ..., in)
        y = torch.matmul(t, _lead(w.mT, t.dim(), 2))
        return y if b is None else y + _lead(b, y.dim(), 1)

    return _per_task(x, tasks, linear)


def _per_channel(module: nn.Module, prefix: str, weights: Weights, x: _Value, tasks: int) -> _Value:
    return _Value(module(x.tensor), x.channels)


def _flatten_value(x: _Value, tasks: int, start_dim: int = 1, end_dim: int = -1) -> _Value:
    """Returns per-task features ``(T, N, C*H*W)`` of folded maps (``flatten(1)`` of each task's ``(N, C, H, W)``)."""
    if x.channels is None:
        return _Value(x.tensor.flatten(start_dim + 1, end_dim if end_dim < 0 else end_dim + 1), None)
    n = x.tensor.shape[0]
    return _Value(x.tensor.reshape(n, tasks, -1).transpose(0, 1), None)


def _flatten(module: nn.Flatten, prefix: str, weights: Weights, x: _Value, tasks: int) -> _Value:
    return _flatten_value(x, tasks)


Layer = Callable[[Any, str, Weights, _Value, int], _Value]

#: the layers :func:`fold` folds, with how each runs on folded activations (others: the network is not folded)
FOLDABLE: dict[type[nn.Module], Layer] = {
    nn.Conv2d: _conv,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Linear: _linear,
    nn.Flatten: _flatten,
    **{kind: _per_channel for kind in (
        nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Identity,
        nn.MaxPool2d, nn.AvgPool2d, nn.Dropout,
    )},
}

_FUNCTIONS: dict[Any, str] = {F.relu: "relu", torch.relu: "relu", torch.flatten: "flatten", torch.tanh: "tanh"}


def _module_problem(name: str, module: nn.Module) -> str | None:
    kind = type(module)
    if kind not in FOLDABLE:
        return f"{name} is a {kind.__name__}, which is not among the folded layers"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"{name} pads with {module.padding_mode!r}"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        return f"{name} keeps running statistics (one set for every task)"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return f"{name} normalises over {tuple(module.normalized_shape)}, not over features alone"
    if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
        return f"{name} flattens dims {module.start_dim}..{module.end_dim}, not 1..-1"
    return None


def _node_problem(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op in ("placeholder", "output"):
        return None
    if node.op == "call_module":
        return _module_problem(str(node.target), modules[str(node.target)])
    name = _FUNCTIONS.get(node.target) if node.op == "call_function" else node.target if node.op == "call_method" else None
    if name == "flatten" and (tuple(node.args[1:]), node.kwargs) not in (((1,), {}), ((), {"start_dim": 1})):
        return f"its forward pass flattens with {node.args[1:]} {node.kwargs}, not from dim 1"
    if name in ("flatten", "relu", "tanh"):
        return None
    return f"its forward pass calls {node.target} ({node.op}), which is not folded"


def fold_problems(model: nn.Module) -> list[str]:
    """Returns why :func:`fold` cannot fold ``model`` (empty if it can)."""
    return _trace(model)[1]


def _trace(model: nn.Module) -> tuple[fx.GraphModule | None, list[str]]:
    if any(True for _ in model.buffers()):
        return None, [f"it has buffers ({', '.join(n for n, _ in list(model.named_buffers())[:3])})"]
    try:
        graph = fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: not foldable
        return None, [f"its forward pass cannot be traced ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"]
    modules = dict(model.named_modules())
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    problems = [] if len(placeholders) == 1 else [f"its forward pass takes {len(placeholders)} inputs, not one"]
    problems += [p for node in graph.graph.nodes if (p := _node_problem(node, modules)) is not None]
    return (None if problems else graph), problems


class FoldedModel:
    """Runs a network on a meta-batch with each task's weights: ``folded(weights, x)`` with ``weights[name]`` of
    shape ``(T, *parameter.shape)`` and ``x`` of shape ``(T, N, ...)``; returns ``(T, N, ...)``.

    Every parameter of the network must be in ``weights`` (expand a shared one: ``p.expand(T, *p.shape)``).
    Built by :func:`fold`, which turns the traced graph into a list of plain Python steps once, so a call
    touches no ``torch.fx`` object (and :func:`torch.compile` can trace it). ``channels_last`` keeps folded
    image maps channels-last: on CPUs max-pooling many channels is about 10x faster so.
    """

    def __init__(self, model: nn.Module, graph: fx.GraphModule, channels_last: bool = True) -> None:
        self.model = model
        self.channels_last = channels_last
        modules = dict(model.named_modules())
        position: dict[fx.Node, int] = {}
        self.steps: list[Callable[[list[_Value], Weights, int], _Value]] = []
        self.output = 0
        for node in graph.graph.nodes:
            if node.op == "placeholder":
                position[node] = 0
                continue
            if node.op == "output":
                self.output = position[node.args[0]]
                break
            source = position[node.args[0]]
            if node.op == "call_module":
                module = modules[str(node.target)]
                step = functools.partial(_module_step, FOLDABLE[type(module)], module, f"{node.target}.", source)
            else:
                name = _FUNCTIONS.get(node.target, node.target)
                step = functools.partial(_function_step, name, source, tuple(node.args[1:]), dict(node.kwargs))
            self.steps.append(step)
            position[node] = len(self.steps)

    def __call__(self, weights: Weights, x: Tensor) -> Tensor:
        tasks = x.shape[0]
        if x.dim() >= 4:  # (T, N, C, ...) images: task t's channels are t*C .. (t+1)*C
            maps = x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])
            if x.dim() == 5 and self.channels_last:
                maps = maps.contiguous(memory_format=torch.channels_last)
            values = [_Value(maps, x.shape[2])]
        else:
            values = [_Value(x, None)]
        for step in self.steps:
            values.append(step(values, weights, tasks))
        return _unfold(values[self.output], tasks)


def _module_step(layer: Layer, module: nn.Module, prefix: str, source: int, values: list[_Value], weights: Weights, tasks: int) -> _Value:
    return layer(module, prefix, weights, values[source], tasks)


def _function_step(
    name: str, source: int, args: tuple[Any, ...], kwargs: dict[str, Any], values: list[_Value], weights: Weights, tasks: int
) -> _Value:
    x = values[source]
    if name == "flatten":
        return _flatten_value(x, tasks, *args, **kwargs)
    return _Value(torch.relu(x.tensor) if name == "relu" else torch.tanh(x.tensor), x.channels)


def _unfold(value: _Value, tasks: int) -> Tensor:
    """Returns the network's output with its task dimension first: ``(T, N, ...)``."""
    if value.channels is None:
        return value.tensor
    t = value.tensor
    return t.reshape(t.shape[0], tasks, value.channels, *t.shape[2:]).transpose(0, 1)


def try_fold(model: nn.Module) -> tuple[FoldedModel | None, list[str]]:
    """Returns ``model`` folded and no problems, or None and why it cannot be folded (tracing it once)."""
    graph, problems = _trace(model)
    return (None if graph is None else FoldedModel(model, graph)), problems


def fold(model: nn.Module) -> FoldedModel:
    """Returns ``model`` folded (see the module's docstring).

    Raises:
        ValueError: naming what cannot be folded (:func:`fold_problems`).
    """
    graph, problems = _trace(model)
    if graph is None:
        raise ValueError(f"{type(model).__name__} cannot run with tasks folded into channels: {'; '.join(problems)}")
    return FoldedModel(model, graph)
