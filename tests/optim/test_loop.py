"""The fast inner loop equals the higher-compatible one, sequentially and under vmap."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

import metaloop
from metaloop.optim import RULES
from metaloop.optim.loop import adapt


def mse(out, y):
    return ((out - y) ** 2).mean()


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


def tasks(n=3):
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(n, 5, 1, generator=gen) for _ in range(4)]


@pytest.mark.parametrize("opt_type,kwargs,rule", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "sgd"),
    (torch.optim.Adam, {"lr": 0.05}, "adam"),
])
@pytest.mark.parametrize("first_order", [False, True])
def test_adapt_matches_innerloop_ctx(mlp, opt_type, kwargs, rule, first_order):
    sx, sy, qx, qy = tasks()
    names = [n for n, _ in mlp.named_parameters()]
    hp = opt_type([torch.zeros(1)], **kwargs).param_groups[0]
    hparams = {n: hp for n in names}
    params = dict(mlp.named_parameters())

    def query_loss(i, batched=False, p=params):
        fast = adapt(mlp, p, sx[i], sy[i], loss_fn=mse, rule=RULES[rule], hparams=hparams, steps=3,
                     first_order=first_order, batched=batched)
        return mse(functional_call(mlp, fast, (qx[i],)), qy[i])

    sequential = torch.stack([query_loss(i) for i in range(3)])
    expected_grads = torch.autograd.grad(sequential.sum(), list(mlp.parameters()))
    batched = vmap(lambda x, y, a, b: mse(functional_call(mlp, adapt(
        mlp, params, x, y, loss_fn=mse, rule=RULES[rule], hparams=hparams, steps=3,
        first_order=first_order, batched=True), (a,)), b))(sx, sy, qx, qy)
    batched_grads = torch.autograd.grad(batched.sum(), list(mlp.parameters()))
    torch.testing.assert_close(batched, sequential)
    for a, b in zip(batched_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if first_order:
        return
    opt = opt_type(mlp.parameters(), **kwargs)
    reference = []
    for i in range(3):
        with metaloop.innerloop_ctx(mlp, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(mse(fmodel(sx[i]), sy[i]))
            reference.append(mse(fmodel(qx[i]), qy[i]))
    torch.testing.assert_close(sequential, torch.stack(reference))
    ref_grads = torch.autograd.grad(torch.stack(reference).sum(), list(mlp.parameters()))
    for a, b in zip(expected_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_order_gradient_is_the_query_gradient_at_adapted_weights(mlp):
    sx, sy, qx, qy = tasks(1)
    names = [n for n, _ in mlp.named_parameters()]
    hparams = {n: {"lr": 0.1, "momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0} for n in names}
    fast = adapt(mlp, dict(mlp.named_parameters()), sx[0], sy[0], loss_fn=mse, rule=RULES["sgd"],
                 hparams=hparams, steps=2, first_order=True)
    loss = mse(functional_call(mlp, fast, (qx[0],)), qy[0])
    meta = torch.autograd.grad(loss, list(mlp.parameters()))
    detached = {n: w.detach().requires_grad_() for n, w in fast.items()}
    direct = torch.autograd.grad(mse(functional_call(mlp, detached, (qx[0],)), qy[0]), list(detached.values()))
    for a, b in zip(meta, direct):
        torch.testing.assert_close(a, b)


def test_anil_adapts_only_named_parameters_and_eval_mode_keeps_no_graph(mlp):
    sx, sy, _, _ = tasks(1)
    head = {"2.weight": {"lr": 0.5, "momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0},
            "2.bias": {"lr": 0.5, "momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0}}
    params = dict(mlp.named_parameters())
    fast = adapt(mlp, params, sx[0], sy[0], loss_fn=mse, rule=RULES["sgd"], hparams=head, steps=2)
    assert fast["0.weight"] is params["0.weight"] and fast["2.weight"] is not params["2.weight"]
    fast = adapt(mlp, params, sx[0], sy[0], loss_fn=mse, rule=RULES["sgd"], hparams=head, steps=4,
                 track_higher_grads=False)
    assert fast["2.weight"].grad_fn is None and not fast["2.weight"].requires_grad
    with pytest.raises(ValueError, match=r"hparams name parameters \['nope'\]"):
        adapt(mlp, params, sx[0], sy[0], loss_fn=mse, rule=RULES["sgd"], hparams={"nope": {}}, steps=1)
    with pytest.raises(ValueError, match="steps=-1"):
        adapt(mlp, params, sx[0], sy[0], loss_fn=mse, rule=RULES["sgd"], hparams=head, steps=-1)


def test_transform_rule_checks_shape():
    rule = RULES["transform"]
    p, g = torch.ones(3), torch.ones(3)
    new, _ = rule.update(p, g, {}, {"lr": 0.5, "transform": lambda grad: 2 * grad})
    torch.testing.assert_close(new, torch.zeros(3))
    with pytest.raises(ValueError, match=r"update of shape \(1, 3\) for a gradient of shape \(3,\)"):
        rule.update(p, g, {}, {"transform": lambda grad: grad.reshape(1, 3)})


def test_vmap_refuses_second_order_through_batchnorm_but_first_order_matches():
    """PyTorch 2.13's vmap gets second-order BatchNorm gradients wrong: adapt refuses, first order is fine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(3, 6, 1, 6, 6), torch.randint(0, 3, (3, 6))
    hp = {"lr": 0.4, "momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0}
    hparams = {n: hp for n, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    ce = nn.functional.cross_entropy

    def task_loss(first_order, batched):
        def one(xi, yi):
            fast = adapt(model, params, xi, yi, loss_fn=ce, rule=RULES["sgd"], hparams=hparams, steps=2,
                         first_order=first_order, batched=batched)
            return ce(functional_call(model, fast, (xi,)), yi)
        return one

    with pytest.raises(ValueError, match=r"BatchNorm layers \(1\) get wrong second-order gradients under vmap"):
        vmap(task_loss(False, True))(x, y)
    batched = torch.autograd.grad(vmap(task_loss(True, True))(x, y).sum(), list(params.values()))
    sequential = torch.autograd.grad(sum(task_loss(True, False)(xi, yi) for xi, yi in zip(x, y)), list(params.values()))
    for a, b in zip(batched, sequential):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert metaloop.optim.loop.vmap_problems(nn.BatchNorm1d(3)) != []
    assert metaloop.optim.loop.vmap_problems(nn.Linear(2, 2)) == []
