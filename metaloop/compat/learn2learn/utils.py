"""learn2learn's ``learn2learn.utils`` module utilities (implemented in :mod:`metaloop.transforms.module_updates`)."""

from __future__ import annotations

from metaloop.transforms.module_updates import clone_module, detach_module, update_module

__all__ = ["clone_module", "update_module", "detach_module"]
