"""MetaLightningModule: inner loop, outer step, learned hyperparameters, evaluation metrics, hooks and errors."""

from __future__ import annotations

import functools
import math

import lightning
import pytest
import torch
import torch.nn.functional as F
from lightning_cases import conv_module, image_tasks, sinusoid_batch, sinusoid_module
from torch import nn
from torch.utils.data import DataLoader

import metaloop
from metaloop.algorithms import InnerOptions
from metaloop.lightning import (
    MLP,
    Classification,
    MetaDataModule,
    MetaLightningModule,
    PerElement,
    PerLayer,
    PerTensor,
    Regression,
    Shared,
)
from metaloop.optim import apply_trainable_opt_params
from metaloop.tasks import SinusoidTasks, Task, sample_meta_batch


def trainer(steps: int = 1, **kwargs) -> lightning.Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return lightning.Trainer(**options)


def loader(batches: list[Task]) -> DataLoader:
    """Returns a DataLoader yielding ``batches`` (already meta-batches) in order."""
    return DataLoader(batches, batch_size=None)


def fit(module: MetaLightningModule, batches: list[Task]) -> MetaLightningModule:
    """Returns ``module`` after one meta-step per batch."""
    trainer(len(batches)).fit(module, train_dataloaders=loader(batches))
    return module


def perturb_learned(module: MetaLightningModule) -> None:
    """Scales every learned value by a different factor in [0.5, 1.5), so per-element values differ."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for value in module.learned.values():
            value.mul_(0.5 + torch.rand(value.shape, generator=generator))


# -- inner loop ---------------------------------------------------------------------------
@pytest.mark.parametrize("inner,learnable", [
    (functools.partial(torch.optim.SGD, lr=0.05), None),
    (functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), {"lr": PerElement()}),
    (functools.partial(torch.optim.SGD, lr=0.05), {"lr": PerLayer()}),
    (functools.partial(torch.optim.SGD, lr=0.05), {"lr": PerTensor()}),
    (functools.partial(torch.optim.Adam, lr=0.01), {"betas": Shared(init=(0.8, 0.95)), "lr": Shared()}),
])
def test_adapt_equals_innerloop_ctx_with_the_exported_hyperparameters(inner, learnable):
    module = sinusoid_module(inner_optim=inner, learnable=learnable)
    perturb_learned(module)
    task = sinusoid_batch(1)
    support, query_x = (task.support_x[0], task.support_y[0]), task.query_x[0]

    adapted = module.adapt(support, steps=3)(query_x)

    opt = inner(module.adapted_parameters())
    apply_trainable_opt_params(opt, module.learned_hyperparameters())
    with metaloop.innerloop_ctx(module.model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(support[0]), support[1]))
        expected = fmodel(query_x)
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(adapted, module.model(query_x))


def test_learned_hyperparameters_are_parameters_exported_per_parameter():
    module = sinusoid_module(learnable={"lr": PerElement()})
    names = [n for n, _ in module.model.named_parameters()]
    assert sorted(module.learned) == sorted(f"lr/{n.replace('.', '/')}" for n in names)
    assert all(isinstance(v, nn.Parameter) and float(v.detach().mean()) == pytest.approx(0.05) for v in module.learned.values())
    assert {k for k in module.state_dict() if k.startswith("learned.")} == {f"learned.{k}" for k in module.learned}
    assert any(p is module.learned["lr/head/weight"] for p in module.parameters())
    override = module.learned_hyperparameters()
    assert list(override) == ["lr"] and len(override["lr"]) == 1
    per_param = override["lr"][0]
    assert [tuple(v.shape) for v in per_param] == [tuple(p.shape) for p in module.adapted_parameters()]
    assert not any(v.requires_grad for v in per_param)
    shared = sinusoid_module(learnable={"lr": Shared(init=0.3)}).learned_hyperparameters()
    assert float(shared["lr"][0]) == pytest.approx(0.3)


def test_per_layer_values_are_shared_by_weight_and_bias():
    module = sinusoid_module(learnable={"lr": PerLayer()})
    assert sorted(module.learned) == ["lr/features/0", "lr/features/2", "lr/head"]
    hparams = module.inner_hparams()
    assert hparams["head.weight"]["lr"] is hparams["head.bias"]["lr"] is module.learned["lr/head"]


@pytest.mark.parametrize("learnable,foreach_calls", [(None, 3), ({"lr": PerTensor()}, 0)])
def test_foreach_kernels_fire_on_the_lightning_path(learnable, foreach_calls):
    """Without learned values every adapted parameter shares one hyperparameter dict, so a step is one foreach call."""
    module = sinusoid_module(learnable=learnable)
    hparams = module.inner_hparams()
    assert (len({id(hp) for hp in hparams.values()}) == 1) is (learnable is None)
    calls = []

    def counting(params, grads, states, hp):
        calls.append(len(params))
        return foreach(params, grads, states, hp)

    foreach = module.rule.foreach
    module.rule = module.rule._replace(foreach=counting)
    task = sinusoid_batch(1)
    module.adapt((task.support_x[0], task.support_y[0]), steps=3)
    assert calls == [len(module.adapted_names)] * foreach_calls


def test_transform_optimizer_transforms_are_submodules_trained_by_the_outer_loop():
    from metaloop.transforms import MetaCurvatureTransform, TransformOptimizer

    module = sinusoid_module(inner_optim=functools.partial(TransformOptimizer, transform=MetaCurvatureTransform, lr=0.1))
    assert sorted(module.inner_modules["transform"]) == sorted(n.replace(".", "/") for n in module.adapted_names)
    transform_params = set(map(id, module.inner_modules.parameters()))
    assert transform_params and transform_params <= set(map(id, module.parameters()))
    assert any(k.startswith("inner_modules.transform.") for k in module.state_dict())
    batch = sinusoid_batch(2)
    module.meta_gradient(batch)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in module.inner_modules.parameters())


def test_adapt_params_adapts_only_matching_parameters():
    module = sinusoid_module(adapt_params=r"^head\.")
    task = sinusoid_batch(1)
    fmodel = module.adapt((task.support_x[0], task.support_y[0]), steps=2)
    assert module.adapted_names == ["head.weight", "head.bias"]
    for name, param in module.model.named_parameters():
        same = torch.equal(fmodel.weights[name], param)
        assert same == name.startswith("features"), name


def test_custom_inner_loss_hook_is_used_in_adaptation_and_training():
    class NoInnerLoss(MetaLightningModule):
        def inner_loss(self, fmodel, support):
            return 0.0 * super().inner_loss(fmodel, support)

    torch.manual_seed(0)
    module = NoInnerLoss(MLP([1, 8, 1]), Regression(), InnerOptions(), functools.partial(torch.optim.SGD, lr=0.5),
                         functools.partial(torch.optim.SGD, lr=0.1))
    batch = sinusoid_batch(3)
    fmodel = module.adapt((batch.support_x[0], batch.support_y[0]), steps=2)
    for name, param in module.model.named_parameters():
        torch.testing.assert_close(fmodel.weights[name], param.detach())
    # without adaptation, the meta-gradient is the mean query-loss gradient at the initial weights
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    losses = torch.stack([F.mse_loss(module.model(batch.query_x[i]), batch.query_y[i]) for i in range(3)])
    grads = torch.autograd.grad(losses.mean(), list(module.model.parameters()))
    fit(module, [batch])
    for (name, param), grad in zip(module.model.named_parameters(), grads):
        torch.testing.assert_close(param.detach(), before[name] - 0.1 * grad, rtol=1e-5, atol=1e-7)


# -- outer step ---------------------------------------------------------------------------
def maml_reference_update(module: MetaLightningModule, batch: Task, first_order: bool) -> dict[str, torch.Tensor]:
    """Returns the parameters after one outer SGD step (lr 0.1) of MAML with inner SGD (lr 0.05, 1 step), by hand."""
    params = list(module.model.parameters())
    losses = []
    for i in range(batch.support_x.shape[0]):
        support_loss = F.mse_loss(module.model(batch.support_x[i]), batch.support_y[i])
        grads = torch.autograd.grad(support_loss, params, create_graph=not first_order)
        fast = {n: p - 0.05 * (g.detach() if first_order else g) for (n, p), g in zip(module.model.named_parameters(), grads)}
        losses.append(F.mse_loss(torch.func.functional_call(module.model, fast, (batch.query_x[i],)), batch.query_y[i]))
    meta_grads = torch.autograd.grad(torch.stack(losses).mean(), params)
    return {n: (p - 0.1 * g).detach() for (n, p), g in zip(module.model.named_parameters(), meta_grads)}


@pytest.mark.parametrize("batch_tasks", ["vmap", "sequential"])
@pytest.mark.parametrize("first_order", [False, True])
def test_one_meta_step_equals_maml_by_hand(batch_tasks, first_order):
    module = sinusoid_module(batch_tasks=batch_tasks, first_order=first_order)
    batch = sinusoid_batch(4)
    expected = maml_reference_update(module, batch, first_order)
    fit(module, [batch])
    for name, param in module.model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learnable", [{"lr": PerElement()}, {"lr": Shared()}])
def test_vmap_and_sequential_meta_steps_agree_on_weights_and_learned_hyperparameters(learnable):
    batches = [sinusoid_batch(3), sample_meta_batch(SinusoidTasks(5, 5), "train", 0, range(3, 6))]
    results = []
    for batch_tasks in ("vmap", "sequential"):
        module = sinusoid_module(batch_tasks=batch_tasks, learnable=learnable, inner_steps=2)
        initial = {k: v.clone() for k, v in module.learned.items()}
        results.append(fit(module, batches).state_dict())
        assert all(not torch.equal(initial[k], v) for k, v in module.learned.items()), "learned values must train"
    for key, value in results[0].items():
        torch.testing.assert_close(value, results[1][key], rtol=1e-5, atol=1e-6)


def test_training_logs_query_metrics_and_learned_hyperparameters():
    module = conv_module(learnable={"lr": Shared()}, batch_tasks="sequential")
    batch = image_tasks().batch("train", [torch.Generator().manual_seed(i) for i in range(2)])
    t = trainer(1)
    t.fit(module, train_dataloaders=loader([Task(*batch)]))
    metrics = t.callback_metrics
    assert set(metrics) == {"train/loss", "train/acc", "hp/lr"}
    assert float(metrics["hp/lr"]) == pytest.approx(float(module.learned["lr"]))
    assert 0.0 <= float(metrics["train/acc"]) <= 1.0 and math.isfinite(float(metrics["train/loss"]))


def test_scheduler_steps_every_meta_step():
    module = sinusoid_module(scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    t = trainer(2)
    t.fit(module, train_dataloaders=loader([sinusoid_batch(2), sinusoid_batch(2)]))
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


# -- evaluation ---------------------------------------------------------------------------
def test_validation_metrics_are_mean_and_ci_over_the_fixed_tasks():
    module = sinusoid_module(eval_inner_steps=2)
    datamodule = MetaDataModule(SinusoidTasks(5, 5), meta_batch_size=2, eval_meta_batch_size=4, num_val_tasks=6, seed=3)
    [logged] = trainer().validate(module, datamodule, verbose=False)
    tasks = sample_meta_batch(SinusoidTasks(5, 5), "val", 3, range(6))
    pre, post = [], []
    for i in range(6):
        pre.append(float(F.mse_loss(module.model(tasks.query_x[i]), tasks.query_y[i])))
        fmodel = module.adapt((tasks.support_x[i], tasks.support_y[i]), steps=2)
        post.append(float(F.mse_loss(fmodel(tasks.query_x[i]), tasks.query_y[i])))
    for when, values in (("pre", torch.tensor(pre)), ("post", torch.tensor(post))):
        assert logged[f"val/loss_{when}"] == pytest.approx(float(values.mean()), rel=1e-5)
        assert logged[f"val/loss_{when}_ci95"] == pytest.approx(float(1.96 * values.std() / math.sqrt(6)), rel=1e-4)


def test_evaluation_with_more_ways_than_the_head_starts_from_a_zero_head():
    module = conv_module(n_ways=5, eval_inner_steps=1, batch_tasks="sequential")
    datamodule = MetaDataModule(image_tasks(n_ways=7), meta_batch_size=2, eval_meta_batch_size=3, num_val_tasks=3)
    [logged] = trainer().validate(module, datamodule, verbose=False)
    # all-zero logits predict class 0, a seventh of the (balanced) queries
    assert logged["val/acc_pre"] == pytest.approx(1 / 7)
    assert logged["val/loss_pre"] == pytest.approx(math.log(7), rel=1e-5)
    assert logged["val/acc_post"] > 1 / 7
    task = datamodule.tasks("val", torch.Generator().manual_seed(0))
    logits = module.adapt((task.support_x, task.support_y), n_ways=7)(task.query_x)
    assert logits.shape == (14, 7)
    # the new head is adapted (a zero head that stayed zero would give every query the same logits)
    assert float(logits.std(0).mean()) > 1e-3


def test_a_new_head_uses_the_mean_of_the_learned_per_element_rates():
    module = conv_module(n_ways=5, learnable={"lr": PerElement()})
    perturb_learned(module)
    _, hparams = module.initial_weights(7)
    learned = module.learned["lr/head/weight"].detach()
    torch.testing.assert_close(hparams["head.weight"]["lr"], learned.mean(0, keepdim=True).expand(7, -1))
    assert hparams["head.weight"]["lr"].shape == (7, 8)


def test_new_head_errors():
    with pytest.raises(ValueError, match=r"n_ways=7 differs from the head's 5 outputs, but the head 'head' does not adapt"):
        conv_module(adapt_params="features").initial_weights(7)
    from metaloop.transforms import MetaCurvatureTransform, TransformOptimizer

    module = conv_module(inner_optim=functools.partial(TransformOptimizer, transform=MetaCurvatureTransform))
    with pytest.raises(ValueError, match="learned transforms of the head are sized for 5"):
        module.initial_weights(7)


# -- construction errors -----------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    ({"learnable": {"betas": Shared()}}, r"learnable names 'betas', which is not a hyperparameter of the inner optimizer"),
    ({"adapt_params": "^classifier"}, r"params='\^classifier' matches none of the model's adaptable parameters"),
    ({"inner_steps": -1}, r"steps=-1 is not accepted \(it is below 0\); use a whole number >= 0"),
    ({"batch_tasks": "parallel"}, r"batch_tasks='parallel' is not accepted \(not one of the choices\); use one of auto, vmap, sequential, fold"),
    ({"head": "features"}, r"head='features' is not an nn.Linear of the model"),
])
def test_constructor_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sinusoid_module(**kwargs)


def test_vmap_refuses_running_statistics_and_takes_second_order_batchnorm_exactly():
    model = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"batch_tasks='vmap' cannot adapt this model: it has buffers \(1.running_mean"):
        sinusoid_module(model=model, batch_tasks="vmap")
    assert sinusoid_module(model=model).batching == "sequential"
    assert sinusoid_module().batching == "fold" and conv_module().batching == "sequential"  # AUTO_BATCHING on CPUs
    batch_stats = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 1))
    # second order through batch statistics is exact under vmap with metaloop.nn.exact_norms (tests/nn/test_plain_norms.py)
    assert sinusoid_module(model=batch_stats, batch_tasks="vmap").batched is True
    assert sinusoid_module(model=batch_stats).batching == "fold"  # an MLP: folded on CPUs (AUTO_BATCHING)
    assert sinusoid_module(model=batch_stats, batch_tasks="vmap", first_order=True).batched is True


def test_check_task_rejects_models_and_objectives_that_do_not_fit():
    images = Task(*image_tasks().batch("train", [torch.Generator().manual_seed(0)]))
    image_task = Task(*(field[0] for field in images))
    sine = sinusoid_batch(1)
    sine_task = Task(*(field[0] for field in sine))
    with pytest.raises(ValueError, match=r"MLP cannot run on the task's support inputs of shape \(5, 1, 16, 16\)"):
        sinusoid_module().check_task(image_task)
    with pytest.raises(ValueError, match=r"the task's labels are floats .* a regression task"):
        sinusoid_module(model=MLP([1, 8, 5]), objective=Classification()).check_task(sine_task)
    with pytest.raises(ValueError, match=r"the task's targets are integers .* a classification task"):
        conv_module().__class__(conv_module().model, Regression(), InnerOptions(), functools.partial(torch.optim.SGD, lr=0.1),
                                functools.partial(torch.optim.SGD, lr=0.1)).check_task(image_task)
    with pytest.raises(ValueError, match=r"set the model's out_features to 7"):
        conv_module(n_ways=5).check_task(Task(*(f[0] for f in image_tasks(7).batch("train", [torch.Generator()]))))
    conv_module(n_ways=5).check_task(Task(*(f[0] for f in image_tasks(7).batch("val", [torch.Generator()]))), "test")


def test_training_metrics_reuse_the_query_forward_of_the_loss():
    """One forward of the query set per task in training: the metrics see the output the loss saw."""
    module = sinusoid_module(batch_tasks="sequential")
    calls = []
    forward = module.model.forward

    def counting(x):
        calls.append(x.shape[0])
        return forward(x)

    module.model.forward = counting
    batch = sinusoid_batch(2, k=5)
    loss, metrics = module.meta_gradient(batch)
    assert len(calls) == 2 * (module.inner.steps + 1)  # per task: one forward per inner step, one of the query set
    torch.testing.assert_close(metrics["loss"], loss)
