"""learn2learn's ``learn2learn.nn.metalayers.metamodule`` (implemented in :mod:`metaloop.nn.metalayers`)."""

from __future__ import annotations

from metaloop.nn.metalayers import MetaModule

__all__ = ["MetaModule"]
