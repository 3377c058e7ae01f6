"""Implicit meta-gradients (metaloop.optim.implicit) against ridge regression's closed form, in float64.

The inner problem ``min_phi 1/2 ||X phi - y||^2 + lam/2 ||phi - theta||^2`` has the solution
``phi* = (X^T X + lam I)^-1 (X^T y + lam theta)``, so for a query loss ``1/2 ||Xq phi* - yq||^2``
the meta-gradient is ``lam (X^T X + lam I)^-1 Xq^T (Xq phi* - yq)``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import vmap

from metaloop.optim import OPTIMIZERS
from metaloop.optim.hyperparams import per_parameter
from metaloop.optim.implicit import (
    ImplicitOptions,
    conjugate_gradient,
    custom_root,
    implicit_inner_loop,
    implicit_solution,
    neumann,
)

DIM, LAM = 5, 2.0


def ridge_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, xq = torch.randn(8, DIM, generator=gen) / 4, torch.randn(6, DIM, generator=gen)  # ||H|| < LAM: Neumann converges
    return x, torch.randn(8, generator=gen), xq, torch.randn(6, generator=gen)


def support_loss(x, y):
    return lambda w: 0.5 * ((x @ w["w"] - y) ** 2).sum()


def query_loss(w, xq, yq):
    return 0.5 * ((xq @ w["w"] - yq) ** 2).sum()


def analytic(theta, x, y, xq, yq, lam=LAM):
    """Returns ridge regression's solution and the closed-form meta-gradient."""
    a = x.T @ x + lam * torch.eye(DIM)
    phi = torch.linalg.solve(a, x.T @ y + lam * theta)
    return phi, lam * torch.linalg.solve(a, xq.T @ (xq @ phi - yq))


def rule_and_hparams(optim: type[torch.optim.Optimizer], **options):
    """Returns the rule of ``optim`` and the hyperparameters ``optim(**options)`` gives the weight ``w``."""
    (hparams,) = per_parameter(optim([torch.zeros(1, requires_grad=True)], **options).param_groups[0])
    return OPTIMIZERS[optim], {"w": hparams}


def sgd(lr: float = 0.2, **options):
    return rule_and_hparams(torch.optim.SGD, lr=lr, **options)


def imaml_grad(theta, data, steps=400, rule_hparams=None, **options):
    x, y, xq, yq = data
    rule, hparams = rule_hparams or sgd()
    weights = {"w": theta.clone().requires_grad_()}
    phi = implicit_inner_loop(support_loss(x, y), weights, rule=rule, hparams=hparams, steps=steps,
                              options=ImplicitOptions(lam=LAM, **options))
    (grad,) = torch.autograd.grad(query_loss(phi, xq, yq), weights["w"])
    return phi["w"], grad


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_imaml_equals_the_closed_form(solver):
    data = ridge_data()
    theta = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    phi, grad = imaml_grad(theta, data, solver=solver, maxiter=200, tol=1e-14)
    phi_true, grad_true = analytic(theta, *data)
    torch.testing.assert_close(phi, phi_true, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, grad_true, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_meta_gradient_error_falls_as_maxiter_grows(solver):
    data = ridge_data()
    theta = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    _, grad_true = analytic(theta, *data)
    errors = [(imaml_grad(theta, data, solver=solver, maxiter=m, tol=0.0)[1] - grad_true).norm().item()
              for m in ((1, 2, 3, 4) if solver == "cg" else (1, 2, 4, 8, 16))]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-2 * errors[0]
    if solver == "cg":  # exact after DIM iterations
        assert (imaml_grad(theta, data, solver="cg", maxiter=DIM, tol=0.0)[1] - grad_true).norm() < 1e-9


@pytest.mark.parametrize("name, rule_hparams", [
    ("sgd-momentum", sgd(lr=0.1, momentum=0.5)),
    ("adam", rule_and_hparams(torch.optim.Adam, lr=0.02)),
    # eps=0.1: at a constant lr, RMSprop's step does not shrink with the gradient (g / sqrt(mean g^2)), so with a
    # tiny eps it ends in a 2-cycle of amplitude lr/2 around the solution, and which side step 3000 lands on
    # depended on the CPU's rounding (passed on AMD EPYC, failed on Intel Xeon); a larger eps makes it converge
    ("rmsprop", rule_and_hparams(torch.optim.RMSprop, lr=0.01, eps=0.1)),
])
def test_any_inner_rule_reaches_the_implicit_gradient(name, rule_hparams):
    data = ridge_data()
    theta = torch.zeros(DIM)
    _, grad_true = analytic(theta, *data)
    _, grad = imaml_grad(theta, data, steps=3000, rule_hparams=rule_hparams, maxiter=50)
    torch.testing.assert_close(grad, grad_true, rtol=1e-4, atol=1e-6)


def test_imaml_under_vmap_equals_task_by_task():
    tasks = [ridge_data(seed) for seed in range(3)]
    batch = [torch.stack(t) for t in zip(*tasks)]
    theta = torch.randn(DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    rule, hparams = sgd()

    def task_loss(x, y, xq, yq, batched):
        phi = implicit_inner_loop(support_loss(x, y), {"w": theta}, rule=rule, hparams=hparams, steps=300,
                                  options=ImplicitOptions(lam=LAM, maxiter=20), batched=batched)
        return query_loss(phi, xq, yq)

    (batched,) = torch.autograd.grad(vmap(functools.partial(task_loss, batched=True))(*batch).sum(), theta)
    (sequential,) = torch.autograd.grad(sum(task_loss(*t, batched=False) for t in tasks), theta)
    expected = sum(analytic(theta.detach(), *t)[1] for t in tasks)
    torch.testing.assert_close(batched, sequential, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sequential, expected, rtol=1e-6, atol=1e-12)


def test_without_graph_adapts_the_same_and_detaches():
    data = ridge_data()
    theta = torch.randn(DIM, requires_grad=True)
    rule, hparams = sgd()
    kwargs = dict(rule=rule, hparams=hparams, steps=50, options=ImplicitOptions(lam=LAM))
    with_graph = implicit_inner_loop(support_loss(*data[:2]), {"w": theta}, **kwargs)
    without = implicit_inner_loop(support_loss(*data[:2]), {"w": theta}, create_graph=False, **kwargs)
    assert not without["w"].requires_grad
    torch.testing.assert_close(with_graph["w"].detach(), without["w"], rtol=0, atol=0)


def test_frozen_weight_stays_and_gets_no_gradient():
    x, y, xq, yq = ridge_data()
    bias = torch.tensor(0.3)  # does not require grad: frozen
    theta = torch.zeros(DIM, requires_grad=True)
    rule, hparams = sgd()
    hparams = {"w": hparams["w"], "b": hparams["w"]}
    phi = implicit_inner_loop(lambda w: 0.5 * ((x @ w["w"] + w["b"] - y) ** 2).sum(), {"w": theta, "b": bias},
                              rule=rule, hparams=hparams, steps=400, options=ImplicitOptions(lam=LAM, maxiter=50))
    assert phi["b"] is bias or torch.equal(phi["b"], bias)
    (grad,) = torch.autograd.grad(query_loss(phi, xq, yq), theta)
    _, grad_true = analytic(theta.detach(), x, y - 0.3, xq, yq)
    torch.testing.assert_close(grad, grad_true, rtol=1e-6, atol=1e-12)


def test_custom_root_on_a_user_solver():
    """A closed-form ridge solver wrapped by custom_root: the gradient to theta and to lam (as meta tensors)."""
    x, y, xq, yq = ridge_data()
    theta = torch.randn(DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    lam = torch.tensor(LAM, requires_grad=True)

    def optimality(sol, meta, x, y):
        return {"w": x.T @ (x @ sol["w"] - y) + meta["lam"] * (sol["w"] - meta["theta"])}

    @custom_root(optimality, solve="cg", maxiter=DIM, tol=0.0)
    def ridge(meta, x, y):
        assert not meta["theta"].requires_grad  # the solver runs on detached meta tensors: no graph
        a = x.T @ x + meta["lam"] * torch.eye(DIM)
        return {"w": torch.linalg.solve(a, x.T @ y + meta["lam"] * meta["theta"])}

    solved = ridge({"theta": theta, "lam": lam}, x, y)
    grads = torch.autograd.grad(query_loss(solved, xq, yq), [theta, lam])

    def reference(theta, lam):  # differentiate the closed form itself
        a = x.T @ x + lam * torch.eye(DIM)
        return query_loss({"w": torch.linalg.solve(a, x.T @ y + lam * theta)}, xq, yq)

    expected = torch.autograd.grad(reference(theta, lam), [theta, lam])
    torch.testing.assert_close(grads[0], expected[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[1], expected[1], rtol=1e-9, atol=1e-12)


def test_implicit_solution_checks_the_residual_names():
    theta = torch.zeros(2, requires_grad=True)
    out = implicit_solution(lambda s, m: {"other": s["w"] - m["theta"]}, {"w": torch.zeros(2)}, {"theta": theta})
    with pytest.raises(ValueError, match="optimality_fn returned residuals for \\['other'\\]"):
        out["w"].sum().backward()


@pytest.mark.parametrize("solve", [conjugate_gradient, neumann])
def test_solvers_on_a_small_spd_system(solve):
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(4, 4, generator=gen)
    a = torch.eye(4) + 0.1 * m @ m.T / 4  # spectral radius of I - a below 1: Neumann converges too
    b = [torch.randn(4, generator=gen), torch.randn(2, generator=gen)]
    big = torch.block_diag(a, torch.eye(2) * 1.5 - 0.2)

    def matvec(v):
        out = big @ torch.cat(v)
        return [out[:4], out[4:]]

    x = solve(matvec, b, maxiter=200, tol=1e-14)
    torch.testing.assert_close(torch.cat(x), torch.linalg.solve(big, torch.cat(b)), rtol=1e-10, atol=1e-12)


def test_conjugate_gradient_stops_at_negative_curvature():
    a = torch.diag(torch.tensor([2.0, 1.0, -1.0]))
    b = [torch.tensor([1.0, 1.0, 1.0])]
    x = conjugate_gradient(lambda v: [a @ v[0]], b, maxiter=50)
    # p = b has curvature 2 > 0: one step along it (alpha = 3/2); the next direction has curvature < 0: stop there
    torch.testing.assert_close(x[0], torch.full((3,), 1.5))
    assert torch.isfinite(x[0]).all()


def test_solvers_stop_at_tol():
    calls = []

    def matvec(v):
        calls.append(1)
        return [2.0 * v[0]]

    x = conjugate_gradient(matvec, [torch.ones(3)], maxiter=50, tol=1e-8)
    torch.testing.assert_close(x[0], torch.full((3,), 0.5))
    assert len(calls) == 1  # exact after one step: stops
    assert conjugate_gradient(matvec, [torch.zeros(3)], maxiter=5)[0].eq(0).all()


@pytest.mark.parametrize("options, message", [
    (dict(lam=0.0), "lam=0.0 is not accepted \\(it is below 1e-12\\); use a finite number"),
    (dict(lam=-1), "lam=-1 is not accepted \\(it is below 1e-12\\)"),
    (dict(lam=True), "lam=True is not accepted \\(not a number\\)"),
    (dict(solver="lu"), "solver='lu' is not accepted \\(not one of the choices\\); use one of cg, neumann"),
    (dict(maxiter=0), "maxiter=0 is not accepted \\(it is below 1\\); use a whole number >= 1"),
    (dict(tol=-1e-3), "tol=-0.001 is not accepted \\(it is below 0\\)"),
])
def test_bad_options_raise_one_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        ImplicitOptions(**options)


def test_custom_root_checks_the_solver_when_decorating():
    with pytest.raises(ValueError, match="solver='gmres' is not one of"):
        custom_root(lambda s, m: s, solve="gmres")


def test_the_graph_does_not_grow_with_inner_steps():
    """The adapted weights hang on one implicit node over the initial weights, however many steps the inner loop took."""
    x, y, _, _ = ridge_data()
    rule, hparams = sgd()
    theta = torch.zeros(DIM, requires_grad=True)
    for steps in (1, 10, 100):
        phi = implicit_inner_loop(support_loss(x, y), {"w": theta}, rule=rule, hparams=hparams, steps=steps)
        node = phi["w"].grad_fn
        assert type(node).__name__ == "_ImplicitSolutionBackward"
        assert [type(n).__name__ for n, _ in node.next_functions if n is not None] == ["AccumulateGrad"]
