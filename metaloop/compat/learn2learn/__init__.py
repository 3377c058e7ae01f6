"""learn2learn's names on metaloop: ``l2l.optim``, ``l2l.nn``, ``l2l.utils`` and the module utilities.

``from metaloop.compat import learn2learn as l2l`` then ``l2l.optim.LearnableOptimizer``,
``l2l.optim.KroneckerTransform(l2l.nn.KroneckerLinear)``, ``l2l.clone_module(model)``,
``l2l.update_module(model, updates)``, ``l2l.detach_module(model)``. The implementations
are :mod:`metaloop.transforms` and :mod:`metaloop.nn`.
"""

from __future__ import annotations

from metaloop.compat.learn2learn import nn, optim, utils
from metaloop.transforms.module_updates import clone_module, detach_module, update_module

__all__ = ["optim", "nn", "utils", "clone_module", "update_module", "detach_module"]
