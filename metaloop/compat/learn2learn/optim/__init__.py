"""learn2learn's ``learn2learn.optim``: its optimizers on ordinary modules (here) and the gradient transforms of :mod:`metaloop.transforms`.

``DifferentiableSGD`` here is learn2learn's (it updates a module in place), not
:class:`metaloop.optim.DifferentiableSGD` (higher's).
"""

from __future__ import annotations

from metaloop.compat.learn2learn.optim import transforms
from metaloop.compat.learn2learn.optim.transforms import (
    KroneckerTransform,
    MetaCurvatureTransform,
    ModuleTransform,
    ReshapedTransform,
)
from metaloop.compat.learn2learn.optim.learnable_optimizer import LearnableOptimizer, ParameterUpdate
from metaloop.compat.learn2learn.optim.learnable_optimizer import ModuleSGD as DifferentiableSGD  # learn2learn's name

__all__ = [
    "LearnableOptimizer",
    "ParameterUpdate",
    "DifferentiableSGD",
    "ModuleTransform",
    "ReshapedTransform",
    "KroneckerTransform",
    "MetaCurvatureTransform",
    "transforms",
]
