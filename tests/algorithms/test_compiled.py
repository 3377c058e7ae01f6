"""compile (metaloop.algorithms.compiled): the compiled folded meta-step equals the eager one; auto compiles where it wins."""

from __future__ import annotations

import functools

import lightning
import pytest
import torch

from metaloop.algorithms import InnerOptions, MetaLightningModule, PerLayer, Regression
from metaloop.algorithms.compiled import AUTO_COMPILE_STEPS, CompiledMetaStep, compile_wins
from metaloop.lightning import MetaDataModule
from metaloop.nn import MLP, Conv4
from metaloop.tasks import SinusoidTasks, Task

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)
SGD = functools.partial(torch.optim.SGD, lr=0.01)


def _sinusoid(tasks: int = 4) -> Task:
    gen = torch.Generator().manual_seed(0)
    x, xq = 10 * torch.rand(tasks, 10, 1, generator=gen, dtype=torch.float64) - 5, 10 * torch.rand(tasks, 10, 1, generator=gen, dtype=torch.float64) - 5
    return Task(x, torch.sin(x), xq, torch.sin(xq))


@pytest.mark.slow
def test_the_compiled_meta_step_equals_the_eager_one_in_float64():
    """Second order, 3 inner steps, learned per-layer rates: the compiled meta-gradient equals the eager folded one."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        module = MetaLightningModule(MLP([1, 8, 8, 1]), Regression(), InnerOptions(steps=3, batch_tasks="fold"), SGD, ADAM,
                                     learnable={"lr": PerLayer()}).double()
        if compiled:
            module.compiled = CompiledMetaStep(module)
        loss, metrics = module.meta_gradient(_sinusoid())
        results.append((loss, metrics, torch.cat([p.grad.flatten() for p in module.parameters()])))
    (loss_e, metrics_e, grad_e), (loss_c, metrics_c, grad_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=1e-12)
    torch.testing.assert_close(metrics_c, metrics_e, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_c, grad_e, rtol=0, atol=1e-10 * grad_e.abs().max().item())


def test_auto_compiles_long_single_process_float32_runs_of_the_measured_kinds_only():
    steps = AUTO_COMPILE_STEPS[("cpu", "other")]
    assert compile_wins("cpu", "other", steps, "32-true", 1)
    assert not compile_wins("cpu", "other", steps - 1, "32-true", 1)  # too short to pay for the compile
    assert not compile_wins("cpu", "other", steps, "bf16-mixed", 1)
    assert not compile_wins("cpu", "other", steps, "32-true", 2)  # the compiled step writes .grad: no DDP hook
    assert not compile_wins("cpu", "conv", 10**6, "32-true", 1)  # measured: no gain for the conv-4 on CPUs
    assert not compile_wins("cuda", "other", 10**6, "32-true", 1)  # not measured on a GPU


def _fit(module: MetaLightningModule, max_steps: int, tmp_path) -> lightning.Trainer:
    data = MetaDataModule(SinusoidTasks(10, 10), meta_batch_size=2, num_val_tasks=0, num_test_tasks=0)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return trainer


def test_compile_true_where_the_meta_batch_is_not_folded_is_refused_before_any_step(tmp_path):
    module = MetaLightningModule(MLP(), Regression(), InnerOptions(batch_tasks="vmap"), SGD, ADAM, compile=True)
    with pytest.raises(ValueError, match=r"module.compile=true compiles the folded meta-step of one process; this run's tasks are 'vmap'"):
        _fit(module, 1, tmp_path)


def test_auto_leaves_a_short_run_eager(tmp_path):
    module = MetaLightningModule(MLP(), Regression(), InnerOptions(), SGD, ADAM)
    trainer = _fit(module, 2, tmp_path)
    assert module.batching == "fold" and module.compiled is None and trainer.global_step == 2
