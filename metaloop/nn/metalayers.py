"""Wrap parts of a model with learnable machinery: ``MetaModule`` substitutes submodules, ``ParameterTransform`` reparametrises weights.

``MetaModule(model, {nn.Linear: lambda lin: ParameterTransform(lin, lambda p: Scale())})``
freezes ``model`` and learns only a transform of each linear layer's weights (LoRA-like
constrained updates); ``meta_parameters()`` yields the transforms' parameters alone.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["MetaModule", "ParameterTransform"]


class ParameterTransform(nn.Module):
    """Calls ``module`` with each parameter ``p`` replaced by ``T_p(p)``, where ``T_p = transform(p)`` is built once.

    The module's own parameters are never modified: the forward pass runs
    ``torch.func.functional_call`` with the transformed tensors. ``meta_parameters()``
    yields the transforms' parameters.
    """

    def __init__(self, module: nn.Module, transform: Callable[[Tensor], Callable[[Tensor], Tensor]]) -> None:
        super().__init__()
        self.module = module
        self.transform = transform
        self._parameter_names = [name for name, _ in module.named_parameters()]
        # ModuleDict keys cannot hold dots, so nested parameter names are stored with "-".
        self.parameter_transforms = nn.ModuleDict(
            {name.replace(".", "-"): _as_module(transform(p)) for name, p in module.named_parameters()}
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = dict(self.module.named_parameters())
        transformed = {
            name: self.parameter_transforms[name.replace(".", "-")](params[name]) for name in self._parameter_names
        }
        return functional_call(self.module, transformed, args, kwargs)

    def meta_parameters(self) -> Iterator[nn.Parameter]:
        """Yields the parameters of the transforms (not of the wrapped module)."""
        yield from self.parameter_transforms.parameters()


class MetaModule(nn.Module):
    """Wraps ``module`` after replacing each submodule whose type is in ``substitutions`` by ``substitutions[type](sub)``.

    With ``freeze_module`` (default) the original parameters get ``requires_grad=False``, so
    only what the substitutions add is trained. ``module()`` returns the original module
    (substitutions that hold it as ``.module`` are unwrapped); ``meta_parameters()`` yields
    the parameters of every ``ParameterTransform``-like substitution.
    """

    def __init__(
        self,
        module: nn.Module,
        substitutions: Mapping[type, Callable[[nn.Module], nn.Module]],
        freeze_module: bool = True,
    ) -> None:
        super().__init__()
        self.substitutions = dict(substitutions)
        self.freeze_module = freeze_module
        self.wrapped_module = self._wrap(module)

    def _wrap(self, module: nn.Module) -> nn.Module:
        new_module = module
        if type(module) in self.substitutions:
            new_module = self.substitutions[type(module)](module)
        for name, child in module.named_children():
            new_module._modules[name] = self._wrap(child)
        if self.freeze_module:
            for p in module._parameters.values():
                if p is not None:
                    p.requires_grad_(False)
        return new_module

    def _unwrap(self, module: nn.Module) -> nn.Module:
        base = module.module if isinstance(getattr(module, "module", None), nn.Module) else module
        for name, child in base.named_children():
            base._modules[name] = self._unwrap(child)
        return base

    def meta_parameters(self, module: nn.Module | None = None) -> Iterator[nn.Parameter]:
        """Yields the parameters that substitutions expose through their own ``meta_parameters()``."""
        module = self.wrapped_module if module is None else module
        if module is not self and hasattr(module, "meta_parameters"):
            yield from module.meta_parameters()
        for child in module.children():
            yield from self.meta_parameters(child)

    def module(self) -> nn.Module:
        """Returns the original module, with substitutions that wrap a ``.module`` removed (in place)."""
        return self._unwrap(self.wrapped_module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped_module(*args, **kwargs)


class _Function(nn.Module):
    """A plain callable as a module (no parameters), so a transform may be a function."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _as_module(transform: Callable[[Tensor], Tensor]) -> nn.Module:
    """Returns ``transform`` if it is a module, else a parameterless module calling it."""
    if isinstance(transform, nn.Module):
        return transform
    if not callable(transform):
        raise TypeError(
            f"ParameterTransform's transform(param) returned {type(transform).__name__}; it must return a module "
            "or a callable mapping the parameter to its replacement"
        )
    return _Function(transform)
