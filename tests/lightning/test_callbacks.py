"""The run callbacks of metaloop/lightning/callbacks.py: the non-finite guard and the meta-step timer."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import lightning
import pytest
import torch

from metaloop.algorithms import InnerOptions
from metaloop.lightning import MLP, MetaDataModule, MetaLightningModule, Regression
from metaloop.lightning.callbacks import MetaStepTimer, NonFiniteError, StopOnNonFinite
from metaloop.tasks import SinusoidTasks


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_the_guard_stops_exactly_on_a_nan_or_infinite_gradient(bad):
    model = MLP()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e30)  # huge but finite: no false alarm (an L2 norm would overflow)
    if bad is not None:
        model.features[0].weight.grad[3, 0] = bad
    trainer = SimpleNamespace(global_step=4)
    if bad is None:
        StopOnNonFinite().on_before_optimizer_step(trainer, model, None)  # type: ignore[arg-type]
        return
    with pytest.raises(NonFiniteError, match=r"meta-step 5: the meta-gradient of features.0.weight is NaN or infinite"):
        StopOnNonFinite().on_before_optimizer_step(trainer, model, None)  # type: ignore[arg-type]


def test_the_timer_counts_meta_steps_after_the_first_and_leaves_validation_out(tmp_path):
    torch.manual_seed(0)
    module = MetaLightningModule(MLP(), Regression(), InnerOptions(), functools.partial(torch.optim.SGD, lr=0.01), functools.partial(torch.optim.Adam, lr=1e-3))
    data = MetaDataModule(SinusoidTasks(), meta_batch_size=2, eval_meta_batch_size=2, num_val_tasks=2, num_test_tasks=0)
    timer = MetaStepTimer()
    assert math.isnan(timer.rate)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=5, val_check_interval=2, check_val_every_n_epoch=None,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                callbacks=[timer], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert timer.steps == 4 and timer.seconds > 0 and timer.rate == timer.steps / timer.seconds
    assert timer._paused_at is None
