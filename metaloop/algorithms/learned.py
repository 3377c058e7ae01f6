"""Learned inner hyperparameters: which adapted parameters share one learned value, and its shape."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["Learned", "Shared", "PerLayer", "PerTensor", "PerElement", "PerStep", "is_number_or_tuple"]


class Learned(abc.ABC):
    """Says how one inner hyperparameter is learned: which adapted parameters share a value, and its start.

    Subclasses differ in :meth:`key` (parameters with the same key share one learned value) and
    :meth:`shape` (the shape of that value). ``init`` is the initial value (a number, or a tuple
    for tuple hyperparameters such as Adam's ``betas``); None starts from the inner optimizer's
    configured value. Values are raw ``nn.Parameter``s, unconstrained, as in Meta-SGD.
    """

    def __init__(self, init: float | Sequence[float] | None = None) -> None:
        self.init = init

    @abc.abstractmethod
    def key(self, name: str) -> str:
        """Returns the name of the value that parameter ``name`` uses ("" for one shared value)."""

    def shape(self, param: Tensor) -> tuple[int, ...]:
        """Returns the shape of the value parameter ``param`` uses."""
        return ()

    def elementwise(self) -> bool:
        """True if the value holds one entry per element of its parameter (resized with a classifier head's rows)."""
        return False

    def steps(self) -> int | None:
        """Returns the number of inner steps with a value each (a leading dimension), or None for one value for all steps."""
        return None


class Shared(Learned):
    """One learned value for every adapted parameter (a learned inner learning rate, Adam's betas)."""

    def key(self, name: str) -> str:
        return ""


class PerLayer(Learned):
    """One learned scalar per layer: the parameters of one module (``conv.weight``, ``conv.bias``) share it."""

    def key(self, name: str) -> str:
        return name.rpartition(".")[0]


class PerTensor(Learned):
    """One learned scalar per parameter tensor."""

    def key(self, name: str) -> str:
        return name


class PerElement(PerTensor):
    """One learned value per element of every adapted parameter: Meta-SGD (Li et al. 2017)."""

    def shape(self, param: Tensor) -> tuple[int, ...]:
        return tuple(param.shape)

    def elementwise(self) -> bool:
        return True


class PerStep(Learned):
    """One learned value per inner step of what ``inner`` learns: a leading dimension of ``steps``.

    MAML++'s LSLR is ``PerStep(PerLayer(), steps)``: one learning rate per layer and inner step. Inner
    step ``k`` uses row ``min(k, steps - 1)`` (see :meth:`metaloop.algorithms.MetaLightningModule.step_hparams`).
    """

    def __init__(self, inner: Learned, steps: int) -> None:
        super().__init__(inner.init)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r}: per-step values need at least one inner step")
        self.inner, self._steps = inner, steps

    def key(self, name: str) -> str:
        return self.inner.key(name)

    def shape(self, param: Tensor) -> tuple[int, ...]:
        return (self._steps, *self.inner.shape(param))

    def elementwise(self) -> bool:
        return self.inner.elementwise()

    def steps(self) -> int | None:
        return self._steps


def is_number_or_tuple(value: Any) -> bool:
    """True for a real number, a floating-point tensor, or a non-empty tuple of those (``betas``): what can be learned."""
    values = value if isinstance(value, tuple) else (value,)
    return bool(values) and all(
        (isinstance(v, (int, float)) and not isinstance(v, bool)) or (isinstance(v, Tensor) and v.is_floating_point())
        for v in values
    )
