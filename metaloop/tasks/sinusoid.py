"""Sinusoid regression tasks of Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning", section 5.1."""

from __future__ import annotations

import math

import torch

from metaloop.tasks.episodes import Task

__all__ = ["AMPLITUDE_RANGE", "PHASE_RANGE", "X_RANGE", "SinusoidTasks"]

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


def _uniform(bounds: tuple[float, float], shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator)


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
