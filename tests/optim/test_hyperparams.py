"""Overrides: learned hyperparameters per group or per parameter, and their export."""

from __future__ import annotations

import pytest
import torch

import metaloop
from metaloop.optim import apply_trainable_opt_params, get_trainable_opt_params


def two_group_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return model, opt, x, y


def test_per_group_override_values_and_gradients():
    model, opt, x, y = two_group_setup()
    lrs = [torch.tensor(0.1, requires_grad=True), torch.tensor(0.5, requires_grad=True)]
    with metaloop.innerloop_ctx(model, opt, override={"lr": lrs}) as (fmodel, diffopt):
        diffopt.step(((fmodel(x) - y) ** 2).mean())
        overridden = list(fmodel.parameters())
        query = ((fmodel(x) - y) ** 2).mean()
        grads = torch.autograd.grad(query, lrs)
    with metaloop.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(((fmodel(x) - y) ** 2).mean())
        for a, b in zip(overridden, fmodel.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)  # foreach vs per-tensor rounding
    assert all(g.abs() > 0 for g in grads)


def test_single_value_override_applies_to_every_group():
    model, opt, x, y = two_group_setup()
    lr = torch.tensor(0.2, requires_grad=True)
    with metaloop.innerloop_ctx(model, opt, override={"lr": [lr]}) as (_, diffopt):
        assert all(group["lr"] is lr for group in diffopt.param_groups)
    with metaloop.innerloop_ctx(model, opt, override={"lr": lr}) as (_, diffopt):
        assert all(group["lr"] is lr for group in diffopt.param_groups)


def test_per_parameter_learning_rates_meta_sgd():
    """A list of tensors, one per parameter of a group, gives Meta-SGD's elementwise rates."""
    model, opt, x, y = two_group_setup()
    lrs0 = [torch.full_like(p, 0.1).requires_grad_() for p in model[0].parameters()]
    lrs2 = [torch.full_like(p, 0.5).requires_grad_() for p in model[2].parameters()]
    with metaloop.innerloop_ctx(model, opt, override={"lr": [lrs0, lrs2]}) as (fmodel, diffopt):
        loss = ((fmodel(x) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, list(fmodel.parameters()), retain_graph=True)
        diffopt.step(loss)
        for p0, p1, g, lr in zip(fmodel.parameters(time=0), fmodel.parameters(), grads, lrs0 + lrs2):
            torch.testing.assert_close(p1, p0 - lr * g)
        query = ((fmodel(x) - y) ** 2).mean()
        meta = torch.autograd.grad(query, lrs0 + lrs2)
    assert all(m.shape == lr.shape and m.abs().sum() > 0 for m, lr in zip(meta, lrs0 + lrs2))


def test_step_override_has_precedence_and_persists():
    model, opt, x, y = two_group_setup()
    with metaloop.innerloop_ctx(model, opt, override={"lr": 0.3}) as (fmodel, diffopt):
        diffopt.step(((fmodel(x) - y) ** 2).mean(), override={"lr": [0.0, 0.0]})
        for a, b in zip(fmodel.parameters(time=0), fmodel.parameters()):
            torch.testing.assert_close(a, b)
        diffopt.step(((fmodel(x) - y) ** 2).mean())
        for a, b in zip(fmodel.parameters(time=1), fmodel.parameters()):
            torch.testing.assert_close(a, b)


def test_get_trainable_opt_params_takes_numbers_only():
    model, _, _, _ = two_group_setup()
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], lr=0.1)
    override = get_trainable_opt_params(opt)
    assert set(override) == {"lr", "betas", "eps", "weight_decay"}
    assert [v.item() for v in override["lr"]] == [0.1, 0.5]
    b1, b2 = override["betas"][0]
    assert b1.requires_grad and b2.requires_grad and b2.item() == pytest.approx(0.999)
    with metaloop.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        x = torch.randn(4, 3)
        diffopt.step(fmodel(x).pow(2).mean())
        grads = torch.autograd.grad(fmodel(x).pow(2).mean(), [override["lr"][1], b1])
    assert all(torch.isfinite(g) and g != 0 for g in grads)


def test_apply_trainable_opt_params_writes_values_back():
    model, opt, _, _ = two_group_setup()
    override = get_trainable_opt_params(opt)
    with torch.no_grad():
        override["lr"][0].fill_(0.25)
    apply_trainable_opt_params(opt, override)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.5]
    assert isinstance(opt.param_groups[0]["lr"], float)
    apply_trainable_opt_params(opt, {"momentum": [torch.tensor(0.9)]})
    assert [g["momentum"] for g in opt.param_groups] == [pytest.approx(0.9)] * 2


def test_apply_trainable_opt_params_keeps_each_values_type():
    """higher's round trip: Adam's int weight_decay=0 comes back an int, betas a tuple of floats."""
    weight = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([weight], lr=0.1, weight_decay=0)
    apply_trainable_opt_params(opt, get_trainable_opt_params(opt))
    group = opt.param_groups[0]
    assert type(group["weight_decay"]) is int and group["weight_decay"] == 0
    assert type(group["lr"]) is float and group["lr"] == pytest.approx(0.1)
    assert type(group["betas"]) is tuple and all(type(b) is float for b in group["betas"])
    # A learned value that is not a whole number is not truncated into an int slot.
    apply_trainable_opt_params(opt, {"weight_decay": [torch.tensor(0.25)]})
    assert group["weight_decay"] == 0.25


@pytest.mark.parametrize(
    "override,message",
    [
        ({"lrr": 0.1}, r"unknown override key 'lrr'.*'lr'"),
        ({"lr": [0.1, 0.2, 0.3]}, r"'lr' has 3 values but the optimizer has 2 param group"),
        ({"lr": [[0.1], 0.2]}, r"'lr' gives 1 per-parameter values for a group of 2 parameters"),
    ],
)
def test_bad_overrides_are_rejected_with_the_value(override, message):
    model, opt, x, _ = two_group_setup()
    with pytest.raises(ValueError, match=message):
        with metaloop.innerloop_ctx(model, opt, override=override):
            pass
    with metaloop.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(ValueError, match=message):
            diffopt.step(fmodel(x).sum(), override=override)
    with pytest.raises(TypeError, match="override must be a dict"):
        metaloop.optim.get_diff_optim(opt, model.parameters(), override=[0.1])
