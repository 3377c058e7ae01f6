"""Kronecker-factored maps equal their explicit Kronecker matrices, start as the identity, and stay small."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch.func import functional_call

from metaloop.nn import KroneckerConv2d, KroneckerLinear, KroneckerLSTM, KroneckerRNN, kronecker_matvec

F64 = torch.float64


def param_id(value: object) -> str:
    """A readable, run-independent test id (class names, factory reprs, shapes)."""
    return getattr(value, "__name__", str(value))


def explicit_kron(factors: list[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(torch.kron, factors)


@pytest.mark.parametrize("dims", [(5,), (4, 3), (4, 3, 2)], ids=param_id)
def test_kronecker_matvec_equals_explicit_kronecker_product(dims):
    """(F1 ⊗ ... ⊗ Fk) times the row-major flattening, over a batch of 2 (float64, 1e-12)."""
    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(d, d, generator=gen, dtype=F64) for d in dims]
    x = torch.randn(2, *dims, generator=gen, dtype=F64)
    expected = (explicit_kron(factors) @ x.reshape(2, -1).T).T.reshape(x.shape)
    torch.testing.assert_close(kronecker_matvec(factors, x), expected, rtol=0, atol=1e-12)


def test_kronecker_matvec_under_vmap_equals_batched_call():
    """torch.func.vmap over a batch of gradients gives the batched result (1e-12)."""
    factors = [torch.randn(4, 4, dtype=F64), torch.randn(3, 3, dtype=F64)]
    xs = torch.randn(5, 4, 3, dtype=F64)
    mapped = torch.func.vmap(lambda x: kronecker_matvec(factors, x))(xs)
    torch.testing.assert_close(mapped, kronecker_matvec(factors, xs), rtol=0, atol=1e-12)


def test_kronecker_matvec_rejects_mismatched_factor():
    with pytest.raises(ValueError, match=r"factor 1 has shape \(2, 2\).*needs a \(3, 3\) factor"):
        kronecker_matvec([torch.eye(4), torch.eye(2)], torch.zeros(4, 3))


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_kronecker_linear_is_l_x_r_plus_b_and_r_transpose_kron_l_on_vectors():
    """Matrix input: L X R + B; vector input (column-major, learn2learn's): (R^T ⊗ L) x + vec(B) (1e-12)."""
    n, m = 4, 3
    layer = KroneckerLinear(n, m, bias=True, dtype=F64)
    randomise(layer)
    x = torch.randn(n, m, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), layer.left @ x @ layer.right + layer.bias, rtol=0, atol=1e-12)
    vec = x.mT.flatten()  # column-major
    expected = torch.kron(layer.right.T.contiguous(), layer.left) @ vec + layer.bias.mT.flatten()
    torch.testing.assert_close(layer(vec), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls, dims", [(KroneckerLinear, (4, 3)), (KroneckerConv2d, (4, 3, 2))], ids=["linear", "conv2d"])
@pytest.mark.parametrize("psd", [False, True])
def test_identity_at_initialisation(cls, dims, psd):
    """A fresh module returns its input exactly (identity factors, zero bias), psd or not."""
    x = torch.randn(2, *dims, dtype=F64)
    layer = cls(*dims, bias=True, psd=psd, dtype=F64)
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("cls, dims", [(KroneckerLinear, (3, 2)), (KroneckerConv2d, (3, 2, 2))], ids=["linear", "conv2d"])
def test_psd_matrix_has_nonnegative_eigenvalues(cls, dims):
    """With psd=True and random factors, the full matrix is symmetric PSD (min eigenvalue >= -1e-10)."""
    layer = cls(*dims, bias=False, psd=True, dtype=F64)
    randomise(layer, seed=3)
    # Row-major, L X R is L ⊗ R^T; with psd the factors are symmetric, so this is L ⊗ R.
    full = explicit_kron(list(layer.factors()))
    torch.testing.assert_close(full, full.T, rtol=0, atol=1e-10)
    assert torch.linalg.eigvalsh(full).min() >= -1e-10


def test_kronecker_conv2d_equals_explicit_three_factor_product():
    """(O ⊗ I ⊗ K) vec(x) + B on an (out, in, k) tensor (1e-12)."""
    layer = KroneckerConv2d(4, 3, 2, bias=True, dtype=F64)
    randomise(layer)
    x = torch.randn(4, 3, 2, dtype=F64)
    expected = (explicit_kron(list(layer.factors())) @ x.flatten()).reshape(4, 3, 2) + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "cls, shape, dims",
    [
        (KroneckerLinear, (7,), (7, 1)),
        (KroneckerLinear, (784, 10), (784, 10)),
        (KroneckerLinear, (8, 4, 3, 3), (8, 36)),
        (KroneckerConv2d, (7,), (7, 1, 1)),
        (KroneckerConv2d, (5, 3), (5, 3, 1)),
        (KroneckerConv2d, (8, 4, 3), (8, 4, 3)),
        (KroneckerConv2d, (8, 4, 3, 3), (8, 4, 9)),
    ],
    ids=param_id,
)
def test_kronecker_dims(cls, shape, dims):
    assert cls.kronecker_dims(torch.Size(shape)) == dims


@pytest.mark.parametrize("cls, shape", [(KroneckerLinear, ()), (KroneckerConv2d, ()), (KroneckerConv2d, (2, 2, 2, 2, 2))], ids=param_id)
def test_unsupported_rank_names_class_and_shape(cls, shape):
    with pytest.raises(ValueError, match=rf"{cls.__name__} cannot factor a parameter of shape {re.escape(str(shape))}"):
        cls.kronecker_dims(torch.Size(shape))


@pytest.mark.parametrize(
    "layer, shape",
    [(KroneckerLinear(4, 3), (3, 4)), (KroneckerLinear(4, 3), (11,)), (KroneckerConv2d(4, 3, 2), (4, 3, 2, 1))],
    ids=["matrix", "vector", "conv"],
)
def test_wrong_input_shape_is_named(layer, shape):
    with pytest.raises(ValueError, match=r"got (input of shape|a vector of)"):
        layer(torch.zeros(shape))


def test_invalid_dimension_is_named():
    with pytest.raises(ValueError, match=r"m=0 must be a positive int"):
        KroneckerLinear(3, 0)


@pytest.mark.parametrize(
    "make, dims",
    [
        (lambda psd: KroneckerLinear(3, 2, bias=True, psd=psd, dtype=F64), (3, 2)),
        (lambda psd: KroneckerConv2d(3, 2, 2, bias=True, psd=psd, dtype=F64), (3, 2, 2)),
    ],
    ids=["linear", "conv2d"],
)
@pytest.mark.parametrize("psd", [False, True])
def test_factor_gradients_match_finite_differences(make, dims, psd):
    """torch.autograd.gradcheck (float64) of the output w.r.t. the input and every factor."""
    layer = make(psd)
    randomise(layer, seed=5)
    names = [n for n, _ in layer.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(*dims, dtype=F64, requires_grad=True)

    def f(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, (x, *values), eps=1e-6, atol=1e-7)


def test_memory_of_784_by_10_factors():
    """784x10 weight: 784^2 + 10^2 factor values (no bias), not 7840^2."""
    layer = KroneckerLinear(784, 10, bias=False)
    assert sum(p.numel() for p in layer.parameters()) == 784**2 + 10**2 == 614_756


def test_kronecker_rnn_at_initialisation():
    """Identity maps and zero biases: h' = tanh(x + h), y = h' (1e-12)."""
    cell = KroneckerRNN(3, 2).double()
    x, h = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    y, new_h = cell(x, h)
    torch.testing.assert_close(new_h, torch.tanh(x + h), rtol=0, atol=1e-12)
    torch.testing.assert_close(y, new_h, rtol=0, atol=1e-12)
    assert sum(p.numel() for p in cell.parameters()) == 3 * (9 + 4 + 6)


def test_kronecker_lstm_at_initialisation():
    """Identity maps: the usual LSTM equations on x + h for every gate (1e-12)."""
    cell = KroneckerLSTM(3, 2).double()
    x, h, c = (torch.randn(3, 2, dtype=F64) for _ in range(3))
    out, (h2, c2) = cell(x, (h, c))
    s = x + h
    expected_c = torch.sigmoid(s) * c + torch.sigmoid(s) * torch.tanh(s)
    torch.testing.assert_close(c2, expected_c, rtol=0, atol=1e-12)
    torch.testing.assert_close(h2, torch.sigmoid(s) * torch.tanh(expected_c), rtol=0, atol=1e-12)
    assert out is h2
    assert sum(p.numel() for p in cell.parameters()) == 8 * (9 + 4 + 6)
