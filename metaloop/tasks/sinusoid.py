"""Sinusoid regression tasks of Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning", section 5.1."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from metaloop.tasks.episodes import Task

__all__ = ["AMPLITUDE_RANGE", "PHASE_RANGE", "X_RANGE", "SinusoidTasks"]

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


def _uniform(bounds: tuple[float, float], shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return _uniform_of(bounds, torch.rand(shape, generator=generator))


def _uniform_of(bounds: tuple[float, float], unit: torch.Tensor) -> torch.Tensor:
    """Returns ``unit`` (draws from U[0, 1)) mapped to U[low, high)."""
    low, high = bounds
    return low + (high - low) * unit


class SinusoidTasks:
    """Returns a sinusoid regression task ``y = A sin(x - phase)`` when called as ``tasks(split, generator)``.

    As in Finn et al. (2017): amplitude ``A ~ U[0.1, 5.0]``, phase ``~ U[0, pi]``, inputs
    ``x ~ U[-5, 5]``; the ``k_shots`` support points and ``k_queries`` query points are independent
    draws of ``x`` from the same function. Fields have shape ``(k, 1)``, float32. Every split draws
    from the same distribution; the splits differ by their task seeds, so a fixed test set is
    ``sample_meta_batch(tasks, "test", seed, range(600))`` (``MetaDataModule`` does this).
    """

    def __init__(self, k_shots: int = 10, k_queries: int = 10) -> None:
        if k_shots < 1 or k_queries < 1:
            raise ValueError(f"k_shots={k_shots} and k_queries={k_queries} must both be at least 1; pass positive counts")
        self.k_shots = k_shots
        self.k_queries = k_queries

    def __call__(self, split: str, generator: torch.Generator) -> Task:
        amplitude = _uniform(AMPLITUDE_RANGE, (), generator)
        phase = _uniform(PHASE_RANGE, (), generator)
        x = _uniform(X_RANGE, (self.k_shots + self.k_queries, 1), generator)
        y = amplitude * torch.sin(x - phase)
        return Task(x[: self.k_shots], y[: self.k_shots], x[self.k_shots :], y[self.k_shots :])

    def batch(self, split: str, generators: Sequence[torch.Generator]) -> Task:
        """Returns the meta-batch of one task per generator: the same draws and values as stacking single calls.

        Each generator draws what :meth:`__call__` draws, in the same order; the arithmetic then
        runs once over the meta-batch (a few operations instead of a few per task: task sampling
        was a third of a sinusoid meta-step's time).
        """
        k = self.k_shots + self.k_queries
        draws = [(torch.rand((), generator=g), torch.rand((), generator=g), torch.rand((k, 1), generator=g)) for g in generators]
        amplitude = _uniform_of(AMPLITUDE_RANGE, torch.stack([d[0] for d in draws]).view(-1, 1, 1))
        phase = _uniform_of(PHASE_RANGE, torch.stack([d[1] for d in draws]).view(-1, 1, 1))
        x = _uniform_of(X_RANGE, torch.stack([d[2] for d in draws]))
        y = amplitude * torch.sin(x - phase)
        return Task(x[:, : self.k_shots], y[:, : self.k_shots], x[:, self.k_shots :], y[:, self.k_shots :])
