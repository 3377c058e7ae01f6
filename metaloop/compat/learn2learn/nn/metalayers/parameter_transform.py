"""learn2learn's ``learn2learn.nn.metalayers.parameter_transform`` (implemented in :mod:`metaloop.nn.metalayers`)."""

from __future__ import annotations

from metaloop.nn.metalayers import ParameterTransform

__all__ = ["ParameterTransform"]
