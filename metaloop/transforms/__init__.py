"""Learnable update rules: trainable transforms of the gradient, and the optimizers that apply them.

- :mod:`~metaloop.transforms.gradient_transforms`: the transforms (``ModuleTransform``,
  ``KroneckerTransform``, ``MetaCurvatureTransform``) and the checks every shell shares.
- :mod:`~metaloop.transforms.transform_optimizer`: ``TransformOptimizer`` and its
  differentiable twin, registered with :func:`metaloop.optim.register_optim` on import, so
  ``metaloop.innerloop_ctx`` unrolls a learned preconditioner like any other optimizer.
- :mod:`~metaloop.transforms.learnable_optimizer`: learn2learn's ``LearnableOptimizer``,
  ``ParameterUpdate`` and ``ModuleSGD`` (learn2learn's ``DifferentiableSGD``) for ordinary modules.
- :mod:`~metaloop.transforms.module_updates`: ``clone_module``, ``update_module``,
  ``detach_module``.

Builds on :mod:`metaloop.optim` and :mod:`metaloop.nn`; learn2learn's names are re-exported
by :mod:`metaloop.compat.learn2learn`.
"""

from __future__ import annotations

from metaloop.transforms.gradient_transforms import (
    KroneckerTransform,
    MetaCurvatureTransform,
    ModuleTransform,
    ReshapedTransform,
    TransformFactory,
    apply_transform,
    build_transforms,
)
from metaloop.transforms.learnable_optimizer import LearnableOptimizer, ModuleSGD, ParameterUpdate
from metaloop.transforms.module_updates import clone_module, detach_module, update_module
from metaloop.transforms.transform_optimizer import (
    DifferentiableTransformOptimizer,
    TransformOptimizer,
    transform_step,
)

__all__ = [
    "TransformFactory",
    "apply_transform",
    "build_transforms",
    "ReshapedTransform",
    "ModuleTransform",
    "KroneckerTransform",
    "MetaCurvatureTransform",
    "transform_step",
    "TransformOptimizer",
    "DifferentiableTransformOptimizer",
    "LearnableOptimizer",
    "ParameterUpdate",
    "ModuleSGD",
    "clone_module",
    "update_module",
    "detach_module",
]
