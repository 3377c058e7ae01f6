"""The inner loop's options, one typed object every gradient-based learner takes: ``inner=InnerOptions(steps=5)``.

The configuration's ``inner:`` node is this object (``module: {inner: ${inner}}``), so an option is
declared once, here, with its type, range and choices in its hint; the command line's schema
(:mod:`metaloop.cli.schema`) derives its checks from these hints (:func:`metaloop.typed.keys_of`), and a
new option reaches every learner without touching any of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from metaloop.optim.implicit import ImplicitOptions
from metaloop.optim.loop import truncation_start
from metaloop.typed import REGEX, AtLeast, Hint, check_fields

__all__ = ["InnerOptions", "BatchTasks", "MetaGrad"]

BatchTasks = Literal["auto", "vmap", "sequential", "fold"]
MetaGrad = Literal["unrolled", "truncated", "implicit"]


@dataclass(frozen=True)
class InnerOptions:
    """How a learner adapts to a task: steps, order, adapted parameters, batching and meta-gradient mode.

    Args:
        steps: inner steps per task in meta-training.
        eval_steps: inner steps in validation, test and ``adapt`` (None: ``steps``).
        lr: the inner optimizer's learning rate; None keeps the one ``inner_optim`` was given.
        first_order: drop second-order terms (first-order MAML).
        params: a regular expression searched in each parameter name; only matching parameters adapt
            (ANIL: ``"^head\\."``; BOIL: ``"^features\\."``). None: the learner's default (every parameter;
            CAVIA: the context parameters).
        batch_tasks: ``"fold"`` adapts a meta-batch at once with the tasks folded into channels (one network
            call per step: grouped convolutions, per-task BatchNorm statistics; :mod:`metaloop.algorithms.folding`),
            ``"vmap"`` under :func:`torch.func.vmap` (one backward), ``"sequential"`` task by task (memory of
            one task); ``"auto"`` picks the fastest exact one per device and model
            (:data:`metaloop.algorithms.inner.AUTO_BATCHING`). All three give the same numbers.
        meta_grad: ``"unrolled"`` (through every inner step), ``"truncated"`` (the last ``truncate`` steps)
            or ``"implicit"`` (iMAML: the implicit function theorem on a proximal inner problem).
        truncate: the number of last inner steps backpropagated through with ``meta_grad="truncated"``.
        implicit: iMAML's proximal strength and linear solver (:class:`~metaloop.optim.implicit.ImplicitOptions`).

    Raises:
        ValueError: for a value outside its hint, a ``truncate`` outside ``1..steps`` or without
            ``meta_grad="truncated"``, or ``first_order`` with a meta-gradient mode other than ``"unrolled"``.

    Examples:
        >>> InnerOptions(steps=5, first_order=True).eval_steps
        5
        >>> InnerOptions(steps=-1)
        Traceback (most recent call last):
        ...
        ValueError: steps=-1 is not accepted (it is below 0); use a whole number >= 0 (inner steps per task in meta-training)
    """

    steps: Annotated[int, AtLeast(0), Hint("inner steps per task in meta-training")] = 1
    eval_steps: Annotated[int | None, AtLeast(0), Hint("inner steps in validation, test and adapt")] = None
    lr: Annotated[float | None, Hint("the inner optimizer's learning rate")] = None
    first_order: bool = False
    params: Annotated[str | None, REGEX] = None
    batch_tasks: BatchTasks = "auto"
    meta_grad: MetaGrad = "unrolled"
    truncate: Annotated[
        int | None, AtLeast(1), Hint("the inner steps backpropagated through, with inner.meta_grad=truncated")
    ] = None
    implicit: ImplicitOptions = field(default_factory=ImplicitOptions)

    def __post_init__(self) -> None:
        if isinstance(self.implicit, Mapping):  # a configuration's node
            object.__setattr__(self, "implicit", ImplicitOptions(**self.implicit))
        check_fields(self)
        if self.eval_steps is None:
            object.__setattr__(self, "eval_steps", self.steps)
        if self.meta_grad == "truncated":
            if self.truncate is None:
                raise ValueError("meta_grad='truncated' needs truncate=k, the number of last inner steps to backpropagate through")
            truncation_start(self.steps, self.truncate)  # raises for a value outside 0..steps
        elif self.truncate is not None:
            raise ValueError(f"truncate={self.truncate!r} applies only with meta_grad='truncated' (got meta_grad={self.meta_grad!r})")
        if self.meta_grad != "unrolled" and self.first_order:
            raise ValueError(
                f"first_order=True drops the meta-gradient's second-order terms, which meta_grad={self.meta_grad!r} "
                "computes; use first_order=True with meta_grad='unrolled', or first_order=False"
            )

    @classmethod
    def of(cls, value: InnerOptions | Mapping[str, Any] | None) -> InnerOptions:
        """Returns ``value`` as options: itself, the options a mapping names (a configuration's ``inner`` node), or the defaults.

        Raises:
            ValueError: for a key that is not an option (naming the options), or a bad value.
        """
        if isinstance(value, InnerOptions):
            return value
        if value is None:
            return cls()
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"inner has no option {', '.join(map(repr, unknown))}; its options are {', '.join(names)}")
        return cls(**{k: dict(v) if isinstance(v, Mapping) else v for k, v in value.items()})
