"""Objectives: what a task is scored by (its loss, its metrics, and checks of a model's output against targets)."""

from __future__ import annotations

from typing import Protocol

import torch.nn.functional as F
from torch import Tensor

__all__ = ["Objective", "Classification", "Regression"]


class Objective(Protocol):
    """What a task is scored by: a loss, per-task metrics, and checks of a model's output against targets."""

    metric_names: tuple[str, ...]

    def loss(self, output: Tensor, target: Tensor) -> Tensor: ...

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, Tensor]: ...

    def output_size(self, target: Tensor) -> int | None: ...

    def check(self, output: Tensor, target: Tensor) -> None: ...


class Classification:
    """Cross-entropy of logits ``(n, classes)`` against integer labels ``(n,)``; metrics ``loss`` and ``acc``."""

    metric_names: tuple[str, ...] = ("loss", "acc")

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Returns the mean cross-entropy."""
        return F.cross_entropy(output, target)

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Returns ``{"loss": cross-entropy, "acc": fraction of argmax predictions equal to the label}``."""
        return {"loss": F.cross_entropy(output, target), "acc": (output.argmax(-1) == target).float().mean()}

    def output_size(self, target: Tensor) -> int:
        """Returns the number of classes (ways) of a task with labels ``target`` (``0 .. n-1``)."""
        return int(target.max()) + 1

    def check(self, output: Tensor, target: Tensor) -> None:
        """Raises ``ValueError`` unless ``output`` holds logits for every label of ``target``."""
        if target.is_floating_point():
            raise ValueError(
                f"the task's labels are floats (dtype {target.dtype}, shape {tuple(target.shape)}): a regression task; "
                "use a regression objective (objective: {_target_: metaloop.lightning.Regression}) and a regression model"
            )
        classes = self.output_size(target)
        if output.ndim != 2 or output.shape[0] != target.shape[0] or output.shape[1] < classes:
            raise ValueError(
                f"the model returns shape {tuple(output.shape)} for {target.shape[0]} examples of a {classes}-way task; "
                f"a classifier must return ({target.shape[0]}, {classes}): set the model's out_features to {classes}"
            )


class Regression:
    """Mean squared error of ``output`` against float targets of the same shape; metric ``loss``."""

    metric_names: tuple[str, ...] = ("loss",)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Returns the mean squared error."""
        return F.mse_loss(output, target)

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Returns ``{"loss": mean squared error}``."""
        return {"loss": F.mse_loss(output, target)}

    def output_size(self, target: Tensor) -> None:
        """Returns None: a regression head does not depend on the task."""
        return None

    def check(self, output: Tensor, target: Tensor) -> None:
        """Raises ``ValueError`` unless ``target`` is float and ``output`` has its shape."""
        if not target.is_floating_point():
            raise ValueError(
                f"the task's targets are integers (dtype {target.dtype}): a classification task; use a classification "
                "objective (objective: {_target_: metaloop.lightning.Classification}) and a classifier"
            )
        if output.shape != target.shape:
            raise ValueError(
                f"the model returns shape {tuple(output.shape)} for targets of shape {tuple(target.shape)}; "
                "a regression model must return the targets' shape (check the model's output size)"
            )
