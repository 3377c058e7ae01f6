"""The learning-curve callback and the summary table of the ``metaloop`` command."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import lightning
import torch

from metaloop.cli.report import LearningCurve, print_summary
from metaloop.lightning import MLP, MetaDataModule, MetaLightningModule, Regression
from metaloop.tasks import SinusoidTasks


def test_the_learning_curve_holds_every_step_and_each_validation(tmp_path, capsys):
    torch.manual_seed(0)
    module = MetaLightningModule(MLP([1, 8, 1]), Regression(), functools.partial(torch.optim.SGD, lr=0.01),
                                 functools.partial(torch.optim.Adam, lr=1e-3))
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
    # the host-dependent auto choices, as they were resolved (an MLP's tasks are vmapped on CPUs)
    assert "resolved" in out and "precision 32-true" in out and "tasks vmapped" in " ".join(out.split())


def test_nothing_to_plot_writes_nothing(tmp_path):
    assert LearningCurve(tmp_path / "x.png").save() is None
    assert not (tmp_path / "x.png").exists()
