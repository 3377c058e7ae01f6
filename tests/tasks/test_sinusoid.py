from __future__ import annotations

import math

import pytest
import torch

from metaloop.tasks import SinusoidTasks, sample_meta_batch, sample_task, stack_tasks


def fit_sinusoid(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (amplitude, phase) of each task's ``y = A sin(x - phase)``, by least squares on (sin x, -cos x)."""
    x, y = x.double(), y.double()
    design = torch.cat([torch.sin(x), -torch.cos(x)], dim=-1)  # A sin(x - p) = A cos p sin x - A sin p cos x
    a, b = torch.linalg.lstsq(design, y).solution.squeeze(-1).unbind(-1)
    return torch.hypot(a, b), torch.atan2(b, a)


def test_shapes_and_dtype() -> None:
    task = SinusoidTasks(k_shots=5, k_queries=7)("train", torch.Generator().manual_seed(0))
    assert [tuple(field.shape) for field in task] == [(5, 1), (5, 1), (7, 1), (7, 1)]
    assert all(field.dtype == torch.float32 for field in task)


def test_distribution_matches_finn_et_al() -> None:
    batch = sample_meta_batch(SinusoidTasks(k_shots=10, k_queries=10), "train", seed=0, indices=range(2000))
    amplitude, phase = fit_sinusoid(batch.support_x, batch.support_y)
    # amplitude ~ U[0.1, 5.0], phase ~ U[0, pi]: inside the ranges, reaching near both ends, mean at the middle
    assert 0.1 - 1e-4 <= float(amplitude.min()) < 0.11 and 4.99 < float(amplitude.max()) <= 5.0 + 1e-4
    assert -1e-4 <= float(phase.min()) < 0.01 and math.pi - 0.01 < float(phase.max()) <= math.pi + 1e-4
    assert abs(float(amplitude.mean()) - 2.55) < 0.1 and abs(float(phase.mean()) - math.pi / 2) < 0.06
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    assert -5.0 <= float(x.min()) < -4.99 and 4.99 < float(x.max()) <= 5.0
    assert abs(float(x.mean())) < 0.05 and abs(float(x.var()) - 100 / 12) < 0.1
    # query points come from the same function as the support points
    query_amplitude, query_phase = fit_sinusoid(batch.query_x, batch.query_y)
    assert torch.allclose(query_amplitude, amplitude, atol=1e-4) and torch.allclose(query_phase, phase, atol=1e-3)


def test_test_set_is_fixed_and_apart_from_training() -> None:
    tasks = SinusoidTasks()
    first = sample_meta_batch(tasks, "test", seed=0, indices=range(600))
    again = sample_meta_batch(SinusoidTasks(), "test", seed=0, indices=range(600))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first.support_x.shape == (600, 10, 1)
    train = sample_meta_batch(tasks, "train", seed=0, indices=range(600))
    test_inputs = {task.numpy().tobytes() for task in first.support_x}
    assert not any(task.numpy().tobytes() in test_inputs for task in train.support_x)


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="k_shots=0 and k_queries=10 must both be at least 1"):
        SinusoidTasks(k_shots=0)


@pytest.mark.parametrize("k_shots,k_queries", [(10, 10), (5, 10), (1, 1), (50, 50), (10, 300)])
def test_a_meta_batch_in_one_call_is_bit_identical_to_stacked_single_tasks(k_shots: int, k_queries: int) -> None:
    tasks = SinusoidTasks(k_shots, k_queries)
    batched = sample_meta_batch(tasks, "train", 3, range(40, 77), stream=1)
    single = stack_tasks([sample_task(tasks, "train", 3, i, stream=1) for i in range(40, 77)])
    assert all(torch.equal(a, b) for a, b in zip(batched, single))
