"""Metrics of evaluation over many tasks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MeanWithConfidence"]


class MeanWithConfidence(Metric):
    """Returns ``(mean, half-width of the 95% confidence interval)`` of the values seen: ``1.96 * std / sqrt(n)``.

    ``std`` is the sample standard deviation; states are sums, so DDP ranks merge exactly.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        values = values.detach().to(torch.float64).flatten()
        self.total += values.sum()
        self.squares += (values * values).sum()
        self.count += values.numel()

    def compute(self) -> tuple[Tensor, Tensor]:
        mean = self.total / self.count
        variance = ((self.squares - self.count * mean * mean) / (self.count - 1)).clamp(min=0)
        return mean, 1.96 * torch.sqrt(variance / self.count)
