"""batch_tasks="auto" (metaloop.algorithms.inner.exact_batchings, MetaLearner.measure_batching): a long run times every
exact path on its first meta-batch and keeps the fastest; the choice changes the speed, never the numbers."""

from __future__ import annotations

import functools

import lightning
import pytest
import torch

from metaloop.algorithms import Classification, InnerOptions, MetaLightningModule, base
from metaloop.algorithms.inner import AUTO_BATCHING, MEASURE_BATCHING_STEPS, exact_batchings, fastest
from metaloop.lightning import MetaDataModule
from metaloop.nn import Conv4
from metaloop.tasks import Task

SGD = functools.partial(torch.optim.SGD, lr=0.4)
#: an outer rule with state; not Adam, whose normalization lifts the round-off in a gradient that is exactly 0 (a conv bias
#: before BatchNorm) to 1e-9 of a step, so paths whose meta-gradients agree to rounding would differ in the weights
OUTER = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)


def _tasks(split: str, gen: torch.Generator) -> Task:
    x = torch.rand(10, 1, 28, 28, generator=gen, dtype=torch.float64)
    return Task(x[:5], torch.arange(5), x[5:], torch.arange(5))


def _fit(batch_tasks: str, tmp_path, steps: int = 3) -> MetaLightningModule:
    data = MetaDataModule(_tasks, meta_batch_size=3, num_val_tasks=0, num_test_tasks=0)
    torch.manual_seed(0)
    module = MetaLightningModule(Conv4(5, hidden=8), Classification(), InnerOptions(steps=2, batch_tasks=batch_tasks), SGD, OUTER).double()
    trainer = lightning.Trainer(accelerator="cpu", precision="64-true", max_steps=steps, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return module


def test_fastest_takes_the_least_time_and_the_first_listed_on_a_tie():
    assert fastest({"sequential": 0.7, "vmap": 0.5, "fold": 0.9}) == "vmap"
    assert fastest({"fold": 0.5, "vmap": 0.5}) == "fold"


def test_auto_lists_the_exact_paths_in_the_tables_order():
    model = Conv4(5, hidden=8)
    assert exact_batchings(model, "auto", False, "cpu", []) == AUTO_BATCHING[("cpu", "conv")]
    assert exact_batchings(model, "auto", False, "cpu", ["it has buffers"]) == ("sequential", "vmap")
    assert exact_batchings(model, "vmap", False, "cpu", []) == ("vmap",)


def test_a_long_auto_run_times_every_exact_path_and_trains_as_the_chosen_one(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "MEASURE_BATCHING_STEPS", 3)
    measured = _fit("auto", tmp_path)
    assert list(measured.batching_seconds) == list(AUTO_BATCHING[("cpu", "conv")])
    assert all(s > 0 for s in measured.batching_seconds.values())
    assert measured.batching == min(measured.batching_seconds, key=measured.batching_seconds.get)
    assert not measured.batching_trials  # measured once
    # the trial meta-gradients leave no trace: the weights equal a run on the chosen path, and task by task (float64)
    for path in {measured.batching, "sequential"}:
        torch.testing.assert_close(dict(measured.named_parameters()), dict(_fit(path, tmp_path).named_parameters()), rtol=0, atol=1e-10)


def test_short_runs_and_explicit_paths_are_not_measured(tmp_path, monkeypatch):
    assert MEASURE_BATCHING_STEPS >= 100  # the measurement (two meta-gradients per path) is about 1% of a run it runs in
    short = _fit("auto", tmp_path)
    assert short.batching == AUTO_BATCHING[("cpu", "conv")][0] and not short.batching_seconds
    monkeypatch.setattr(base, "MEASURE_BATCHING_STEPS", 3)
    assert not _fit("vmap", tmp_path).batching_seconds
