"""Former home of :class:`~metaloop.nn.Conv4` and :class:`~metaloop.nn.MLP`, which live in :mod:`metaloop.nn`; kept for imports of this path."""

from __future__ import annotations

from metaloop.nn import MLP, Conv4

__all__ = ["Conv4", "MLP"]
