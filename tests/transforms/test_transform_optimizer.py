"""TransformOptimizer and its differentiable twin inside metaloop.innerloop_ctx."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call

import metaloop
from metaloop.nn import KroneckerConv2d, KroneckerLinear
from metaloop.transforms import (
    DifferentiableTransformOptimizer,
    KroneckerTransform,
    MetaCurvatureTransform,
    TransformOptimizer,
)

F64 = torch.float64

IDENTITY_FACTORIES = {
    "kron-linear": KroneckerTransform(KroneckerLinear),
    "kron-conv2d": KroneckerTransform(KroneckerConv2d),
    "metacurvature": MetaCurvatureTransform,
    "none": lambda p: None,
}
LEARNABLE_FACTORIES = {
    "kron-linear-psd": KroneckerTransform(KroneckerLinear),
    "kron-linear-bias": KroneckerTransform(KroneckerLinear, bias=True, psd=False),
    "metacurvature": MetaCurvatureTransform,
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, generator=gen, dtype=F64), torch.randn(6, 2, generator=gen, dtype=F64)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def two_groups(model: nn.Module) -> list[dict]:
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 0.05}]


def randomise(module: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=scale)


@pytest.mark.parametrize("factory", IDENTITY_FACTORIES.values(), ids=IDENTITY_FACTORIES.keys())
def test_live_steps_with_identity_transforms_match_torch_sgd(factory):
    """3 steps, two groups with different lr: the same weights as torch.optim.SGD (1e-12)."""
    model = make_model()
    reference = copy.deepcopy(model)
    opt = TransformOptimizer(two_groups(model), factory, lr=0.1)
    sgd = torch.optim.SGD(two_groups(reference), lr=0.1)
    for step in range(3):
        for m, o in ((model, opt), (reference, sgd)):
            o.zero_grad()
            mse(m, *batch(step)).backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_transforms_follow_param_groups():
    model = make_model()
    opt = TransformOptimizer(two_groups(model), KroneckerTransform(KroneckerLinear), lr=0.1)
    shapes = [[tuple(t.transform.left.shape) for t in group["transform"]] for group in opt.param_groups]
    assert shapes == [[(4, 4), (4, 4)], [(2, 2), (2, 2)]]
    assert sum(p.numel() for p in opt.transform_parameters()) == (16 + 9) + (16 + 1) + (4 + 16) + (4 + 1)


@pytest.mark.parametrize("factory", IDENTITY_FACTORIES.values(), ids=IDENTITY_FACTORIES.keys())
def test_unrolled_identity_transforms_match_sgd_trajectory(factory):
    """Through innerloop_ctx, 2 steps with identity transforms equal metaloop.optim's SGD step for step (1e-12)."""
    model = make_model()
    opt = TransformOptimizer(two_groups(model), factory, lr=0.1)
    sgd = torch.optim.SGD(two_groups(model), lr=0.1)
    with metaloop.innerloop_ctx(model, opt) as (fmodel, diffopt), metaloop.innerloop_ctx(model, sgd) as (fref, refopt):
        assert isinstance(diffopt, DifferentiableTransformOptimizer)
        for step in range(2):
            diffopt.step(mse(fmodel, *batch(step)))
            refopt.step(mse(fref, *batch(step)))
            for p, q in zip(fmodel.parameters(), fref.parameters()):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


class QueryLoss(nn.Module):
    """The query loss after a 2-step unrolled inner loop, as a module whose parameters are the transforms'."""

    def __init__(self, model: nn.Module, opt: TransformOptimizer) -> None:
        super().__init__()
        self.transforms = opt.transforms
        self._loop = (model, opt)  # a tuple: not registered, so only the transforms are substituted

    def forward(self, lr: torch.Tensor | None = None) -> torch.Tensor:
        model, opt = self._loop
        override = None if lr is None else {"lr": lr}
        with metaloop.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
            for step in range(2):
                diffopt.step(mse(fmodel, *batch(step)))
            return mse(fmodel, *batch(10))


@pytest.mark.parametrize("factory", LEARNABLE_FACTORIES.values(), ids=LEARNABLE_FACTORIES.keys())
def test_hypergradient_of_transforms_matches_finite_differences(factory):
    """gradcheck (float64) of the 2-step query loss w.r.t. every transform parameter and a tensor lr,
    away from identity; the gradient reaching the factors is non-zero."""
    model = make_model()
    opt = TransformOptimizer(model.parameters(), factory, lr=0.1)
    randomise(opt.transforms)
    query_loss = QueryLoss(model, opt)
    names = [n for n, _ in query_loss.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in query_loss.parameters()]
    lr = torch.tensor(0.3, dtype=F64, requires_grad=True)

    def f(lr, *params):
        return functional_call(query_loss, dict(zip(names, params)), (lr,))

    assert torch.autograd.gradcheck(f, (lr, *values), eps=1e-6, atol=1e-7)
    query_loss().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 1e-8 for p in opt.transform_parameters())


def test_meta_training_the_factors_lowers_the_query_loss():
    """Kronecker-preconditioned MAML with the factors as the only meta-parameters: 15 Adam steps
    lower the 2-step query loss by more than 10%."""
    model = make_model()
    opt = TransformOptimizer(model.parameters(), KroneckerTransform(KroneckerLinear), lr=0.1)
    meta = torch.optim.Adam(opt.transform_parameters(), lr=0.05)
    query_loss = QueryLoss(model, opt)
    losses = []
    for _ in range(15):
        meta.zero_grad()
        loss = query_loss()
        loss.backward()
        meta.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_without_higher_grads_no_graph_is_built():
    model = make_model()
    opt = TransformOptimizer(model.parameters(), KroneckerTransform(KroneckerLinear), lr=0.1)
    with metaloop.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(mse(fmodel, *batch(0)))
        assert all(p.grad_fn is None for p in fmodel.parameters())


def test_state_dict_round_trip_includes_transforms():
    model = make_model()
    opt = TransformOptimizer(model.parameters(), MetaCurvatureTransform, lr=0.1)
    randomise(opt.transforms, seed=4)
    fresh = TransformOptimizer(model.parameters(), MetaCurvatureTransform, lr=0.2)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["lr"] == 0.1
    for p, q in zip(fresh.transform_parameters(), opt.transform_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_constructor_errors_name_the_problem():
    model = make_model()
    with pytest.raises(TypeError, match=r"transform must be a factory transform\(param\) -> nn.Module"):
        TransformOptimizer(model.parameters(), "kronecker")
    with pytest.raises(ValueError, match=r"lr=-0.1 must be >= 0"):
        TransformOptimizer(model.parameters(), MetaCurvatureTransform, lr=-0.1)
    scalar = nn.Parameter(torch.zeros(()))
    pattern = re.escape("parameter \"param_groups[0]['params'][1]\" of shape (): KroneckerLinear cannot factor")
    with pytest.raises(ValueError, match=pattern):
        TransformOptimizer([model[0].weight, scalar], KroneckerTransform(KroneckerLinear))
    with pytest.raises(ValueError, match=r"the transform rule needs a callable 'transform' per parameter, got None"):
        DifferentiableTransformOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.parameters())
