"""Differentiable optimizers (higher's ``higher.optim`` API, plus AdamW, NAdam and RAdam).

Pure update rules and the optimizer table live in :mod:`metaloop.optim.rules`; the stateful,
higher-compatible shells in :mod:`metaloop.optim.differentiable`; override handling in
:mod:`metaloop.optim.hyperparams`; the fast inner loop in :mod:`metaloop.optim.loop`.
"""

from __future__ import annotations

from metaloop.optim import differentiable
from metaloop.optim.differentiable import *  # noqa: F403  (DifferentiableOptimizer, the shells DifferentiableSGD..., get_diff_optim, ...)
from metaloop.optim.hyperparams import apply_trainable_opt_params, get_trainable_opt_params
from metaloop.optim.rules import OPTIMIZERS, TRANSFORM, Rule, apply_rule, safe_sqrt

__all__ = [
    *differentiable.__all__,
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
    "Rule",
    "OPTIMIZERS",
    "TRANSFORM",
    "apply_rule",
    "safe_sqrt",
]

def __getattr__(name: str) -> object:
    """Returns higher's private name ``name`` (``_add``, ``_GradCallbackType``, ...) from :mod:`metaloop.compat.higher`.

    ``import metaloop as higher`` makes this module ``higher.optim``, whose users import higher's private
    helpers from it; they live in the compatibility layer and are looked up only when asked for.
    """
    if name.startswith("_") and not name.startswith("__"):
        from metaloop.compat import higher

        if name in higher.OPTIM_NAMES:
            return getattr(higher, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
