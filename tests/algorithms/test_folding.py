"""batch_tasks="fold" (metaloop.algorithms.folding): meta-gradients and evaluations equal the task-by-task loop in float64."""

from __future__ import annotations

import functools

import lightning
import pytest
import torch
from torch import nn

from metaloop.algorithms import (
    CaviaModule,
    Classification,
    InnerOptions,
    MAMLPlusPlus,
    MetaLightningModule,
    PerElement,
    PerLayer,
    PerStep,
    Regression,
)
from metaloop.algorithms.folding import FOLD_HOOKS
from metaloop.algorithms.inner import AUTO_BATCHING
from metaloop.lightning import MetaDataModule
from metaloop.nn import MLP, Conv4, PerStepConv4
from metaloop.optim.implicit import ImplicitOptions
from metaloop.tasks import Task
from metaloop.transforms import MetaCurvatureTransform, TransformOptimizer

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)
SGD = functools.partial(torch.optim.SGD, lr=0.4)
BN_FROZEN = r"^(features\.(0|4|8|12)\.|head\.)"  # conv and head weights adapt; BatchNorm's affine weights do not


def _tasks(tasks: int = 3, seed: int = 0, image: bool = True) -> Task:
    gen = torch.Generator().manual_seed(seed)
    if not image:
        x, xq = torch.rand(tasks, 10, 1, generator=gen, dtype=torch.float64), torch.rand(tasks, 10, 1, generator=gen, dtype=torch.float64)
        return Task(x, torch.sin(3 * x), xq, torch.sin(3 * xq))
    return Task(
        torch.rand(tasks, 5, 1, 28, 28, generator=gen, dtype=torch.float64),
        torch.arange(5).expand(tasks, -1).contiguous(),
        torch.rand(tasks, 10, 1, 28, 28, generator=gen, dtype=torch.float64),
        torch.arange(5).repeat_interleave(2).expand(tasks, -1).contiguous(),
    )


def _conv4(batch_tasks: str, inner_optim=SGD, learnable=None, **inner) -> MetaLightningModule:
    torch.manual_seed(0)
    options = InnerOptions(**{"steps": 2, **inner, "batch_tasks": batch_tasks})
    return MetaLightningModule(Conv4(5, hidden=8), Classification(), options, inner_optim, ADAM, learnable=learnable).double()


def _meta_gradient(module: MetaLightningModule, batch: Task) -> tuple[torch.Tensor, dict, torch.Tensor]:
    loss, metrics = module.meta_gradient(batch)
    return loss, metrics, torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


CASES = {
    "sgd, second order": {},
    "sgd, first order": {"first_order": True},
    "adam, second order": {"inner_optim": functools.partial(torch.optim.Adam, lr=0.05)},
    "batchnorm weights frozen": {"params": BN_FROZEN},
    "head only (ANIL)": {"params": r"^head\."},
    "truncated": {"meta_grad": "truncated", "truncate": 1, "steps": 3},
    "meta-sgd (per-element rates)": {"learnable": {"lr": PerElement()}},
    "per-step per-layer rates": {"learnable": {"lr": PerStep(PerLayer(), 2)}},
    "no inner step": {"steps": 0},
}


@pytest.mark.parametrize("case", list(CASES))
def test_folded_meta_gradient_equals_task_by_task_in_float64(case):
    """Finn et al.'s conv-4 (BatchNorm on batch statistics): the folded meta-batch gives the task-by-task numbers."""
    sequential, folded = _conv4("sequential", **CASES[case]), _conv4("fold", **CASES[case])
    assert (sequential.batching, folded.batching) == ("sequential", "fold")
    (loss_s, metrics_s, grad_s), (loss_f, metrics_f, grad_f) = _meta_gradient(sequential, _tasks()), _meta_gradient(folded, _tasks())
    torch.testing.assert_close(loss_f, loss_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(metrics_f, metrics_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_f, grad_s, rtol=0, atol=1e-10 * grad_s.abs().max().item())


def test_folded_sinusoid_mlp_equals_task_by_task_in_float64():
    def make(batch_tasks: str) -> MetaLightningModule:
        torch.manual_seed(0)
        return MetaLightningModule(MLP(), Regression(), InnerOptions(steps=3, batch_tasks=batch_tasks), functools.partial(torch.optim.SGD, lr=0.01), ADAM).double()

    (loss_s, _, grad_s), (loss_f, _, grad_f) = (_meta_gradient(make(b), _tasks(4, image=False)) for b in ("sequential", "fold"))
    torch.testing.assert_close(loss_f, loss_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_f, grad_s, rtol=0, atol=1e-10 * grad_s.abs().max().item())


@pytest.mark.parametrize("n_ways", [None, 3])
def test_folded_evaluation_equals_task_by_task(n_ways):
    """Metrics before and after adaptation, per task; with another number of classes the head starts from zeros."""
    batch = _tasks(seed=1)
    if n_ways == 3:
        keep = batch.support_y[0] < 3
        keep_q = batch.query_y[0] < 3
        batch = Task(batch.support_x[:, keep], batch.support_y[:, keep], batch.query_x[:, keep_q], batch.query_y[:, keep_q])
    results = {b: _conv4(b).evaluate_tasks(n_ways, batch) for b in ("sequential", "fold")}
    assert set(results["fold"]) == {"pre", "post"}
    torch.testing.assert_close(results["fold"], results["sequential"], rtol=0, atol=1e-10)


def test_auto_folds_conv_nets_where_it_is_exact_and_falls_back_where_it_is_not():
    assert AUTO_BATCHING[("cuda", "conv")][0] == AUTO_BATCHING[("cpu", "other")][0] == "fold"
    assert _conv4("auto").choose_batching("cuda", "32-true") == "fold"
    # the implicit meta-gradient solves each task's problem apart (vmap is exact there); learned transforms read whole tensors
    assert _conv4("auto", meta_grad="implicit", implicit=ImplicitOptions(lam=2.0, maxiter=2)).choose_batching("cuda", "32-true") == "vmap"
    transform = functools.partial(TransformOptimizer, transform=MetaCurvatureTransform, lr=0.1)
    assert _conv4("auto", inner_optim=transform).choose_batching("cuda", "32-true") == "vmap"
    # learners whose hooks see one task at a time (MAML++'s per-step BatchNorm, CAVIA's context) keep their own path
    mamlpp = MAMLPlusPlus(PerStepConv4(5, steps=2, hidden=8, per_step_stats=False), Classification(), InnerOptions(steps=2), SGD, ADAM)
    assert "model_at" in FOLD_HOOKS and mamlpp.batching != "fold"


@pytest.mark.parametrize("make, reason", [
    (lambda: _conv4("fold", meta_grad="implicit", implicit=ImplicitOptions(lam=2.0)), r"meta_grad='implicit' solves each task's inner problem separately"),
    (lambda: MetaLightningModule(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), Regression(), InnerOptions(batch_tasks="fold"), SGD, ADAM),
     r"it has buffers \(1\.running_mean"),
    (lambda: MAMLPlusPlus(PerStepConv4(5, steps=2, hidden=8, per_step_stats=False), Classification(), InnerOptions(steps=2, batch_tasks="fold"), SGD, ADAM),
     r"MAMLPlusPlus overrides model_at, task_loss, which see one task at a time"),
])
def test_fold_where_it_would_not_be_exact_is_refused_naming_why(make, reason):
    with pytest.raises(ValueError, match=rf"batch_tasks='fold' cannot adapt this model: (.*; )?{reason}.*; use batch_tasks='auto'"):
        make()


def test_a_loss_hook_that_runs_the_model_on_other_inputs_is_refused_under_folding():
    class OtherInputs(MetaLightningModule):
        def outer_loss(self, fmodel, query):
            x, y = query
            return self.objective.loss(fmodel(x + 0), y)

    torch.manual_seed(0)
    module = OtherInputs(Conv4(5, hidden=8), Classification(), InnerOptions(batch_tasks="fold"), SGD, ADAM).double()
    with pytest.raises(ValueError, match="with batch_tasks='fold' a loss or metric hook may run fmodel only on the inputs"):
        module.meta_gradient(_tasks())


def test_cavia_is_never_folded():
    from metaloop.nn import ContextMLP

    module = CaviaModule(ContextMLP(context_size=2), Regression(), InnerOptions(), functools.partial(torch.optim.SGD, lr=1.0), ADAM)
    assert module.batching != "fold"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_folded_learner_fits_under_lightning(precision, tmp_path):
    def tasks(split: str, gen: torch.Generator) -> Task:
        return Task(torch.rand(5, 1, 28, 28, generator=gen), torch.arange(5), torch.rand(5, 1, 28, 28, generator=gen), torch.arange(5))

    data = MetaDataModule(tasks, meta_batch_size=2, num_val_tasks=2, num_test_tasks=0)
    torch.manual_seed(0)
    module = MetaLightningModule(Conv4(5, hidden=8), Classification(), InnerOptions(batch_tasks="fold"), SGD, ADAM)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = lightning.Trainer(accelerator="cpu", precision=precision, max_steps=2, logger=False, val_check_interval=2,
                                enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert module.batching == "fold" and trainer.global_step == 2
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert 0.0 <= trainer.callback_metrics["val/acc_post"] <= 1.0
