"""learn2learn's ``learn2learn.nn.kroneckers`` (implemented in :mod:`metaloop.nn.kronecker`)."""

from __future__ import annotations

from metaloop.nn.kronecker import KroneckerConv2d, KroneckerLinear, KroneckerLSTM, KroneckerRNN

__all__ = ["KroneckerLinear", "KroneckerRNN", "KroneckerLSTM", "KroneckerConv2d"]
