"""ReptileModule: the meta-step against Reptile by hand with torch.optim, eps annealing, no query backward, bad options."""

from __future__ import annotations

import copy
import functools

import lightning
import pytest
import torch
import torch.nn.functional as F
from lightning_cases import sinusoid_batch
from torch.utils.data import DataLoader

from learner_options import with_inner
from metaloop.lightning import MLP, PerElement, Regression, ReptileModule
from metaloop.algorithms.reptile import mini_batches
from metaloop.tasks import Task
from metaloop.transforms import MetaCurvatureTransform, TransformOptimizer

INNER_LR, EPS, STEPS = 0.01, 0.7, 3


def reptile_module(**kwargs) -> ReptileModule:
    """Returns a Reptile module on a 1-8-8-1 MLP: inner Adam (beta1 = 0), outer SGD with lr ``EPS``, seeded."""
    torch.manual_seed(0)
    options = {
        "inner_optim": functools.partial(torch.optim.Adam, lr=INNER_LR, betas=(0.0, 0.999)),
        "outer_optim": functools.partial(torch.optim.SGD, lr=EPS),
        "inner_steps": STEPS,
    }
    options.update(kwargs)
    return ReptileModule(options.pop("model", None) or MLP([1, 8, 8, 1]), Regression(), **with_inner(options))


def fit(module: ReptileModule, batches: list[Task], callbacks: list[lightning.Callback] = ()) -> ReptileModule:
    """Returns ``module`` after one meta-step per batch."""
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return module


def adapted_by_torch_optim(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                           batches: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Returns a copy of ``model``'s weights after ``STEPS`` steps of torch.optim.Adam (a fresh state) on ``(x, y)``
    or on its mini-batches ``x[batches[t]]``."""
    clone = copy.deepcopy(model)
    optimizer = torch.optim.Adam(clone.parameters(), lr=INNER_LR, betas=(0.0, 0.999))
    for t in range(STEPS):
        optimizer.zero_grad()
        rows = slice(None) if batches is None else batches[t]
        F.mse_loss(clone(x[rows]), y[rows]).backward()
        optimizer.step()
    return {n: p.detach() for n, p in clone.named_parameters()}


def double(batch: Task) -> Task:
    return Task(*(field.double() for field in batch))


@pytest.mark.parametrize("batch_tasks", ["vmap", "sequential"])
@pytest.mark.parametrize("inner_batch,train_on_query", [(None, False), (4, True), (3, False)])
def test_one_meta_step_is_the_interpolation_towards_the_adapted_weights(batch_tasks, inner_batch, train_on_query):
    module = reptile_module(batch_tasks=batch_tasks, inner_batch=inner_batch, train_on_query=train_on_query).double()
    batch = double(sinusoid_batch(3))
    theta = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    adapted = []
    for i in range(3):
        x, y = batch.support_x[i], batch.support_y[i]
        if train_on_query:
            x, y = torch.cat([x, batch.query_x[i]]), torch.cat([y, batch.query_y[i]])
        # the mini-batches of meta-step 0, as the module draws them
        batches = None if inner_batch is None else mini_batches(len(x), inner_batch, STEPS, torch.Generator().manual_seed(0))
        adapted.append(adapted_by_torch_optim(module.model, x, y, batches))
    expected = {n: theta[n] + EPS * sum(phi[n] - theta[n] for phi in adapted) / 3 for n in theta}
    fit(module, [batch])
    for name, param in module.model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=1e-13)
        assert not torch.equal(param.detach(), theta[name])


def test_mini_batches_are_shuffled_passes_over_the_examples():
    batches = mini_batches(5, 4, 5, torch.Generator().manual_seed(0))
    assert batches.shape == (5, 4)
    for start in range(0, 20, 5):  # each run of 5 consecutive draws is one pass: every example once
        assert sorted(batches.flatten()[start:start + 5].tolist()) == [0, 1, 2, 3, 4]
    assert not torch.equal(batches.flatten()[:5], batches.flatten()[5:10])


def test_only_the_adapted_parameters_move():
    module = reptile_module(adapt_params=r"^head\.")
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fit(module, [sinusoid_batch(2)])
    for name, param in module.model.named_parameters():
        assert torch.equal(param.detach(), before[name]) != name.startswith("head."), name


def test_the_query_set_is_not_back_propagated():
    batch = sinusoid_batch(2)
    other_query = Task(batch.support_x, batch.support_y, batch.query_x + 1.0, -batch.query_y)
    updated = [fit(reptile_module(), [b]).state_dict() for b in (batch, other_query)]
    for key, value in updated[0].items():
        assert torch.equal(value, updated[1][key]), key
    # no graph reaches the query inputs, and the logged loss is the query loss after adaptation
    module = reptile_module(batch_tasks="sequential")
    query_x = batch.query_x.clone().requires_grad_()
    loss, metrics = module.meta_gradient(Task(batch.support_x, batch.support_y, query_x, batch.query_y))
    assert query_x.grad is None and not loss.requires_grad
    assert loss.item() == pytest.approx(metrics["loss"].item())


class RecordLearningRate(lightning.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: lightning.Trainer, *args: object) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_meta_step_size_anneals_linearly_from_eps_to_zero():
    steps = 4
    linear = functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.0, total_iters=steps)
    module = reptile_module(outer_optim=functools.partial(torch.optim.SGD, lr=1.0), scheduler=linear)
    record = RecordLearningRate()
    fit(module, [sinusoid_batch(2, k=5)] * steps, [record])
    # Nichol et al.: eps_i = (1 - i / N) * eps_0 at meta-step i = 0 .. N-1
    assert record.lrs == pytest.approx([1 - i / steps for i in range(steps)], abs=1e-12)


def test_options_reptile_cannot_honour_are_refused():
    with pytest.raises(ValueError, match=r"learnable=\['lr'\].*use learnable=none"):
        reptile_module(learnable={"lr": PerElement()})
    with pytest.raises(ValueError, match="inner_batch=0 is not accepted \\(it is below 1\\); use a whole number >= 1"):
        reptile_module(inner_batch=0)
    with pytest.raises(ValueError, match="meta_grad='truncated'.*inner.meta_grad=unrolled"):
        reptile_module(meta_grad="truncated", truncate=1)
    transforms = functools.partial(TransformOptimizer, lr=0.1, transform=MetaCurvatureTransform)
    with pytest.raises(ValueError, match="learned transform.*would never train"):
        reptile_module(inner_optim=transforms)
