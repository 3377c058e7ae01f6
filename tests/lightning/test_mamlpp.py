"""MAML++ (MAMLPlusPlus): the multi-step loss and its schedule, per-step rates, per-step BatchNorm and derivative-order
annealing against hand-written unrolls (float64), and fit / validate / test with a checkpoint round trip."""

from __future__ import annotations

import functools

import lightning
import pytest
import torch
import torch.nn.functional as F
from lightning_cases import image_tasks, sinusoid_batch
from torch.func import functional_call
from torch.utils.data import DataLoader

from learner_options import with_inner
from metaloop.algorithms import InnerOptions
from metaloop.lightning import MLP, Classification, MAMLPlusPlus, MetaDataModule, PerLayer, Regression, msl_weights
from metaloop.nn import PerStepConv4
from metaloop.tasks import Task

STEPS, LR, OUTER_LR = 3, 0.05, 0.1


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def at_meta_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Makes every MAMLPlusPlus believe it has taken ``step`` outer steps (what ``global_step`` says in a Trainer)."""
    monkeypatch.setattr(MAMLPlusPlus, "meta_step", property(lambda self: step))


def sinusoid_mamlpp(**kwargs) -> MAMLPlusPlus:
    """Returns MAML++ on a 1-8-8-1 MLP (no BatchNorm), inner SGD lr 0.05, outer SGD lr 0.1, 3 inner steps, seeded."""
    torch.manual_seed(0)
    options = dict(
        inner_optim=functools.partial(torch.optim.SGD, lr=LR), outer_optim=functools.partial(torch.optim.SGD, lr=OUTER_LR),
        inner_steps=STEPS, msl_anneal_steps=10, first_order_steps=0,
    )
    options.update(kwargs)
    return MAMLPlusPlus(options.pop("model", None) or MLP([1, 8, 8, 1]), Regression(), **with_inner(options))


def conv_mamlpp(**kwargs) -> MAMLPlusPlus:
    """Returns MAML++ on a small PerStepConv4 (8 filters, 16x16 images), 5-way, 3 inner steps, seeded."""
    torch.manual_seed(0)
    model_options = {k: kwargs.pop(k) for k in ("per_step_weights", "per_step_stats", "eval_stats") if k in kwargs}
    options = dict(
        inner_optim=functools.partial(torch.optim.SGD, lr=0.4), outer_optim=functools.partial(torch.optim.Adam, lr=1e-3),
        inner_steps=STEPS, msl_anneal_steps=10, first_order_steps=0,
    )
    options.update(kwargs)
    model = PerStepConv4(5, steps=options["inner_steps"], hidden=8, image_size=16, **model_options)
    return MAMLPlusPlus(model, Classification(), **with_inner(options))


def distinct_rates(module: MAMLPlusPlus) -> None:
    """Sets the learned rate of layer l at step k to LR * (1 + k / 4 + l / 10): every (step, layer) differs."""
    with torch.no_grad():
        for layer, value in enumerate(module.learned.values()):
            value.copy_(LR * (1 + torch.arange(value.shape[0]) / 4 + layer / 10))


def rate(module: MAMLPlusPlus, name: str, step: int) -> torch.Tensor | float:
    if not module.lslr:
        return LR
    return module.learned["lr/" + name.rpartition(".")[0].replace(".", "/")][step]


def unrolled_by_hand(module: MAMLPlusPlus, batch: Task, weights: list[float], first_order: bool) -> torch.Tensor:
    """Returns the mean over tasks of sum_k weights[k] * query MSE after SGD step k with rate lr[k][layer], by hand."""
    params = dict(module.model.named_parameters())
    total = torch.zeros(())
    for i in range(batch.support_x.shape[0]):
        fast = dict(params)
        for k in range(STEPS):
            support = F.mse_loss(functional_call(module.model, fast, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(support, list(fast.values()), create_graph=not first_order)
            fast = {n: w - rate(module, n, k) * g for (n, w), g in zip(fast.items(), grads)}
            query = F.mse_loss(functional_call(module.model, fast, (batch.query_x[i],)), batch.query_y[i])
            total = total + weights[k] * query
    return total / batch.support_x.shape[0]


def meta_parameters(module: MAMLPlusPlus) -> list[torch.nn.Parameter]:
    return [*module.model.parameters(), *module.learned.values()]


# -- the multi-step loss's schedule ----------------------------------------------------------
def authors_schedule(steps: int, epoch: int, anneal_epochs: int) -> list[float]:
    """Antoniou et al.'s get_per_step_loss_importance_vector, transcribed (used while epoch < anneal_epochs)."""
    weights = [1.0 / steps] * steps
    decay = 1.0 / steps / anneal_epochs
    floor = 0.03 / steps
    for i in range(steps - 1):
        weights[i] = max(weights[i] - epoch * decay, floor)
    weights[-1] = min(weights[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("meta_step", [0, 1, 3, 5, 9, 10, 11, 500])
def test_msl_weights_follow_the_papers_schedule(steps, meta_step):
    weights = msl_weights(steps, meta_step, anneal_steps=10)
    expected = authors_schedule(steps, meta_step, 10) if meta_step < 10 else [0.0] * (steps - 1) + [1.0]
    assert weights == pytest.approx(expected, abs=1e-12)
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)


def test_msl_weights_start_uniform_decay_linearly_to_the_floor_then_keep_only_the_last_step():
    assert msl_weights(5, 0, 100) == pytest.approx([0.2] * 5)
    assert msl_weights(5, 50, 100) == pytest.approx([0.1] * 4 + [0.6])
    assert msl_weights(5, 99, 100) == pytest.approx([0.03 / 5] * 4 + [1 - 4 * 0.03 / 5])
    assert msl_weights(5, 100, 100) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert msl_weights(5, 0, 0) == [0.0, 0.0, 0.0, 0.0, 1.0]  # no annealing: MAML's loss
    for args, message in (((0, 0, 1), "steps=0"), ((2, -1, 1), "meta_step=-1"), ((2, 0, -3), "anneal_steps=-3")):
        with pytest.raises(ValueError, match=message):
            msl_weights(*args)


# -- the multi-step loss and LSLR against the unroll by hand ---------------------------------
@pytest.mark.parametrize("lslr", [True, False])
@pytest.mark.parametrize("meta_step", [0, 4, 10])
@pytest.mark.parametrize("batch_tasks", ["sequential", "vmap"])
def test_multi_step_loss_and_meta_gradient_equal_a_weighted_unroll_by_hand(float64, monkeypatch, lslr, meta_step, batch_tasks):
    at_meta_step(monkeypatch, meta_step)
    module = sinusoid_mamlpp(lslr=lslr, batch_tasks=batch_tasks)
    if lslr:
        distinct_rates(module)
    batch = Task(*(field.double() for field in sinusoid_batch(3)))
    weights = msl_weights(STEPS, meta_step, 10)
    assert module.loss_weights() == weights
    expected = unrolled_by_hand(module, batch, weights, first_order=False)
    expected_grads = torch.autograd.grad(expected, meta_parameters(module))
    loss, _ = module.meta_gradient(batch)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    for param, grad in zip(meta_parameters(module), expected_grads):
        torch.testing.assert_close(param.grad, grad, rtol=1e-9, atol=1e-12)


def test_lslr_learns_one_rate_per_layer_and_step_starting_at_the_inner_lr_and_each_gets_a_meta_gradient():
    module = sinusoid_mamlpp(msl_anneal_steps=0)
    assert sorted(module.learned) == ["lr/features/0", "lr/features/2", "lr/head"]
    for value in module.learned.values():
        assert value.shape == (STEPS,) and torch.equal(value.detach(), torch.full((STEPS,), LR))
    module.meta_gradient(sinusoid_batch(2))
    for key, value in module.learned.items():
        # the last step's rate moves the weights the query loss sees; the earlier ones move the later steps' starts
        assert value.grad is not None and bool((value.grad != 0).all()), key


def test_adapted_weights_use_the_rate_of_each_step_and_layer(float64):
    module = sinusoid_mamlpp()
    distinct_rates(module)
    batch = sinusoid_batch(1)
    x, y = batch.support_x[0].double(), batch.support_y[0].double()
    fast = dict(module.model.named_parameters())
    for k in range(STEPS):
        grads = torch.autograd.grad(F.mse_loss(functional_call(module.model, fast, (x,)), y), list(fast.values()))
        fast = {n: (w - rate(module, n, k) * g).detach().requires_grad_() for (n, w), g in zip(fast.items(), grads)}
    adapted = module.adapt((x, y), steps=STEPS)
    for name, value in fast.items():
        torch.testing.assert_close(adapted.weights[name], value, rtol=1e-12, atol=1e-12)
    # steps past the trained ones keep the last step's rates
    more = module.adapt((x, y), steps=STEPS + 1).weights
    grads = torch.autograd.grad(F.mse_loss(functional_call(module.model, fast, (x,)), y), list(fast.values()))
    for (name, value), grad in zip(fast.items(), grads):
        torch.testing.assert_close(more[name], value - rate(module, name, STEPS - 1) * grad, rtol=1e-12, atol=1e-12)


# -- derivative-order annealing ----------------------------------------------------------------
@pytest.mark.parametrize("meta_step,first_order", [(0, True), (1, True), (2, False), (7, False)])
def test_derivative_order_annealing_is_first_order_before_the_set_meta_step(float64, monkeypatch, meta_step, first_order):
    at_meta_step(monkeypatch, meta_step)
    module = sinusoid_mamlpp(first_order_steps=2, msl_anneal_steps=0)
    assert module.is_first_order() == first_order
    batch = Task(*(field.double() for field in sinusoid_batch(2)))
    weights = [0.0] * (STEPS - 1) + [1.0]
    references = {order: torch.autograd.grad(unrolled_by_hand(module, batch, weights, order), meta_parameters(module))
                  for order in (True, False)}
    module.meta_gradient(batch)
    for param, expected in zip(meta_parameters(module), references[first_order]):
        torch.testing.assert_close(param.grad, expected, rtol=1e-9, atol=1e-12)
    assert any(not torch.allclose(a, b) for a, b in zip(references[True], references[False]))


def test_first_order_makes_every_meta_step_first_order(monkeypatch):
    at_meta_step(monkeypatch, 10**6)
    assert sinusoid_mamlpp(first_order=True).is_first_order() and not sinusoid_mamlpp().is_first_order()


class Orders(lightning.Callback):
    """Records, at each meta-step, whether the module is first-order and its final multi-step-loss weight."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, float]] = []

    def on_train_batch_start(self, trainer, module, *args) -> None:
        self.seen.append((module.meta_step, module.is_first_order(), module.loss_weights()[-1]))


def test_the_schedules_follow_the_trainers_meta_steps():
    module = sinusoid_mamlpp(first_order_steps=2, msl_anneal_steps=3)
    orders = Orders()
    trainer(4, callbacks=[orders]).fit(module, train_dataloaders=DataLoader([sinusoid_batch(2)] * 4, batch_size=None))
    final = [msl_weights(STEPS, m, 3)[-1] for m in range(4)]
    assert orders.seen == [(0, True, final[0]), (1, True, final[1]), (2, False, final[2]), (3, False, 1.0)]


# -- per-step BatchNorm ---------------------------------------------------------------------
class RecordedSteps(PerStepConv4):
    """PerStepConv4 that records the ``step`` of every forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps_seen: list[int] = []

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        self.steps_seen.append(step)
        return super().forward(x, step)


def recorded_conv_mamlpp(**kwargs) -> MAMLPlusPlus:
    torch.manual_seed(0)
    return MAMLPlusPlus(
        RecordedSteps(5, steps=STEPS, hidden=8, image_size=16), Classification(),
        inner_optim=functools.partial(torch.optim.SGD, lr=0.4), outer_optim=functools.partial(torch.optim.Adam, lr=1e-3),
        msl_anneal_steps=10, first_order_steps=0, **with_inner({"inner_steps": STEPS, **kwargs}),
    )


def one_image_task(n_ways: int = 5) -> Task:
    task = image_tasks(n_ways)("train", torch.Generator().manual_seed(0))
    return Task(*(field[None] for field in task))


def test_training_runs_each_pass_with_the_step_its_weights_have_reached(monkeypatch):
    module = recorded_conv_mamlpp()
    module.meta_gradient(one_image_task())
    # support of step k uses slot k, the query after step k slot k + 1 (the multi-step loss scores every step)
    assert module.model.steps_seen == [0, 1, 1, 2, 2, 3]
    norm = module.model.blocks[1]["norm"]
    assert norm.weight.grad.shape == (STEPS + 1, 8) and bool((norm.weight.grad.abs().sum(1) > 0).all())
    assert bool((norm.running_mean.abs().sum(1) > 0).all())  # every slot's statistics were updated
    # after the annealing only the last step's query loss counts: the others are not computed
    at_meta_step(monkeypatch, 10)
    module.model.steps_seen.clear()
    module.meta_gradient(one_image_task())
    assert module.model.steps_seen == [0, 1, 2, 3]


@pytest.mark.parametrize("eval_stats", ["running", "batch"])
def test_evaluation_uses_the_statistics_of_each_step(eval_stats):
    module = conv_mamlpp(eval_stats=eval_stats)
    norms = [block["norm"] for block in module.model.blocks]
    with torch.no_grad():
        for norm in norms:  # distinct statistics per slot
            norm.running_mean.copy_(0.1 * torch.arange(STEPS + 1.0)[:, None].expand_as(norm.running_mean))
            norm.running_var.copy_(1.0 + torch.arange(STEPS + 1.0)[:, None].expand_as(norm.running_var))
    saved = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    task = one_image_task()
    module.eval()
    fmodel = module.adapt((task.support_x[0], task.support_y[0]))
    assert fmodel.step == STEPS
    logits = fmodel(task.query_x[0])
    # the same weights through the same net with slot STEPS's statistics and weights, by hand
    x = task.query_x[0]
    w = fmodel.weights
    for i, norm in enumerate(norms):
        x = F.conv2d(x, w[f"blocks.{i}.conv.weight"], w[f"blocks.{i}.conv.bias"], padding=1)
        mean, var = (norm.running_mean[STEPS], norm.running_var[STEPS]) if eval_stats == "running" else (None, None)
        x = F.batch_norm(x, mean, var, norm.weight[STEPS], norm.bias[STEPS], training=eval_stats == "batch")
        x = F.max_pool2d(F.relu(x), 2)
    torch.testing.assert_close(logits, F.linear(x.flatten(1), w["head.weight"], w["head.bias"]), rtol=1e-5, atol=1e-6)
    for norm, (mean, var) in zip(norms, saved):  # evaluation leaves the statistics alone
        assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)


def test_per_step_batchnorm_parameters_are_meta_learned_not_adapted():
    module = conv_mamlpp()
    assert not any(".norm." in name for name in module.adapted_names)
    assert "lr/blocks/0/norm" not in module.learned and "lr/blocks/0/conv" in module.learned
    assert not module.batched


def test_a_head_resized_for_more_ways_keeps_one_rate_per_step():
    # inner_steps equals the trained ways: a row of rates has the shape of the head's bias
    module = conv_mamlpp(inner_steps=5)
    _, hparams = module.initial_weights(7)
    assert hparams["head.bias"]["lr"] is module.learned["lr/head"]
    task = image_tasks(7)("val", torch.Generator().manual_seed(0))
    assert module.adapt((task.support_x, task.support_y), n_ways=7)(task.query_x).shape == (14, 7)


@pytest.mark.parametrize("kwargs,message", [
    ({"inner_steps": 0}, "inner.steps=0: MAML\\+\\+ needs at least one inner step"),
    ({"msl_anneal_steps": -1}, "msl_anneal_steps=-1"),
    ({"first_order_steps": 2.5}, "first_order_steps=2.5"),
    ({"learnable": {"lr": PerLayer()}}, "learnable also names 'lr'"),
    ({"batch_tasks": "vmap"}, r"batch_tasks='vmap' cannot adapt this model: it has buffers \(blocks.0.norm.running_mean"),
    ({"adapt_params": r"\.norm\."}, "parameters of layers that never adapt"),
    ({"meta_grad": "implicit"}, "meta_grad='implicit': MAML\\+\\+ unrolls"),
    ({"truncate": 2}, "truncate=2 applies only with meta_grad='truncated'"),
])
def test_constructor_errors_name_the_value_and_the_fix(kwargs, message):
    build = sinusoid_mamlpp if "inner_steps" in kwargs else conv_mamlpp  # (PerStepConv4 refuses 0 steps itself)
    with pytest.raises(ValueError, match=message):
        build(**kwargs)
    with pytest.raises(ValueError, match="steps=4 but inner.steps=3"):
        MAMLPlusPlus(PerStepConv4(5, steps=4, hidden=8, image_size=16), Classification(), InnerOptions(steps=3), functools.partial(torch.optim.SGD, lr=0.4), functools.partial(torch.optim.Adam, lr=1e-3))


# -- fit, validate, test, checkpoints, precision ---------------------------------------------
def trainer(steps: int, **kwargs) -> lightning.Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return lightning.Trainer(**options)


def module_arguments() -> dict:
    return dict(
        model=PerStepConv4(5, steps=STEPS, hidden=8, image_size=16), objective=Classification(),
        inner_optim=functools.partial(torch.optim.SGD, lr=0.4), outer_optim=functools.partial(torch.optim.Adam, lr=1e-3),
        inner_steps=STEPS, msl_anneal_steps=2, first_order_steps=1,
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3, eta_min=1e-5),
    )


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_validate_test_and_a_checkpoint_round_trip(tmp_path, precision):
    torch.manual_seed(0)
    module = MAMLPlusPlus(**with_inner(module_arguments()))
    data = MetaDataModule(image_tasks(), meta_batch_size=2, eval_meta_batch_size=3, num_val_tasks=3, num_test_tasks=3)
    fitting = trainer(3, precision=precision, val_check_interval=3, default_root_dir=tmp_path)
    fitting.fit(module, datamodule=data)
    assert fitting.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-5)  # cosine annealing to eta_min
    [tested] = fitting.test(module, datamodule=data, verbose=False)
    [validated] = fitting.validate(module, datamodule=data, verbose=False)
    assert 0.0 <= tested["test/acc_post"] <= 1.0 and "test/acc_post_ci95" in tested and "val/acc_post" in validated
    for value in (*module.model.parameters(), *module.learned.values(), *module.model.buffers()):
        assert value.dtype == torch.float32 and bool(torch.isfinite(value).all())
    assert not torch.equal(module.learned["lr/head"].detach(), torch.full((STEPS,), 0.4))
    path = tmp_path / "mamlpp.ckpt"
    fitting.save_checkpoint(path)
    torch.manual_seed(1)
    loaded = MAMLPlusPlus.load_from_checkpoint(path, **with_inner(module_arguments()))
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert any("running_mean" in key for key in loaded.state_dict())
    [again] = trainer(1, precision=precision).test(loaded, datamodule=data, verbose=False)
    assert again == pytest.approx(tested, rel=1e-6)
