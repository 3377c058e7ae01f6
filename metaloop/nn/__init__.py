"""Neural-network building blocks for learned update rules: Kronecker-factored linear maps.

Imports only torch. :mod:`metaloop.transforms` builds gradient transforms from these.
"""

from __future__ import annotations

from metaloop.nn.kronecker import (
    KroneckerConv2d,
    KroneckerLinear,
    KroneckerLSTM,
    KroneckerRNN,
    kronecker_matvec,
)

__all__ = ["kronecker_matvec", "KroneckerLinear", "KroneckerConv2d", "KroneckerRNN", "KroneckerLSTM"]
