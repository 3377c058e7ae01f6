"""Gradient transforms: identity at initialisation, the stated maths, exact gradients, small memory, clear errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaloop.nn import KroneckerConv2d, KroneckerLinear
from metaloop.transforms import (
    KroneckerTransform,
    MetaCurvatureTransform,
    ModuleTransform,
    ReshapedTransform,
    apply_transform,
    build_transforms,
)

F64 = torch.float64


def param_id(value: object) -> str:
    """A readable, run-independent test id (class names, factory reprs, shapes)."""
    return getattr(value, "__name__", str(value))

IDENTITY_FACTORIES = {
    "kron-linear-psd": KroneckerTransform(KroneckerLinear),
    "kron-linear": KroneckerTransform(KroneckerLinear, psd=False),
    "kron-linear-bias": KroneckerTransform(KroneckerLinear, bias=True),
    "kron-conv2d": KroneckerTransform(KroneckerConv2d),
    "metacurvature": MetaCurvatureTransform,
}
SHAPES = [(5,), (4, 3), (4, 3, 2), (4, 3, 2, 2)]


def randomise(module: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Moves every parameter away from its initial value (so tests are not at a special point)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=scale)


@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("factory", IDENTITY_FACTORIES.values(), ids=IDENTITY_FACTORIES.keys())
def test_identity_initialisation_reproduces_sgd_exactly(factory, shape):
    """T(g) == g bit for bit at initialisation, for every supported rank, in the parameter's dtype."""
    param = torch.zeros(shape, dtype=F64)
    transform = factory(param)
    grad = torch.randn(shape, dtype=F64)
    update = transform(grad)
    assert update.dtype == F64
    torch.testing.assert_close(update, grad, rtol=0, atol=0)


def test_module_transform_is_a_linear_map_of_the_flattened_gradient():
    """ModuleTransform(nn.Linear): update = W vec(g) + b, reshaped (float64, 1e-12)."""
    torch.manual_seed(0)
    param = torch.zeros(4, 3, dtype=F64)
    transform = ModuleTransform(nn.Linear)(param)
    linear = transform.transform
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (12, 12) and linear.weight.dtype == F64
    grad = torch.randn(4, 3, dtype=F64)
    expected = (linear.weight @ grad.flatten() + linear.bias).reshape(4, 3)
    torch.testing.assert_close(transform(grad), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(5,), (4, 3), (4, 3, 2, 2)], ids=param_id)
def test_metacurvature_is_a_mode_wise_product(shape):
    """lr * G x1 M_o x2 M_i x3 M_f written out with einsum, for random (non-identity) matrices (1e-12)."""
    param = torch.zeros(shape, dtype=F64)
    transform = MetaCurvatureTransform(param, lr=0.5)
    randomise(transform)
    grad = torch.randn(shape, dtype=F64)
    if len(shape) == 1:
        expected = transform.m_o @ grad
    elif len(shape) == 2:
        expected = transform.m_o @ grad @ transform.m_i.T
    else:
        g = grad.reshape(shape[0], shape[1], -1)
        expected = torch.einsum("ai,bj,ck,ijk->abc", transform.m_o, transform.m_i, transform.m_f, g).reshape(shape)
    torch.testing.assert_close(transform(grad), 0.5 * expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "factory, shape, n_params",
    [
        (KroneckerTransform(KroneckerLinear), (784, 10), 784**2 + 10**2),
        (KroneckerTransform(KroneckerLinear, bias=True), (784, 10), 784**2 + 10**2 + 7840),
        (KroneckerTransform(KroneckerConv2d), (16, 8, 3, 3), 16**2 + 8**2 + 9**2),
        (KroneckerTransform(KroneckerLinear), (16, 8, 3, 3), 16**2 + 72**2),
        (MetaCurvatureTransform, (784, 10), 784**2 + 10**2),
        (MetaCurvatureTransform, (16, 8, 3, 3), 16**2 + 8**2 + 9**2),
        (MetaCurvatureTransform, (10,), 10**2),
    ],
    ids=param_id,
)
def test_factored_transforms_hold_only_their_factors(factory, shape, n_params):
    """A 784x10 weight costs 784^2 + 10^2 values, not 7840^2."""
    transform = factory(torch.zeros(shape))
    assert sum(p.numel() for p in transform.parameters()) == n_params


@pytest.mark.parametrize(
    "factory",
    [
        KroneckerTransform(KroneckerLinear),
        KroneckerTransform(KroneckerLinear, psd=False, bias=True),
        KroneckerTransform(KroneckerConv2d),
        MetaCurvatureTransform,
        ModuleTransform(nn.Linear),
    ],
    ids=["kron-linear-psd", "kron-linear-bias", "kron-conv2d-psd", "metacurvature", "module-linear"],
)
@pytest.mark.parametrize("shape", [(3, 2), (2, 2, 2, 1)], ids=param_id)
def test_transform_parameter_gradients_match_finite_differences(factory, shape):
    """gradcheck (float64) of T(g) w.r.t. g and every transform parameter, away from initialisation."""
    torch.manual_seed(1)
    transform = factory(torch.zeros(shape, dtype=F64))
    randomise(transform)
    names = [n for n, _ in transform.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in transform.parameters()]
    grad = torch.randn(shape, dtype=F64, requires_grad=True)

    def f(g, *params):
        return functional_call(transform, dict(zip(names, params)), (g,))

    assert torch.autograd.gradcheck(f, (grad, *values), eps=1e-6, atol=1e-7)


def test_module_transform_rejects_non_callable():
    with pytest.raises(TypeError, match=r"module_cls must be callable.*got 3"):
        ModuleTransform(3)


def test_kronecker_transform_rejects_non_callable():
    with pytest.raises(TypeError, match=r"kronecker_cls must be a Kronecker module class.*got 'KroneckerLinear'"):
        KroneckerTransform("KroneckerLinear")


def test_wrong_output_shape_names_shapes():
    """A module that maps (1, 12) to (1, 13) is caught with both shapes in the message."""
    transform = ModuleTransform(lambda i, o: nn.Linear(i, o + 1))(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=re.escape("Linear returned (1, 13) for a gradient of shape (4, 3) viewed as (1, 12)")):
        transform(torch.zeros(4, 3))


def test_apply_transform_names_the_parameter():
    with pytest.raises(ValueError, match=re.escape("transform of parameter 'fc.weight' (function) returned (3,) for a gradient of shape (3, 2)")):
        apply_transform(lambda g: g.sum(1), torch.zeros(3, 2), "parameter 'fc.weight'")


def test_unsupported_rank_names_parameter_and_shape():
    """build_transforms adds the parameter's name to the Kronecker class's complaint."""
    named = [("scale", torch.zeros(())), ("weight", torch.zeros(3, 2))]
    pattern = r"parameter 'scale' of shape \(\): KroneckerLinear cannot factor a parameter of shape \(\)"
    with pytest.raises(ValueError, match=pattern):
        build_transforms(KroneckerTransform(KroneckerLinear), named)
    with pytest.raises(ValueError, match=r"parameter 'scale' of shape \(\): MetaCurvatureTransform needs .* rank >= 1"):
        build_transforms(MetaCurvatureTransform, named)


def test_build_transforms_uses_identity_for_none_and_rejects_other_values():
    modules = build_transforms(lambda p: None if p.dim() == 0 else MetaCurvatureTransform(p), [("s", torch.zeros(())), ("w", torch.zeros(2))])
    assert isinstance(modules[0], nn.Identity) and isinstance(modules[1], MetaCurvatureTransform)
    with pytest.raises(TypeError, match=r"returned function for parameter 'w'; it must return an nn.Module"):
        build_transforms(lambda p: (lambda g: g), [("w", torch.zeros(2))])
    with pytest.raises(TypeError, match=r"transform must be callable"):
        build_transforms(None, [])


def test_metacurvature_rejects_gradient_of_another_shape():
    transform = MetaCurvatureTransform(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=re.escape("built for a parameter of shape (4, 3) but got a gradient of shape (3, 4)")):
        transform(torch.zeros(3, 4))


def test_reshaped_transform_keeps_gradient_shape():
    """ReshapedTransform views (2, 3, 2) as (3, 4) and returns (2, 3, 2) (values unchanged by Identity)."""
    grad = torch.arange(12.0).reshape(2, 3, 2)
    out = ReshapedTransform(nn.Identity(), (3, 4))(grad)
    torch.testing.assert_close(out, grad, rtol=0, atol=0)
