"""MeanWithConfidence: the mean and 95% confidence half-width of evaluation values."""

from __future__ import annotations

import math

import pytest
import torch

from metaloop.lightning import MeanWithConfidence


def test_mean_with_confidence():
    metric = MeanWithConfidence()
    metric.update(torch.tensor([1.0, 2.0]))
    metric.update(torch.tensor([3.0, 4.0]))
    mean, half_width = metric.compute()
    assert float(mean) == pytest.approx(2.5)
    assert float(half_width) == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)


def test_constant_values_have_zero_width_and_float64_sums():
    metric = MeanWithConfidence()
    metric.update(torch.full((3,), 0.1, dtype=torch.float32))
    mean, half_width = metric.compute()
    assert mean.dtype == torch.float64 and float(mean) == pytest.approx(0.1, abs=1e-7)
    assert float(half_width) == pytest.approx(0.0, abs=1e-6)
