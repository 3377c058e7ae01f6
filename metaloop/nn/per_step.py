"""Layers with a part per inner step: MAML++'s per-step BatchNorm (its conv net is :class:`metaloop.nn.PerStepConv4`).

Antoniou, Edwards & Storkey (2019), "How to train your MAML", ICLR, section 4: BatchNorm weights
and biases per inner step (BNWB) and running statistics per inner step (BNRS). A step-indexed
layer takes the index ``step`` of the weights it runs with: ``step = k`` is the network after
``k`` inner updates (``0`` the initial weights), so a net adapted with ``steps`` updates has
``steps + 1`` slots: the support pass of update ``k`` and the query pass after update ``k`` use
slots ``k`` and ``k + 1``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloop.typed import AtLeast, Hint

EvalStats = Annotated[
    Literal["running", "batch"], Hint("what normalises in evaluation: the step's running statistics or the batch's")
]
#: the inner steps a per-step BatchNorm holds weights and statistics for (``steps + 1`` sets)
Steps = Annotated[int, AtLeast(1), Hint("the inner steps of the per-step BatchNorm, ${inner.steps}")]

__all__ = ["PerStepBatchNorm2d"]


class PerStepBatchNorm2d(nn.Module):
    """Returns BatchNorm of ``(n, C, H, W)`` inputs with the weights and statistics of inner step ``step``.

    Args:
        num_features: the channels ``C``.
        steps: the inner steps the net is trained with: ``steps + 1`` slots (see the module docstring).
            Steps past the last slot use the last one (evaluation with more steps than training).
        per_step_weights: BNWB: a weight and a bias per slot, ``(steps + 1, C)``; else one ``(C,)`` pair.
        per_step_stats: BNRS: running mean and variance per slot (buffers ``(steps + 1, C)``), updated
            by the slot's batches in training mode. False keeps none: the statistics of the batch
            normalise in training and evaluation alike (as :class:`~metaloop.nn.Conv4`).
        eval_stats: with ``per_step_stats``, what normalises in evaluation mode (``eval()``):
            ``"running"``, the slot's running statistics, as the paper describes BNRS; ``"batch"``, the
            batch's own (transductive, as in training), which is what the authors' code does (it
            collects the per-step statistics but always normalises with the batch's).
        momentum: as :class:`torch.nn.BatchNorm2d`'s.
        eps: as :class:`torch.nn.BatchNorm2d`'s.

    Raises:
        ValueError: for ``steps < 1``, ``num_features < 1`` or another ``eval_stats``.
    """

    #: meta-learned (per inner step with ``per_step_weights``), never adapted by an inner loop
    inner_frozen = True

    def __init__(
        self,
        num_features: int,
        steps: Steps,
        per_step_weights: bool = True,
        per_step_stats: bool = True,
        eval_stats: EvalStats = "running",
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if eval_stats not in ("running", "batch"):
            raise ValueError(f"eval_stats={eval_stats!r} is not one of 'running' (the step's statistics), 'batch' (transductive)")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r}: a per-step BatchNorm needs the number of inner steps (>= 1), e.g. inner.steps")
        if num_features < 1:
            raise ValueError(f"num_features={num_features} must be >= 1 (the input's channels)")
        self.num_features, self.steps, self.momentum, self.eps = num_features, steps, momentum, eps
        self.per_step_weights, self.per_step_stats, self.eval_stats = per_step_weights, per_step_stats, eval_stats
        shape = (steps + 1, num_features) if per_step_weights else (num_features,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        if per_step_stats:
            self.register_buffer("running_mean", torch.zeros(steps + 1, num_features))
            self.register_buffer("running_var", torch.ones(steps + 1, num_features))

    def slot(self, step: int) -> int:
        """Returns the slot that inner step ``step`` uses: ``step``, at most ``steps``."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0 (the number of inner updates the weights have had)")
        return min(step, self.steps)

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        slot = self.slot(step)
        weight, bias = (self.weight[slot], self.bias[slot]) if self.per_step_weights else (self.weight, self.bias)
        if not self.per_step_stats or (not self.training and self.eval_stats == "batch"):
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)
        # indexing a buffer's row gives a view: training updates the slot's statistics in place
        return F.batch_norm(
            x, self.running_mean[slot], self.running_var[slot], weight, bias,
            training=self.training, momentum=self.momentum, eps=self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, steps={self.steps}, per_step_weights={self.per_step_weights}, "
            f"per_step_stats={self.per_step_stats}, eval_stats={self.eval_stats!r}, momentum={self.momentum}, eps={self.eps}"
        )
