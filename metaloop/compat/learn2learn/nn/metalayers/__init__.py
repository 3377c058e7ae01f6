"""learn2learn's ``learn2learn.nn.metalayers`` (implemented in :mod:`metaloop.nn.metalayers`)."""

from __future__ import annotations

from metaloop.compat.learn2learn.nn.metalayers import metamodule, parameter_transform
from metaloop.nn.metalayers import MetaModule, ParameterTransform

__all__ = ["MetaModule", "ParameterTransform", "metamodule", "parameter_transform"]
