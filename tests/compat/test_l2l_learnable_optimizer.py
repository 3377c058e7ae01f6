"""LearnableOptimizer, ParameterUpdate and ModuleSGD (learn2learn's DifferentiableSGD) on ordinary modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaloop.nn import KroneckerLinear
from metaloop.compat.learn2learn.optim.learnable_optimizer import LearnableOptimizer, ModuleSGD, ParameterUpdate
from metaloop.compat.learn2learn.utils.module_updates import clone_module
from metaloop.transforms import KroneckerTransform, ModuleTransform

F64 = torch.float64


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=gen, dtype=F64), torch.randn(8, 3, generator=gen, dtype=F64)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def test_documented_example_trains_the_transform(data):
    """learn2learn's example: after metaopt.step(), the next backward gives the transform non-zero gradients,
    and the step itself is p - lr * (W vec(g) + b) (1e-12)."""
    torch.manual_seed(0)
    x, y = data
    linear = nn.Linear(4, 3).double()
    metaopt = LearnableOptimizer(linear, ModuleTransform(nn.Linear), lr=0.01)
    opt = torch.optim.SGD(metaopt.parameters(), lr=0.001)
    for iteration in range(3):
        metaopt.zero_grad()
        opt.zero_grad()
        mse(linear, x, y).backward()
        if iteration == 0:
            assert all(p.grad is None for p in metaopt.parameters())
            before = [(p.detach().clone(), p.grad.clone()) for p in linear.parameters()]
        else:
            assert all(p.grad is not None and p.grad.abs().max() > 1e-6 for p in metaopt.parameters())
        opt.step()
        metaopt.step()
        if iteration == 0:
            for (p0, g), p, t in zip(before, linear.parameters(), metaopt.transforms):
                lin = t.transform
                expected = p0 - 0.01 * (lin.weight @ g.flatten() + lin.bias).reshape(p0.shape)
                torch.testing.assert_close(p, expected, rtol=0, atol=1e-12)


def test_hypergradient_matches_closed_form(data):
    """For p' = p - lr (W vec(g) + b): dL/dW = -lr dL/dp' vec(g)^T and dL/db = -lr dL/dp' (1e-12)."""
    torch.manual_seed(0)
    x, y = data
    model = nn.Linear(4, 3, bias=False).double()
    metaopt = LearnableOptimizer(model, ModuleTransform(nn.Linear), lr=0.1)
    mse(model, x, y).backward()
    g = model.weight.grad.flatten().clone()
    metaopt.step()
    metaopt.zero_grad()
    mse(model, x, y).backward()
    dp = model.weight.grad.flatten()  # retained by step() on the non-leaf weight
    lin = metaopt.transforms[0].transform
    torch.testing.assert_close(lin.weight.grad, -0.1 * torch.outer(dp, g), rtol=0, atol=1e-12)
    torch.testing.assert_close(lin.bias.grad, -0.1 * dp, rtol=0, atol=1e-12)


def test_identity_transforms_follow_torch_sgd(data):
    """Factories returning None (identity) make LearnableOptimizer plain SGD: 3 steps equal torch.optim.SGD (1e-12)."""
    torch.manual_seed(0)
    x, y = data
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    reference = copy.deepcopy(model)
    metaopt = LearnableOptimizer(model, lambda p: None, lr=0.1)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        metaopt.zero_grad()
        sgd.zero_grad()
        mse(model, x, y).backward()
        mse(reference, x, y).backward()
        metaopt.step()
        sgd.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        assert p.requires_grad


def test_parameters_are_the_transforms_and_zero_grad_touches_only_the_model(data):
    x, y = data
    model = nn.Linear(4, 3).double()
    metaopt = LearnableOptimizer(model, KroneckerTransform(KroneckerLinear))
    assert sum(p.numel() for p in metaopt.parameters()) == (3**2 + 4**2) + (3**2 + 1)
    assert all(k.startswith("transforms.") for k in metaopt.state_dict())
    mse(model, x, y).backward()
    for p in metaopt.parameters():
        p.grad = torch.ones_like(p)
    old = model.weight.grad
    metaopt.zero_grad(set_to_none=False)
    assert model.weight.grad is not old and model.weight.grad.abs().max() == 0
    metaopt.zero_grad()
    assert model.weight.grad is None and model.bias.grad is None
    assert all(p.grad is not None and p.grad.min() == 1 for p in metaopt.parameters())


def test_parameter_update_returns_transformed_gradients(data):
    """Identity Kronecker transforms return autograd's gradients (exact); ModuleTransform W g + b (1e-12)."""
    torch.manual_seed(0)
    x, y = data
    model = nn.Linear(4, 3).double()
    expected = torch.autograd.grad(mse(model, x, y), list(model.parameters()))
    identity = ParameterUpdate(model, KroneckerTransform(KroneckerLinear))
    for u, g in zip(identity(mse(model, x, y), model.parameters()), expected):
        torch.testing.assert_close(u, g, rtol=0, atol=0)
    learned = ParameterUpdate(list(model.parameters()), ModuleTransform(nn.Linear))
    updates = learned(mse(model, x, y), model.parameters(), create_graph=True)
    for u, g, t in zip(updates, expected, learned.transforms):
        lin = t.transform
        torch.testing.assert_close(u, (lin.weight @ g.flatten() + lin.bias).reshape(g.shape), rtol=0, atol=1e-12)
    # With create_graph, the updates are differentiable in the transforms' parameters.
    grads = torch.autograd.grad(sum(u.sum() for u in updates), list(learned.parameters()))
    assert all(g.abs().max() > 0 for g in grads)


def test_parameter_update_handles_parameters_without_grad(data):
    x, y = data
    model = nn.Linear(4, 3).double()
    model.bias.requires_grad_(False)
    get_update = ParameterUpdate(model, KroneckerTransform(KroneckerLinear))
    with pytest.raises(ValueError, match=r"parameters\[1\] \(shape \(3,\)\) does not require grad; pass allow_nograd=True"):
        get_update(mse(model, x, y), model.parameters())
    weight_update, bias_update = get_update(mse(model, x, y), model.parameters(), allow_nograd=True)
    assert bias_update is None and weight_update.shape == (3, 4)
    with pytest.raises(ValueError, match=r"got 1 parameters but this ParameterUpdate was built for 2"):
        get_update(mse(model, x, y), [model.weight])


def test_differentiable_sgd_is_second_order_exact(data):
    """After sgd(clone, grad(create_graph=True)), d L(clone) / d theta equals torch.func's
    d/dtheta L(theta - lr grad L(theta)) (1e-12); the step itself is p - lr g exactly."""
    torch.manual_seed(0)
    x, y = data
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    names = [n for n, _ in model.named_parameters()]
    lr = 0.3

    def mse_functional(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    def adapted_loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = torch.func.grad(mse_functional)(params)
        return mse_functional({n: params[n] - lr * inner[n] for n in names})

    expected = torch.func.grad(adapted_loss)({n: p.detach() for n, p in model.named_parameters()})
    clone = clone_module(model)
    grads = torch.autograd.grad(mse(clone, x, y), list(clone.parameters()), create_graph=True)
    before = [p.detach().clone() for p in clone.parameters()]
    ModuleSGD(lr)(clone, grads)
    for p, p0, g in zip(clone.parameters(), before, grads):
        torch.testing.assert_close(p, p0 - lr * g, rtol=0, atol=0)
    mse(clone, x, y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=0, atol=1e-12)


def test_differentiable_sgd_defaults_to_dot_grad(data):
    x, y = data
    model = nn.Linear(4, 3).double()
    before = [p.detach().clone() for p in model.parameters()]
    mse(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert ModuleSGD(0.5)(model) is model
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p, p0 - 0.5 * g, rtol=0, atol=0)
