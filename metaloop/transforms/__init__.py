"""Learnable update rules: trainable transforms of the gradient, and the optimizers that apply them.

- :mod:`~metaloop.transforms.gradient_transforms`: the transforms (``ModuleTransform``,
  ``KroneckerTransform``, ``MetaCurvatureTransform``) and the checks every shell shares.
- :mod:`~metaloop.transforms.transform_optimizer`: ``TransformOptimizer`` and its
  differentiable twin, registered with :func:`metaloop.optim.register_optim` on import, so
  ``metaloop.innerloop_ctx`` unrolls a learned preconditioner like any other optimizer.

Builds on :mod:`metaloop.optim` and :mod:`metaloop.nn`. learn2learn's edits of an ordinary module
(``clone_module``, ``update_module``, ``detach_module``) and its optimizers on such modules
(``LearnableOptimizer``, ``ParameterUpdate``, ``ModuleSGD``) are :mod:`metaloop.compat.learn2learn`'s:
metaloop holds fast weights in tensors passed to ``torch.func.functional_call``, not in edited modules.
"""

from __future__ import annotations

from metaloop.transforms import gradient_transforms, transform_optimizer
from metaloop.transforms.gradient_transforms import *  # noqa: F403
from metaloop.transforms.transform_optimizer import *  # noqa: F403

__all__ = [*gradient_transforms.__all__, *transform_optimizer.__all__]

# learn2learn's names this package held before they moved to the compatibility layer
_MOVED_TO_COMPAT = {
    "clone_module": "metaloop.compat.learn2learn.utils.module_updates",
    "update_module": "metaloop.compat.learn2learn.utils.module_updates",
    "detach_module": "metaloop.compat.learn2learn.utils.module_updates",
    "LearnableOptimizer": "metaloop.compat.learn2learn.optim.learnable_optimizer",
    "ParameterUpdate": "metaloop.compat.learn2learn.optim.learnable_optimizer",
    "ModuleSGD": "metaloop.compat.learn2learn.optim.learnable_optimizer",
}


def __getattr__(name: str) -> object:
    """Returns learn2learn's ``name`` (``metaloop.transforms.clone_module``, ...) from :mod:`metaloop.compat.learn2learn`, where it lives."""
    if name in _MOVED_TO_COMPAT:
        import importlib

        return getattr(importlib.import_module(_MOVED_TO_COMPAT[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
