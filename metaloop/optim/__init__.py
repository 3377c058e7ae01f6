"""Differentiable optimizers (higher's ``higher.optim`` API, plus AdamW, NAdam and RAdam).

Pure update rules live in :mod:`metaloop.optim.rules`; the stateful, higher-compatible
shells in :mod:`metaloop.optim.differentiable`; override handling in
:mod:`metaloop.optim.hyperparams`.
"""

from __future__ import annotations

from metaloop.optim.differentiable import (
    DifferentiableAdadelta,
    DifferentiableAdagrad,
    DifferentiableAdam,
    DifferentiableAdamax,
    DifferentiableAdamW,
    DifferentiableASGD,
    DifferentiableNAdam,
    DifferentiableOptimizer,
    DifferentiableRAdam,
    DifferentiableRMSprop,
    DifferentiableRprop,
    DifferentiableSGD,
    _get_mask_closure,
    _GradClosureType,
    _maybe_mask,
    _OverrideType,
    create_diff_optim,
    get_diff_optim,
    get_rule,
    register_optim,
)
from metaloop.optim.hyperparams import apply_trainable_opt_params, get_trainable_opt_params
from metaloop.optim.rules import RULES, Rule, safe_sqrt

__all__ = [
    "DifferentiableOptimizer",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableASGD",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableNAdam",
    "DifferentiableRAdam",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_rule",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
    "Rule",
    "RULES",
    "safe_sqrt",
]
