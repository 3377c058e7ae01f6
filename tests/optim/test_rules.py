"""Hypergradients of every rule match finite differences; no NaN from a zero state."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import metaloop
from metaloop.optim import safe_sqrt

# (optimizer, constructor kwargs, hyperparameters learned as tensors, unrolled steps)
HYPER_CASES: list[tuple[type, dict[str, Any], list[str], int]] = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}, ["lr", "momentum", "dampening", "weight_decay"], 3),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.8, "nesterov": True, "maximize": True}, ["lr", "momentum"], 3),
    # No override: Python-number hyperparameters take the foreach kernels.
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, [], 3),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "maximize": True}, [], 3),
    (torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}, [], 3),
    (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.2, "maximize": True}, [], 3),
    (torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.1}, ["lr", "betas", "eps", "weight_decay"], 3),
    (torch.optim.Adam, {"lr": 0.05, "amsgrad": True, "eps": 1e-3}, ["lr", "betas", "eps"], 3),
    (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.2}, ["lr", "betas", "weight_decay"], 3),
    (torch.optim.Adamax, {"lr": 0.05, "weight_decay": 0.1}, ["lr", "betas", "eps", "weight_decay"], 3),
    (torch.optim.Adadelta, {"lr": 1.0, "eps": 1e-2, "weight_decay": 0.1}, ["lr", "rho", "eps", "weight_decay"], 3),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1, "initial_accumulator_value": 0.1, "weight_decay": 0.1},
     ["lr", "lr_decay", "eps", "weight_decay"], 3),
    (torch.optim.ASGD, {"lr": 0.05, "lambd": 0.1, "weight_decay": 0.1}, ["lr", "lambd", "alpha", "weight_decay"], 3),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.1}, ["lr", "alpha", "eps", "momentum", "weight_decay"], 3),
    (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "eps": 1e-3}, ["lr", "alpha", "eps"], 3),
    (torch.optim.Rprop, {"lr": 0.01}, ["lr", "etas"], 4),
    (torch.optim.NAdam, {"lr": 0.05, "weight_decay": 0.1}, ["lr", "betas", "momentum_decay", "weight_decay"], 3),
    (torch.optim.NAdam, {"lr": 0.05, "weight_decay": 0.1, "decoupled_weight_decay": True}, ["lr", "weight_decay"], 3),
    (torch.optim.RAdam, {"lr": 0.05, "betas": (0.9, 0.99), "weight_decay": 0.1}, ["lr", "betas", "weight_decay"], 7),
    (torch.optim.RAdam, {"lr": 0.05, "betas": (0.9, 0.99), "decoupled_weight_decay": True, "weight_decay": 0.1}, ["lr"], 7),
]


def hyper_id(case) -> str:
    opt_type, kwargs, learned, _ = case
    flags = ",".join(k for k, v in kwargs.items() if v is True)
    return f"{opt_type.__name__}[{flags or 'plain'}]<-{'+'.join(learned)}"


def data(steps: int):
    gen = torch.Generator().manual_seed(3)
    inner = [(torch.randn(5, 3, generator=gen), torch.randn(5, 1, generator=gen)) for _ in range(steps)]
    outer = (torch.randn(7, 3, generator=gen), torch.randn(7, 1, generator=gen))
    return inner, outer


def mlp(params, x):
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def initial_weights():
    gen = torch.Generator().manual_seed(4)
    shapes = [(2, 3), (2,), (1, 2), (1,)]
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


def initial_hyper(opt_type, kwargs, learned):
    defaults = opt_type([torch.zeros(1)], **kwargs).param_groups[0]
    values = []
    for key in learned:
        value = defaults[key]
        for v in value if isinstance(value, tuple) else (value,):
            values.append(torch.tensor(float(v), requires_grad=True))
    return values


def unrolled(opt_type, kwargs, learned, steps):
    """Returns f(*weights, *hyper) -> query loss after `steps` differentiable updates."""
    inner, (qx, qy) = data(steps)
    n_weights = len(initial_weights())

    def f(*inputs):
        params, hyper = list(inputs[:n_weights]), list(inputs[n_weights:])
        override = {}
        defaults = opt_type([torch.zeros(1)], **kwargs).param_groups[0]
        for key in learned:
            width = len(defaults[key]) if isinstance(defaults[key], tuple) else 1
            taken, hyper = hyper[:width], hyper[width:]
            override[key] = tuple(taken) if width > 1 else taken[0]
        diffopt = metaloop.create_diff_optim(opt_type, kwargs, params=params, override=override)
        for x, y in inner:
            params = diffopt.step(((mlp(params, x) - y) ** 2).mean(), params=params)
        return ((mlp(params, qx) - qy) ** 2).mean()

    return f


@pytest.mark.parametrize("case", HYPER_CASES, ids=hyper_id)
def test_hypergradients_match_finite_differences(case):
    """d(query loss)/d(initial weights, hyperparameters) equals central differences (float64)."""
    opt_type, kwargs, learned, steps = case
    inputs = (*initial_weights(), *initial_hyper(opt_type, kwargs, learned))
    f = unrolled(opt_type, kwargs, learned, steps)
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    grads = torch.autograd.grad(f(*inputs), inputs, allow_unused=True)
    # Every learned hyperparameter influences the query loss (ASGD's alpha only from step 2 on).
    assert all(g is not None and g.abs().sum() > 0 for g in grads[4:]), grads[4:]


@pytest.mark.parametrize(
    "case",
    [HYPER_CASES[i] for i in (0, 2, 4, 6, 10, 14)],
    ids=hyper_id,
)
def test_second_order_hypergradients_match_finite_differences(case):
    """Hessian-vector products through the unrolled loop are correct too (gradgradcheck)."""
    opt_type, kwargs, learned, steps = case
    weights = initial_weights()
    hyper = initial_hyper(opt_type, kwargs, learned)
    f = unrolled(opt_type, kwargs, learned, steps)

    def g(w1, *lr):
        return f(w1, *weights[1:], *lr, *hyper[1:])

    assert gradgradcheck(g, (weights[0], *hyper[:1]), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_rprop_smooth_sign_gives_nonzero_second_order_terms():
    """Exact Rprop: the gradient through sign(g) is zero; smooth_sign=tau makes it non-zero."""
    inner, (qx, qy) = data(2)

    def query_loss(smooth):
        params = initial_weights()
        opt = torch.optim.Rprop([torch.zeros_like(p) for p in params], lr=0.01)
        diffopt = metaloop.optim.DifferentiableRprop(opt, opt.param_groups[0]["params"], smooth_sign=smooth)
        fast = params
        for x, y in inner:
            fast = diffopt.step(((mlp(fast, x) - y) ** 2).mean(), params=fast)
        loss = ((mlp(fast, qx) - qy) ** 2).mean()
        return loss, params, fast

    loss, params, fast = query_loss(0.0)
    # Exact: new = old - sign(g) * step, so d new / d old is the identity.
    jac = torch.autograd.grad(fast[0].sum(), params[0], retain_graph=True)[0]
    torch.testing.assert_close(jac, torch.ones_like(jac))
    loss, params, fast = query_loss(0.05)
    jac = torch.autograd.grad(fast[0].sum(), params[0])[0]
    assert (jac - 1).abs().max() > 1e-3
    with pytest.raises(ValueError, match="smooth_sign=-1"):
        weight = torch.zeros(1)
        metaloop.optim.DifferentiableRprop(torch.optim.Rprop([weight]), [weight], smooth_sign=-1)


ADAPTIVE = [
    (torch.optim.Adam, {}),
    (torch.optim.Adam, {"amsgrad": True}),
    (torch.optim.AdamW, {"amsgrad": True}),
    (torch.optim.Adamax, {}),
    (torch.optim.Adadelta, {}),
    (torch.optim.Adagrad, {}),
    (torch.optim.RMSprop, {}),
    (torch.optim.RMSprop, {"centered": True, "momentum": 0.9}),
    (torch.optim.Rprop, {}),
    (torch.optim.NAdam, {}),
    (torch.optim.RAdam, {}),
]


@pytest.mark.parametrize("learn_lr", [True, False], ids=["tensor-lr", "float-lr"])
@pytest.mark.parametrize("opt_type,kwargs", ADAPTIVE, ids=lambda v: getattr(v, "__name__", str(v)))
def test_no_nan_in_second_order_gradients_from_zero_state(opt_type, kwargs, learn_lr):
    """Zero gradients from a fresh state (sqrt at 0, max ties, sign at 0) give finite hypergradients."""
    torch.manual_seed(0)
    x = torch.randn(6, 3)
    x[:, 1] = 0.0  # the weights of input 1 get exactly zero gradient
    y = torch.randn(6, 1)
    weight = torch.randn(1, 3, requires_grad=True)
    lr = torch.tensor(0.01, requires_grad=True)
    override = {"lr": lr} if learn_lr else None  # a float lr takes the foreach kernels where there are any
    diffopt = metaloop.create_diff_optim(opt_type, {"lr": 0.01, **kwargs}, params=[weight], override=override)
    fast = [weight]
    for _ in range(3):
        fast = diffopt.step(((x @ fast[0].T - y) ** 2).mean(), params=fast)
    query = ((x @ fast[0].T - y) ** 2).mean()
    g_weight, g_lr = torch.autograd.grad(query, [weight, lr], create_graph=True, allow_unused=True)
    g_lr = g_lr if learn_lr else torch.zeros(())
    assert torch.isfinite(g_weight).all() and torch.isfinite(g_lr).all()
    second = torch.autograd.grad(g_weight.sum() + g_lr, [weight, lr], allow_unused=True)
    assert all(s is None or torch.isfinite(s).all() for s in second)


def test_safe_sqrt_value_and_derivatives():
    x = torch.tensor([0.0, 4.0, -1.0], requires_grad=True)
    y = safe_sqrt(x)
    torch.testing.assert_close(y, torch.tensor([0.0, 2.0, 0.0]))
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    torch.testing.assert_close(g, torch.tensor([0.0, 0.25, 0.0]))
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(gg, torch.tensor([0.0, -1 / 32, 0.0]))
