"""learn2learn's MAML, MetaSGD and GBML: meta-gradients equal closed forms (float64, 1e-10) and pass gradcheck.

The closed forms use least squares, ``L(w) = 1/(2n) ||X w - y||^2``, whose gradient is
``A w - b`` with ``A = X^T X / n``, ``b = X^T y / n``. One inner step ``w' = w - lr * (A_s w - b_s)``
has Jacobian ``I - lr A_s``, so the MAML meta-gradient of the query loss is
``(I - lr A_s) (A_q w' - b_q)`` (first order: ``A_q w' - b_q``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaloop.compat import learn2learn as l2l

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-10)


def regression_problem(seed: int = 0, d: int = 4, n: int = 6):
    gen = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n, d, generator=gen, dtype=F64), torch.randn(n, d, generator=gen, dtype=F64)
    ys, yq = torch.randn(n, 1, generator=gen, dtype=F64), torch.randn(n, 1, generator=gen, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen, dtype=F64))
    return model, (xs, ys), (xq, yq)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum() / y.shape[0]


def moments(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.t() @ x / x.shape[0], x.t() @ y / x.shape[0]


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_equals_closed_form(steps, first_order):
    model, (xs, ys), (xq, yq) = regression_problem()
    lr = 0.3
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)
    learner = maml.clone()
    for _ in range(steps):
        learner.adapt(mse(learner(xs), ys))
    mse(learner(xq), yq).backward()

    a_s, b_s = moments(xs, ys)
    a_q, b_q = moments(xq, yq)
    w = model.weight.detach().t()
    jacobian = torch.eye(4, dtype=F64)
    for _ in range(steps):
        w = w - lr * (a_s @ w - b_s)
        jacobian = (torch.eye(4, dtype=F64) - lr * a_s) @ jacobian
    expected = a_q @ w - b_q if first_order else jacobian.t() @ (a_q @ w - b_q)
    torch.testing.assert_close(learner.module.weight.detach().t(), w, **TOL)
    torch.testing.assert_close(model.weight.grad.t(), expected, **TOL)


def test_maml_adapt_arguments_override_the_learners_settings():
    model, (xs, ys), (xq, yq) = regression_problem()
    maml = l2l.algorithms.MAML(model, lr=0.3, first_order=False)
    learner = maml.clone(first_order=True)
    assert learner.first_order and not maml.first_order
    learner.adapt(mse(learner(xs), ys), first_order=False)
    mse(learner(xq), yq).backward()
    a_s, b_s = moments(xs, ys)
    a_q, b_q = moments(xq, yq)
    w = model.weight.detach().t() - 0.3 * (a_s @ model.weight.detach().t() - b_s)
    torch.testing.assert_close(model.weight.grad.t(), (torch.eye(4, dtype=F64) - 0.3 * a_s) @ (a_q @ w - b_q), **TOL)


def test_maml_second_order_passes_gradcheck_on_a_nonlinear_model():
    """Query loss after two MAML steps of a tanh MLP, as a function of the initial weights: gradcheck (float64)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(5, 2, generator=gen, dtype=F64)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    names = [name for name, _ in net.named_parameters()]
    init = tuple(p.detach().clone().requires_grad_() for p in net.parameters())

    def query_loss(*params: torch.Tensor) -> torch.Tensor:
        for name, p in zip(names, params):
            module, attr = net.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            module._parameters[attr] = p
        learner = l2l.algorithms.MAML(net, lr=0.5).clone()
        for _ in range(2):
            learner.adapt(mse(learner(x), y))
        return mse(learner(x * 0.5), y)

    assert torch.autograd.gradcheck(query_loss, init, eps=1e-6, atol=1e-7)


def test_maml_update_applies_minus_lr_times_grads_and_skips_none():
    model = nn.Linear(2, 2).double()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    g = torch.ones_like(w)
    l2l.algorithms.maml_update(model, 0.5, [g, None])
    torch.testing.assert_close(model.weight, w - 0.5 * g, **TOL)
    torch.testing.assert_close(model.bias, b, **TOL)
    with pytest.raises(ValueError, match="update_module got 1 updates for a module with 2 parameters"):
        l2l.algorithms.maml_update(model, 0.5, [g])


def test_maml_rejects_a_frozen_parameter_without_allow_nograd_and_leaves_it_with_it():
    model, (xs, ys), _ = regression_problem()
    model.weight.requires_grad_(False)
    bias_model = nn.Sequential(model, nn.Linear(1, 1).double())
    learner = l2l.algorithms.MAML(bias_model, lr=0.1).clone()
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(1, 4\)\) has requires_grad=False; pass allow_nograd=True"):
        learner.adapt(mse(learner(xs), ys))
    before = learner.module[0].weight
    learner.adapt(mse(learner(xs), ys), allow_nograd=True)
    assert learner.module[0].weight is before


def test_maml_rejects_an_unused_parameter_without_allow_unused():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).double()
    learner = l2l.algorithms.MAML(model, lr=0.1).clone()
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="the loss does not depend on parameter 2"):
        learner.adapt(learner.module[0](x).sum())
    learner.adapt(learner.module[0](x).sum(), allow_unused=True)
    assert learner.module[1].weight.grad_fn is not None  # cloned, untouched by the step


def test_allow_unused_defaults_to_allow_nograd():
    assert l2l.algorithms.MAML(nn.Linear(1, 1), lr=0.1, allow_nograd=True).allow_unused
    assert not l2l.algorithms.MAML(nn.Linear(1, 1), lr=0.1).allow_unused
    assert not l2l.algorithms.MAML(nn.Linear(1, 1), lr=0.1, allow_nograd=True, allow_unused=False).allow_unused


def test_base_learner_forwards_calls_and_attributes():
    inner = nn.Linear(3, 2)
    learner = l2l.algorithms.BaseLearner(inner)
    assert learner.in_features == 3 and learner.weight is inner.weight
    x = torch.randn(4, 3)
    torch.testing.assert_close(learner(x), inner(x))
    with pytest.raises(AttributeError):
        learner.no_such_attribute


@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_gradients_of_weights_and_learning_rates_equal_closed_form(first_order):
    model, (xs, ys), (xq, yq) = regression_problem()
    meta = l2l.algorithms.MetaSGD(model, lr=0.2, first_order=first_order)
    with torch.no_grad():
        meta.lrs[0].copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=F64))
    learner = meta.clone()
    learner.adapt(mse(learner(xs), ys))
    mse(learner(xq), yq).backward()

    a_s, b_s = moments(xs, ys)
    a_q, b_q = moments(xq, yq)
    lr = meta.lrs[0].detach().t()
    w0 = model.weight.detach().t()
    g_s = a_s @ w0 - b_s
    w1 = w0 - lr * g_s
    g_q = a_q @ w1 - b_q
    expected_w = g_q if first_order else (torch.eye(4, dtype=F64) - a_s @ torch.diag(lr.flatten())) @ g_q
    torch.testing.assert_close(model.weight.grad.t(), expected_w, **TOL)
    torch.testing.assert_close(meta.lrs[0].grad.t(), -g_s * g_q, **TOL)


def test_metasgd_holds_one_learning_rate_per_element_or_the_given_ones():
    model = nn.Linear(3, 2)
    meta = l2l.algorithms.MetaSGD(model, lr=0.25)
    assert sum(p.numel() for p in meta.parameters()) == 2 * sum(p.numel() for p in model.parameters())
    assert all(torch.equal(lr, torch.full_like(lr, 0.25)) for lr in meta.lrs)
    lrs = [torch.ones(2, 3), torch.ones(2)]
    assert l2l.algorithms.MetaSGD(model, lrs=lrs).lrs is lrs


def test_meta_sgd_update_uses_grad_attributes_by_default_and_checks_lengths():
    model = nn.Linear(2, 1).double()
    w = model.weight.detach().clone()
    model.weight.grad, model.bias.grad = torch.ones_like(w), None
    l2l.algorithms.meta_sgd_update(model, [torch.full_like(w, 0.5), torch.ones(1, dtype=F64)])
    torch.testing.assert_close(model.weight, w - 0.5, **TOL)
    with pytest.raises(ValueError, match="needs lrs"):
        l2l.algorithms.meta_sgd_update(model)
    with pytest.raises(ValueError, match="got 1 learning rates for 2 parameters"):
        l2l.algorithms.meta_sgd_update(model, [torch.ones(1)])


def scale_transform(alpha: float):
    return lambda p: l2l.nn.Scale(p.shape, alpha=alpha).double()


@pytest.mark.parametrize("first_order", [False, True])
def test_gbml_with_a_scale_transform_is_metasgd(first_order):
    """GBML(transform=Scale(alpha)) steps w - lr * alpha * g: gradients of w and alpha in closed form."""
    model, (xs, ys), (xq, yq) = regression_problem()
    gbml = l2l.algorithms.GBML(model, transform=scale_transform(0.5), lr=0.4, first_order=first_order)
    learner = gbml.clone()
    learner.adapt(mse(learner(xs), ys))
    mse(learner(xq), yq).backward()

    a_s, b_s = moments(xs, ys)
    a_q, b_q = moments(xq, yq)
    w0 = model.weight.detach().t()
    g_s = a_s @ w0 - b_s
    g_q = a_q @ (w0 - 0.4 * 0.5 * g_s) - b_q
    expected = g_q if first_order else (torch.eye(4, dtype=F64) - 0.2 * a_s) @ g_q
    torch.testing.assert_close(model.weight.grad.t(), expected, **TOL)
    alpha = next(gbml.compute_update.parameters())
    torch.testing.assert_close(alpha.grad.t(), -0.4 * g_s * g_q, **TOL)


def test_gbml_adapt_transform_steps_the_transform_before_the_second_step():
    """With adapt_transform, step 2 first sets alpha1 = alpha0 + lr^2 g_s(w0) g_s(w1), then w2 = w1 - lr alpha1 g_s(w1)."""
    model, (xs, ys), _ = regression_problem()
    lr = 0.4
    learner = l2l.algorithms.GBML(model, transform=scale_transform(0.5), lr=lr, adapt_transform=True).clone()
    learner.adapt(mse(learner(xs), ys))
    learner.adapt(mse(learner(xs), ys))

    a_s, b_s = moments(xs, ys)
    w0 = model.weight.detach().t()
    g0 = a_s @ w0 - b_s
    w1 = w0 - lr * 0.5 * g0
    g1 = a_s @ w1 - b_s
    alpha1 = 0.5 + lr**2 * g0 * g1
    torch.testing.assert_close(next(learner.compute_update.parameters()).detach().t(), alpha1, **TOL)
    torch.testing.assert_close(learner.module.weight.detach().t(), w1 - lr * alpha1 * g1, **TOL)


def test_gbml_second_order_passes_gradcheck_with_adapt_transform():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(5, 1, generator=gen, dtype=F64)
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    init = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    names = [name for name, _ in net.named_parameters()]

    def query_loss(*params: torch.Tensor) -> torch.Tensor:
        for name, p in zip(names, params):
            prefix, attr = name.rsplit(".", 1)
            net.get_submodule(prefix)._parameters[attr] = p
        learner = l2l.algorithms.GBML(net, transform=scale_transform(0.7), lr=0.3, adapt_transform=True).clone()
        for _ in range(2):
            learner.adapt(mse(learner(x), y))
        return mse(learner(x * 0.5), y)

    assert torch.autograd.gradcheck(query_loss, init, eps=1e-6, atol=1e-7)


def test_gbml_rejects_unknown_keywords():
    with pytest.raises(TypeError, match=r"unexpected arguments \['lrs'\]"):
        l2l.algorithms.GBML(nn.Linear(1, 1), transform=scale_transform(1.0), lrs=[1.0])
