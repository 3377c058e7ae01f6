"""CaviaModule and its models: per-task zero context, the meta-gradient against CAVIA by hand, vmap and task by task."""

from __future__ import annotations

import functools

import lightning
import pytest
import torch
import torch.nn.functional as F
from lightning_cases import TinyImages, sinusoid_batch
from torch.func import functional_call
from torch.utils.data import DataLoader

from learner_options import with_inner
from metaloop.algorithms import InnerOptions
from metaloop.lightning import MLP, CaviaModule, Classification, ContextMLP, Conv4, FiLMConv4, MetaDataModule, Regression
from metaloop.tasks import EpisodeSampler, Task

LR = 0.5


def cavia_module(**kwargs) -> CaviaModule:
    """Returns a CAVIA module on a 1-8-8-1 MLP with 3 context inputs: inner SGD on the context, outer Adam, seeded."""
    torch.manual_seed(0)
    options = {
        "inner_optim": functools.partial(torch.optim.SGD, lr=LR),
        "outer_optim": functools.partial(torch.optim.Adam, lr=1e-2),
    }
    options.update(kwargs)
    return CaviaModule(options.pop("model", None) or ContextMLP([1, 8, 8, 1], context_size=3), Regression(), **with_inner(options))


def fit(module: CaviaModule, batches: list[Task]) -> CaviaModule:
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return module


def cavia_by_hand(module: CaviaModule, batch: Task, steps: int) -> dict[str, torch.Tensor]:
    """Returns the meta-gradient of the network's weights: per task, SGD on a zero context, then the query loss."""
    network = {n: p for n, p in module.model.named_parameters() if n != "context"}
    losses = []
    for i in range(batch.support_x.shape[0]):
        context = torch.zeros(module.model.context.shape, dtype=batch.support_x.dtype, requires_grad=True)
        for _ in range(steps):
            support = F.mse_loss(functional_call(module.model, {**network, "context": context}, (batch.support_x[i],)),
                                 batch.support_y[i])
            (grad,) = torch.autograd.grad(support, context, create_graph=True)
            context = context - LR * grad
        query = functional_call(module.model, {**network, "context": context}, (batch.query_x[i],))
        losses.append(F.mse_loss(query, batch.query_y[i]))
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(network.values()))
    return dict(zip(network, grads))


@pytest.mark.parametrize("batch_tasks", ["vmap", "sequential"])
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_equals_cavia_by_hand(batch_tasks, steps):
    module = cavia_module(batch_tasks=batch_tasks, inner_steps=steps).double()
    batch = Task(*(field.double() for field in sinusoid_batch(3)))
    expected = cavia_by_hand(module, batch, steps)
    module.meta_gradient(batch)
    for name, param in module.model.named_parameters():
        if name == "context":
            assert param.grad is None
            continue
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12)
        assert param.grad.abs().sum() > 0, name


class RecordStartingContext(CaviaModule):
    """Records the context each inner step starts from."""

    def inner_loss(self, fmodel, support):
        self.seen.append(fmodel.weights["context"].detach().clone())
        return super().inner_loss(fmodel, support)


def test_every_task_starts_from_a_zero_context_of_its_own():
    torch.manual_seed(0)
    module = RecordStartingContext(ContextMLP([1, 8, 8, 1], 3), Regression(), InnerOptions(steps=2, batch_tasks="sequential"),
                                   functools.partial(torch.optim.SGD, lr=LR), functools.partial(torch.optim.Adam, lr=1e-2))
    module.seen = []
    with torch.no_grad():
        module.model.context.fill_(5.0)  # what the model holds is not where a task starts
    batch = sinusoid_batch(2)
    module.meta_gradient(batch)
    first, second, third, fourth = module.seen  # task 0: steps 0 and 1; task 1: steps 0 and 1
    assert torch.equal(first, torch.zeros(3)) and torch.equal(third, torch.zeros(3))
    assert second.abs().sum() > 0 and fourth.abs().sum() > 0 and not torch.equal(second, fourth)
    # adapt() and evaluation start from zeros too
    adapted = module.adapt((batch.support_x[0], batch.support_y[0]), steps=1)
    torch.testing.assert_close(adapted.weights["context"], second)


def test_the_context_is_not_meta_learned_and_the_network_is():
    module = cavia_module(inner_steps=2)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fit(module, [sinusoid_batch(4), sinusoid_batch(4)])
    assert torch.equal(module.model.context, torch.zeros(3)) and module.model.context.grad is None
    for name, param in module.model.named_parameters():
        if name != "context":
            assert not torch.equal(param.detach(), before[name]), name


def test_validation_adapts_the_context_and_logs_metrics_before_and_after():
    module = cavia_module(inner_steps=1, eval_inner_steps=3)
    datamodule = MetaDataModule(lambda split, generator: tuple(f[0] for f in sinusoid_batch(1)), meta_batch_size=2,
                                eval_meta_batch_size=2, num_val_tasks=4, num_test_tasks=0)
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert metrics["val/loss_post"] < metrics["val/loss_pre"]


def test_film_conv4_is_conv4_at_the_zero_context_and_the_context_modulates_it():
    torch.manual_seed(0)
    film = FiLMConv4(5, context_size=6, film_block=3, hidden=8, image_size=16)
    plain = Conv4(5, hidden=8, image_size=16)
    plain.load_state_dict({k: v for k, v in film.state_dict().items() if not k.startswith(("film.", "context"))})
    x = torch.rand(4, 1, 16, 16)
    torch.testing.assert_close(film(x), plain(x), rtol=0, atol=0)
    context = {"context": torch.ones(6)}
    assert not torch.allclose(functional_call(film, context, (x,)), plain(x))


def test_cavia_on_images_trains_with_film_and_keeps_the_head_fixed_in_the_inner_loop():
    torch.manual_seed(0)
    module = CaviaModule(FiLMConv4(5, context_size=6, hidden=8, image_size=16), Classification(), InnerOptions(steps=2), functools.partial(torch.optim.SGD, lr=1.0), functools.partial(torch.optim.Adam, lr=1e-3))
    assert module.head == "head" and module.adapted_names == ["context"]
    task = EpisodeSampler(TinyImages(), n_ways=5, k_shots=1, k_queries=2)("train", torch.Generator().manual_seed(0))
    adapted = module.adapt((task.support_x.float() / 255, task.support_y))
    assert adapted.weights["context"].abs().sum() > 0
    assert torch.equal(adapted.weights["head.weight"], module.model.head.weight)


def test_bad_models_and_options_are_refused():
    sgd = functools.partial(torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match="matches none of the model's adaptable parameters.*model=context_mlp"):
        CaviaModule(MLP([1, 8, 1]), Regression(), InnerOptions(), sgd, sgd)
    with pytest.raises(ValueError, match="selects the head 'head'"):
        cavia_module(adapt_params="context|head")
    with pytest.raises(ValueError, match="film_block=5 is not a block of Conv4"):
        FiLMConv4(5, film_block=5)
    with pytest.raises(ValueError, match="context_size=0 must be a positive whole number"):
        ContextMLP([1, 8, 1], context_size=0)
