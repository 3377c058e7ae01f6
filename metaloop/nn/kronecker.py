"""Kronecker-factored linear maps: learnable preconditioners that fit in memory.

A linear map on a tensor of shape ``(d_1, ..., d_k)`` is a ``(d_1 ... d_k) x (d_1 ... d_k)``
matrix: for a 784x10 weight that is 7840x7840 values. Restricting the matrix to a Kronecker
product ``F_1 ⊗ ... ⊗ F_k`` of one square factor per dimension stores only
``d_1^2 + ... + d_k^2`` values (784^2 + 10^2), and applying it never forms the product:
:func:`kronecker_matvec` multiplies each dimension by its factor in turn (a mode-wise
tensor product). Arnold et al. 2019 ("When MAML can adapt fast and how to assist when it
cannot") learn such factors as preconditioners of the inner-loop gradient; Jose et al. 2018
("Kronecker recurrent units") build recurrent cells from them.

Every module here is initialised to the identity map (identity factors, zero bias), and
with ``psd=True`` uses ``F^T F`` in place of each factor ``F``, so the full matrix is
positive semi-definite whatever the learned values (a Kronecker product of PSD matrices is
PSD). :class:`KroneckerLinear` and :class:`KroneckerConv2d` say, in ``kronecker_dims``, how
they view a parameter of a given shape, which :class:`metaloop.transforms.KroneckerTransform`
uses to build one per parameter.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["kronecker_matvec", "KroneckerLinear", "KroneckerConv2d", "KroneckerRNN", "KroneckerLSTM"]

Device = torch.device | str | None


def kronecker_matvec(factors: Sequence[Tensor], x: Tensor) -> Tensor:
    """Returns ``(F_1 ⊗ ... ⊗ F_k) x`` over the last ``k`` dimensions of ``x``, without forming the product.

    With ``x`` of shape ``(..., d_1, ..., d_k)`` and ``F_j`` of shape ``(d_j, d_j)``,
    ``y[..., a_1, ..., a_k] = sum_b F_1[a_1, b_1] ... F_k[a_k, b_k] x[..., b_1, ..., b_k]``:
    the row-major flattening of ``y`` is the Kronecker product times that of ``x``. Leading
    dimensions are a batch. For ``k = 2`` this is ``F_1 X F_2^T``.

    Raises:
        ValueError: if ``x`` has fewer than ``k`` dimensions or a factor does not match its dimension.
    """
    k = len(factors)
    if x.dim() < k:
        raise ValueError(f"kronecker_matvec got {k} factors for a tensor of shape {tuple(x.shape)}; it needs >= {k} dims")
    first = x.dim() - k
    for j, f in enumerate(factors):
        d = x.shape[first + j]
        if f.shape != (d, d):
            raise ValueError(
                f"factor {j} has shape {tuple(f.shape)} but dimension {first + j} of the input "
                f"{tuple(x.shape)} needs a ({d}, {d}) factor"
            )
    # a matmul per mode (not tensordot): under autocast each product takes autocast's dtype for both operands,
    # where tensordot would meet a float32 factor and the bfloat16 result of the previous mode and refuse
    for j, f in enumerate(factors):
        x = torch.matmul(x.movedim(first + j, -1), f.mT).movedim(-1, first + j)
    return x


def _identity(d: int, device: Device, dtype: torch.dtype | None) -> nn.Parameter:
    return nn.Parameter(torch.eye(d, device=device, dtype=dtype))


def _as_psd(f: Tensor) -> Tensor:
    """Returns ``F^T F``: positive semi-definite, and the identity when ``F`` is."""
    return f.mT @ f


def _check_dim(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int (a dimension of the tensors the map acts on)")


class _KroneckerMap(nn.Module):
    """The state every Kronecker-factored map shares: one identity-initialised square factor per mode, a zero bias
    of the modes' shape, and the ``psd`` switch; subclasses say how a tensor is viewed and multiplied."""

    def __init__(
        self, factors: dict[str, tuple[str, int]], bias: bool, psd: bool, device: Device, dtype: torch.dtype | None
    ) -> None:
        # factors: attribute name -> (constructor argument, dimension), in mode order; the attribute names are
        # learn2learn's, so its state dicts load
        super().__init__()
        for argument, d in factors.values():
            _check_dim(argument, d)
        self._factor_names = tuple(factors)
        for name, (_, d) in factors.items():
            setattr(self, name, _identity(d, device, dtype))
        self.dims = tuple(d for _, d in factors.values())
        self.bias = nn.Parameter(torch.zeros(self.dims, device=device, dtype=dtype)) if bias else None
        self.psd = psd

    def factors(self) -> tuple[Tensor, ...]:
        """Returns the factors the map uses, in mode order (each ``F^T F`` when psd)."""
        fs = tuple(getattr(self, name) for name in self._factor_names)
        return tuple(_as_psd(f) for f in fs) if self.psd else fs


class KroneckerLinear(_KroneckerMap):
    """A linear map ``X -> L X R + B`` on ``(n, m)`` matrices: the matrix ``R^T ⊗ L`` in ``n^2 + m^2`` values.

    (Jose et al. 2018; Arnold et al. 2019.) ``left`` (n, n) and ``right`` (m, m) start as the
    identity and ``bias`` (n, m) as zero, so the map starts as the identity. With
    ``psd=True`` the factors used are ``left^T left`` and ``right^T right``.

    The input is ``(..., n, m)`` (leading dimensions are a batch) or, as in learn2learn, a
    vector of ``n * m`` entries read column-major (``x.reshape(m, n).T``), returned in the
    same layout.
    """

    def __init__(
        self, n: int, m: int, bias: bool = True, psd: bool = False, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__({"left": ("n", n), "right": ("m", m)}, bias, psd, device, dtype)

    @classmethod
    def kronecker_dims(cls, shape: Sequence[int]) -> tuple[int, int]:
        """Returns the ``(n, m)`` matrix a parameter of ``shape`` is viewed as.

        A vector (bias) of size n is ``(n, 1)``; a matrix is itself; a conv weight
        ``(out, in, kh, kw)`` (or any rank >= 3) is ``(out, in * kh * kw)``, the matrix its
        unfolded (im2col) form multiplies.

        Raises:
            ValueError: for a scalar (rank 0), which has no dimension to factor.
        """
        shape = tuple(shape)
        if len(shape) == 0:
            raise ValueError(
                f"{cls.__name__} cannot factor a parameter of shape {shape} (rank 0); it needs rank >= 1. "
                "Give scalars no transform (return None from the transform factory) or use ModuleTransform"
            )
        return (shape[0], math.prod(shape[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """Returns ``L X R + B`` for ``x`` of shape ``(..., n, m)`` (or a column-major ``n*m`` vector)."""
        n, m = self.dims
        if x.dim() == 1:
            if x.numel() != n * m:
                raise ValueError(f"{type(self).__name__}(n={n}, m={m}) got a vector of {x.numel()} entries; it needs n*m={n * m}")
            return self(x.reshape(m, n).mT).mT.flatten()
        if x.shape[-2:] != (n, m):
            raise ValueError(
                f"{type(self).__name__}(n={n}, m={m}) got input of shape {tuple(x.shape)}; its last two "
                f"dimensions must be ({n}, {m})"
            )
        left, right = self.factors()
        y = kronecker_matvec((left, right.mT), x)
        return y if self.bias is None else y + self.bias


class KroneckerConv2d(_KroneckerMap):
    """A linear map on conv weights ``(out, in, k)`` whose matrix is ``O ⊗ I ⊗ K``, plus a bias.

    Three identity-initialised factors, one per mode: ``O`` (out, out) mixes output channels,
    ``I`` (in, in) input channels, ``K`` (k, k) the ``k = kh * kw`` kernel positions, applied
    as a mode-wise product (:func:`kronecker_matvec`). A 64x64x3x3 conv weight costs
    64^2 + 64^2 + 9^2 values rather than 576^2 (or 36864^2 unfactored). With ``psd=True``
    each factor ``F`` is used as ``F^T F``. The input is ``(..., out, in, k)``.
    """

    def __init__(
        self, out_channels: int, in_channels: int, kernel_size: int, bias: bool = True, psd: bool = False,
        device: Device = None, dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        factors = {"out_factor": ("out_channels", out_channels), "in_factor": ("in_channels", in_channels)}
        factors["kernel_factor"] = ("kernel_size", kernel_size)
        super().__init__(factors, bias, psd, device, dtype)

    @classmethod
    def kronecker_dims(cls, shape: Sequence[int]) -> tuple[int, int, int]:
        """Returns the ``(out, in, k)`` tensor a parameter of ``shape`` is viewed as.

        A conv weight ``(out, in, kh, kw)`` is ``(out, in, kh * kw)``; lower ranks are padded
        with trailing ones (a bias (n,) is ``(n, 1, 1)``, a linear weight ``(n, m, 1)``), so one
        transform covers every parameter of a convolutional network.

        Raises:
            ValueError: for a scalar or a parameter of rank > 4.
        """
        shape = tuple(shape)
        if len(shape) == 0 or len(shape) > 4:
            raise ValueError(
                f"{cls.__name__} cannot factor a parameter of shape {shape} (rank {len(shape)}); it "
                "takes ranks 1 to 4 (bias, linear weight, conv1d or conv2d weight). Use KroneckerLinear, "
                "which views any rank >= 1 as a matrix"
            )
        if len(shape) == 4:
            return (shape[0], shape[1], shape[2] * shape[3])
        return (shape + (1, 1))[:3]  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        """Returns ``(O ⊗ I ⊗ K) x + B`` for ``x`` of shape ``(..., out, in, k)``."""
        dims = self.dims
        if x.shape[-3:] != dims:
            raise ValueError(
                f"{type(self).__name__}{dims} got input of shape {tuple(x.shape)}; its last three "
                f"dimensions must be {dims} (flatten a (out, in, kh, kw) weight with .flatten(-2))"
            )
        y = kronecker_matvec(self.factors(), x)
        return y if self.bias is None else y + self.bias


class KroneckerRNN(nn.Module):
    """An Elman cell ``h' = sigma(W_h x + U_h h)``, ``y = W_y h'`` whose maps are :class:`KroneckerLinear`.

    (Jose et al. 2018.) ``forward(x, hidden)`` returns ``(y, h')``; ``x``, ``hidden`` and
    both outputs have KroneckerLinear's input shape ``(..., n, m)``. It needs a hidden
    state, so it is a building block for recurrent learned optimizers, not a stateless
    gradient transform.
    """

    def __init__(
        self,
        n: int,
        m: int,
        bias: bool = True,
        sigma: Callable[[Tensor], Tensor] | None = None,
        psd: bool = False,
    ) -> None:
        super().__init__()
        self.W_h = KroneckerLinear(n, m, bias=bias, psd=psd)
        self.U_h = KroneckerLinear(n, m, bias=bias, psd=psd)
        self.W_y = KroneckerLinear(n, m, bias=bias, psd=psd)
        self.sigma = nn.Tanh() if sigma is None else sigma

    def forward(self, x: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(output, new_hidden)``."""
        new_hidden = self.sigma(self.W_h(x) + self.U_h(hidden))
        return self.W_y(new_hidden), new_hidden


class KroneckerLSTM(nn.Module):
    """An LSTM cell whose eight input and hidden maps are :class:`KroneckerLinear` (Jose et al. 2018).

    ``forward(x, (h, c))`` returns ``(h', (h', c'))``; all tensors have shape ``(..., n, m)``.
    """

    def __init__(
        self,
        n: int,
        m: int,
        bias: bool = True,
        sigma: Callable[[Tensor], Tensor] | None = None,
        psd: bool = False,
    ) -> None:
        super().__init__()
        for gate in ("i", "f", "g", "o"):
            setattr(self, f"W_i{gate}", KroneckerLinear(n, m, bias=bias, psd=psd))
            setattr(self, f"W_h{gate}", KroneckerLinear(n, m, bias=bias, psd=psd))
        self.sigma = nn.Sigmoid() if sigma is None else sigma
        self.tanh = nn.Tanh()

    def forward(self, x: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns ``(h', (h', c'))``."""
        h, c = hidden
        i = self.sigma(self.W_ii(x) + self.W_hi(h))
        f = self.sigma(self.W_if(x) + self.W_hf(h))
        g = self.tanh(self.W_ig(x) + self.W_hg(h))
        o = self.sigma(self.W_io(x) + self.W_ho(h))
        c = f * c + i * g
        h = o * self.tanh(c)
        return h, (h, c)
