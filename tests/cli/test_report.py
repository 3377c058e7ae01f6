"""The learning-curve callback and the summary table of the ``metaloop`` command."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import lightning
import pytest
import torch

from metaloop.algorithms import InnerOptions
from metaloop.cli.report import LearningCurve, MetaStepProgressBar, clock, print_summary, remaining_seconds
from metaloop.lightning import MLP, MetaDataModule, MetaLightningModule, Regression
from metaloop.tasks import SinusoidTasks


def test_the_learning_curve_holds_every_step_and_each_validation(tmp_path, capsys):
    torch.manual_seed(0)
    module = MetaLightningModule(MLP([1, 8, 1]), Regression(), InnerOptions(), functools.partial(torch.optim.SGD, lr=0.01), functools.partial(torch.optim.Adam, lr=1e-3))
    datamodule = MetaDataModule(SinusoidTasks(5, 5), meta_batch_size=2, eval_meta_batch_size=4, num_val_tasks=4, num_test_tasks=4)
    curve = LearningCurve(tmp_path / "curve.png")
    logged = []

    class Record(lightning.Callback):
        def on_validation_end(self, trainer, pl_module):
            logged.append((trainer.global_step, float(trainer.callback_metrics["val/loss_post"])))

    trainer = lightning.Trainer(
        max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[curve, Record()],
    )
    trainer.fit(module, datamodule)
    assert [step for step, _ in curve.train["loss"]] == [1, 2, 3, 4]
    assert [(step, value) for step, value, _ in curve.val["loss"]] == logged
    assert [step for step, _ in logged] == [2, 4]
    assert all(ci > 0 for _, _, ci in curve.val["loss"])
    assert (tmp_path / "curve.png").stat().st_size > 10_000

    restored = LearningCurve(tmp_path / "other.png")
    restored.load_state_dict(curve.state_dict())
    assert restored.train == curve.train and restored.val == curve.val

    [results] = trainer.test(module, datamodule, verbose=False)
    cfg = SimpleNamespace(command="fit", recipe="unit", task=SimpleNamespace(meta_batch_size=2))
    print_summary(cfg, trainer, results, {"fit": 2.0, "test": 0.5}, tmp_path)
    out = capsys.readouterr().out
    assert "metaloop fit: unit" in out and "4 (2.00/s" in out
    assert f"{results['test/loss_post']:.4f} ± {results['test/loss_post_ci95']:.4f}" in out
    assert "learning curve" in out
    # the host-dependent auto choices, as they were resolved (an MLP's tasks are folded on CPUs)
    assert "resolved" in out and "precision 32-true" in out and "tasks folded into channels" in " ".join(out.split())


def test_nothing_to_plot_writes_nothing(tmp_path):
    assert LearningCurve(tmp_path / "x.png").save() is None
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("limit", ["max_steps", "max_time"])
def test_progress_bar_shows_when_the_run_ends(limit):
    """``ends in``: from the meta-step rate and trainer.max_steps, or trainer.max_time's remainder, whichever is sooner."""
    module = MetaLightningModule(MLP([1, 8, 1]), Regression(), InnerOptions(), functools.partial(torch.optim.SGD, lr=0.01), functools.partial(torch.optim.Adam, lr=1e-3))
    datamodule = MetaDataModule(SinusoidTasks(5, 5), meta_batch_size=2, num_val_tasks=0, num_test_tasks=0)
    bar = MetaStepProgressBar(min_interval=0.0)
    shown: list[str] = []

    class Record(lightning.Callback):
        def on_train_batch_end(self, trainer, *args):
            shown.append(bar.get_metrics(trainer, module).get("ends in"))

    limits = {"max_steps": 6} if limit == "max_steps" else {"max_steps": 10_000, "max_time": {"seconds": 3}}
    trainer = lightning.Trainer(**limits, logger=False, enable_checkpointing=False, enable_model_summary=False,
                                callbacks=[bar, Record()], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule)
    assert shown and all(text is not None for text in shown[1:]), shown
    minutes, seconds = shown[-1].split(":")
    assert int(minutes) == 0 and 0 <= int(seconds) <= (1 if limit == "max_steps" else 3)
    assert remaining_seconds(4, 6, 2.0, None) == 3.0 and remaining_seconds(4, None, 2.0, 10.0) == 10.0
    assert clock(5400) == "1:30:00"
