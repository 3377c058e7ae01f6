"""Gradient transforms: trainable modules that map a parameter's gradient to its update.

A *transform factory* is a callable ``factory(param) -> nn.Module | None`` that builds the
transform for one parameter (None: use the gradient unchanged). :class:`ModuleTransform`
and :class:`KroneckerTransform` are factories (learn2learn's names); :class:`MetaCurvatureTransform`
is a module built directly from a parameter, so the class itself is a factory. The
optimizers of :mod:`metaloop.transforms` call a factory once per parameter and own the
resulting modules, whose parameters an outer optimizer trains.

Each factory places the module on the parameter's device and dtype (learn2learn left it
in the default dtype), so float64 models get float64 transforms.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from metaloop.nn.kronecker import KroneckerLinear, kronecker_matvec
from metaloop.optim.rules import apply_transform, check_update

__all__ = [
    "TransformFactory",
    "apply_transform",
    "build_transforms",
    "ReshapedTransform",
    "ModuleTransform",
    "KroneckerTransform",
    "MetaCurvatureTransform",
]

TransformFactory = Callable[[Tensor], nn.Module | None]


def build_transforms(factory: TransformFactory, named_params: Iterable[tuple[str, Tensor]]) -> nn.ModuleList:
    """Returns ``factory(p)`` for each named parameter, as a ModuleList (``nn.Identity()`` where it gives None).

    Raises:
        TypeError: if ``factory`` is not callable or returns something other than a Module or None.
        ValueError: if the factory rejects a parameter (e.g. a Kronecker class and a scalar);
            the message names the parameter.
    """
    if not callable(factory):
        raise TypeError(
            f"transform must be callable as transform(param) -> nn.Module (e.g. KroneckerTransform(KroneckerLinear) "
            f"or MetaCurvatureTransform), got {factory!r}"
        )
    modules = []
    for name, p in named_params:
        try:
            module = factory(p)
        except ValueError as err:
            raise ValueError(f"cannot build a transform for parameter {name!r} of shape {tuple(p.shape)}: {err}") from err
        if module is None:
            module = nn.Identity()
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"the transform factory returned {type(module).__name__} for parameter {name!r}; it must "
                "return an nn.Module (or None to leave that parameter's gradient unchanged)"
            )
        modules.append(module)
    return nn.ModuleList(modules)


def _place_like(module: nn.Module, param: Tensor) -> nn.Module:
    """Returns ``module`` moved to ``param``'s device and (floating) dtype."""
    if param.is_floating_point():
        return module.to(device=param.device, dtype=param.dtype)
    return module.to(device=param.device)


class ReshapedTransform(nn.Module):
    """Applies ``transform`` to the gradient viewed as ``shape``, and returns the result in the gradient's shape.

    Raises ``ValueError`` (naming both shapes) if the inner transform changes the shape.
    """

    def __init__(self, transform: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        self.transform = transform
        self.in_shape = tuple(shape)

    def forward(self, grad: Tensor) -> Tensor:
        """Returns ``transform(grad.reshape(shape)).reshape(grad.shape)``."""
        x = grad.reshape(self.in_shape)
        gradient = f"a gradient of shape {tuple(grad.shape)} viewed as {self.in_shape}"
        y = check_update(self.transform(x), x, type(self.transform).__name__, gradient)
        return y.reshape(grad.shape)


class ModuleTransform:
    """A factory of ``module_cls(numel, numel)`` transforms acting on the flattened gradient.

    For a parameter of ``numel`` entries it builds ``module_cls(numel, numel)`` and feeds it
    the gradient reshaped to ``(1, numel)`` (``ModuleTransform(nn.Linear)``: a dense learned
    ``numel x numel`` preconditioner plus bias). This costs ``numel^2`` values per parameter;
    :class:`KroneckerTransform` scales to large layers.
    """

    def __init__(self, module_cls: Callable[[int, int], nn.Module]) -> None:
        if not callable(module_cls):
            raise TypeError(
                f"module_cls must be callable as module_cls(numel, numel) -> nn.Module (e.g. torch.nn.Linear), "
                f"got {module_cls!r}"
            )
        self.module_cls = module_cls

    def __repr__(self) -> str:
        return f"ModuleTransform({getattr(self.module_cls, '__name__', self.module_cls)})"

    def __call__(self, param: Tensor) -> ReshapedTransform:
        """Returns the transform for ``param``'s gradient."""
        numel = param.numel()
        module = self.module_cls(numel, numel)
        if not isinstance(module, nn.Module):
            raise TypeError(f"module_cls({numel}, {numel}) returned {type(module).__name__}; it must return an nn.Module")
        return _place_like(ReshapedTransform(module, (1, numel)), param)


class KroneckerTransform:
    """A factory of Kronecker-factored transforms (Arnold et al. 2019): one factor per dimension of the gradient.

    ``kronecker_cls`` (e.g. :class:`~metaloop.nn.KroneckerLinear`,
    :class:`~metaloop.nn.KroneckerConv2d`) says through its ``kronecker_dims(shape)``
    how it views each parameter; for a weight (n, m) a ``KroneckerLinear`` holds factors
    (n, n) and (m, m), not one (nm, nm) matrix, and starts as the identity, so the first
    inner step is plain SGD. A class without ``kronecker_dims`` is treated as
    learn2learn's: two factors, dimensions from ``KroneckerLinear.kronecker_dims``. The
    module is built as ``kronecker_cls(*dims, bias=bias, psd=psd)``; ``psd=True`` keeps the
    preconditioner positive semi-definite.
    """

    def __init__(self, kronecker_cls: Callable[..., nn.Module], bias: bool = False, psd: bool = True) -> None:
        if not callable(kronecker_cls):
            raise TypeError(
                f"kronecker_cls must be a Kronecker module class such as metaloop.nn.KroneckerLinear, got {kronecker_cls!r}"
            )
        self.kronecker_cls = kronecker_cls
        self.bias = bias
        self.psd = psd

    def __repr__(self) -> str:
        name = getattr(self.kronecker_cls, "__name__", self.kronecker_cls)
        return f"KroneckerTransform({name}, bias={self.bias}, psd={self.psd})"

    def __call__(self, param: Tensor) -> ReshapedTransform:
        """Returns the transform for ``param``'s gradient.

        Raises:
            ValueError: if ``kronecker_cls`` cannot factor a parameter of this shape.
        """
        dims_of = getattr(self.kronecker_cls, "kronecker_dims", KroneckerLinear.kronecker_dims)
        dims = dims_of(param.shape)
        module = self.kronecker_cls(*dims, bias=self.bias, psd=self.psd)
        return _place_like(ReshapedTransform(module, dims), param)


class MetaCurvatureTransform(nn.Module):
    """Meta-Curvature (Park & Oliva 2019): the gradient multiplied along each mode by a learned matrix.

    For a weight of shape ``(out, in, *kernel)`` the gradient ``G`` viewed as
    ``(out, in, f)`` (``f = prod(kernel)``) becomes ``lr * G x_1 M_o x_2 M_i x_3 M_f``
    (a mode-wise tensor product, :func:`~metaloop.nn.kronecker_matvec`), with ``M_o``
    (out, out), ``M_i`` (in, in), ``M_f`` (f, f). A linear weight (out, in) has ``M_o`` and
    ``M_i`` (``M_o G M_i^T``), a bias (n,) one ``M_o`` (n, n). All start as the identity, so
    the first step is plain SGD. ``lr`` scales the update and is not learned.
    """

    def __init__(self, param: Tensor, lr: float = 1.0) -> None:
        super().__init__()
        shape = tuple(param.shape)
        if len(shape) == 0:
            raise ValueError(
                f"MetaCurvatureTransform needs a parameter of rank >= 1, got shape {shape}; give scalars no "
                "transform (return None from the transform factory)"
            )
        self.param_shape = shape
        self.dims = shape if len(shape) <= 2 else (shape[0], shape[1], math.prod(shape[2:]))
        self.lr = lr
        self._names = ("m_o", "m_i", "m_f")[: len(self.dims)]
        for name, d in zip(self._names, self.dims):
            self.register_parameter(name, nn.Parameter(torch.eye(d, device=param.device, dtype=param.dtype)))

    def forward(self, grad: Tensor) -> Tensor:
        """Returns ``lr * G x_1 M_o x_2 M_i x_3 M_f`` in ``grad``'s shape."""
        if tuple(grad.shape) != self.param_shape:
            raise ValueError(
                f"MetaCurvatureTransform was built for a parameter of shape {self.param_shape} but got a "
                f"gradient of shape {tuple(grad.shape)}"
            )
        factors = [getattr(self, name) for name in self._names]
        return kronecker_matvec(factors, grad.reshape(self.dims)).reshape(grad.shape) * self.lr
