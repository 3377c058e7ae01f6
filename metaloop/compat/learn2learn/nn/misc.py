"""learn2learn's ``learn2learn.nn.misc`` (implemented in :mod:`metaloop.nn.layers`)."""

from __future__ import annotations

from metaloop.nn.layers import Flatten, Lambda, Scale, freeze, unfreeze

__all__ = ["Lambda", "Flatten", "Scale", "freeze", "unfreeze"]
