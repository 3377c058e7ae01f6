"""The optimizer x option matrix shared by the optimizer tests."""

from __future__ import annotations

from typing import Any

import torch

# (optimizer type, constructor kwargs for the first group, kwargs that differ in the second group)
OPTIONS: list[tuple[type, dict[str, Any], dict[str, Any]]] = [
    (torch.optim.SGD, {"lr": 0.1}, {"lr": 0.05}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, {"momentum": 0.5}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}, {"lr": 0.02}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, {"lr": 0.02}),
    (torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.1}, {"weight_decay": 0.0}),
    (torch.optim.SGD, {"lr": 0.01, "momentum": 0.5, "maximize": True}, {"lr": 0.02}),
    (torch.optim.Adam, {"lr": 0.05}, {"lr": 0.01}),
    (torch.optim.Adam, {"lr": 0.05, "amsgrad": True}, {"lr": 0.01}),
    (torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.1}, {"betas": (0.8, 0.99)}),
    (torch.optim.Adam, {"lr": 0.01, "maximize": True, "amsgrad": True}, {"lr": 0.02}),
    (torch.optim.AdamW, {"lr": 0.05}, {"lr": 0.01}),
    (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}, {"weight_decay": 0.3}),
    (torch.optim.AdamW, {"lr": 0.01, "maximize": True}, {"lr": 0.02}),
    (torch.optim.Adamax, {"lr": 0.05}, {"lr": 0.01}),
    (torch.optim.Adamax, {"lr": 0.05, "weight_decay": 0.1}, {"betas": (0.8, 0.99)}),
    (torch.optim.Adamax, {"lr": 0.01, "maximize": True}, {"lr": 0.02}),
    (torch.optim.Adadelta, {"lr": 1.0}, {"rho": 0.8}),
    (torch.optim.Adadelta, {"lr": 1.0, "weight_decay": 0.1}, {"lr": 0.5}),
    (torch.optim.Adadelta, {"lr": 0.5, "maximize": True}, {"lr": 0.2}),
    (torch.optim.Adagrad, {"lr": 0.1}, {"lr": 0.05}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.05}, {"lr_decay": 0.0}),
    (torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.2, "weight_decay": 0.1}, {"lr": 0.05}),
    (torch.optim.Adagrad, {"lr": 0.05, "maximize": True}, {"lr": 0.02}),
    (torch.optim.ASGD, {"lr": 0.05}, {"lr": 0.02}),
    (torch.optim.ASGD, {"lr": 0.05, "t0": 5.0, "lambd": 0.01, "alpha": 0.5}, {"lr": 0.02}),
    (torch.optim.ASGD, {"lr": 0.05, "weight_decay": 0.1, "t0": 3.0}, {"weight_decay": 0.0}),
    (torch.optim.ASGD, {"lr": 0.01, "maximize": True}, {"lr": 0.02}),
    (torch.optim.RMSprop, {"lr": 0.01}, {"lr": 0.005}),
    (torch.optim.RMSprop, {"lr": 0.01, "centered": True}, {"alpha": 0.9}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.9}, {"lr": 0.005}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.1}, {"lr": 0.005}),
    (torch.optim.RMSprop, {"lr": 0.005, "maximize": True}, {"lr": 0.002}),
    (torch.optim.Rprop, {"lr": 0.01}, {"lr": 0.02}),
    (torch.optim.Rprop, {"lr": 0.01, "etas": (0.3, 1.5), "step_sizes": (1e-4, 0.05)}, {"lr": 0.02}),
    (torch.optim.Rprop, {"lr": 0.005, "maximize": True}, {"lr": 0.002}),
    (torch.optim.NAdam, {"lr": 0.05}, {"lr": 0.01}),
    (torch.optim.NAdam, {"lr": 0.05, "momentum_decay": 0.01, "weight_decay": 0.1}, {"lr": 0.01}),
    (torch.optim.NAdam, {"lr": 0.05, "weight_decay": 0.1, "decoupled_weight_decay": True}, {"lr": 0.01}),
    (torch.optim.NAdam, {"lr": 0.01, "maximize": True}, {"lr": 0.02}),
    (torch.optim.RAdam, {"lr": 0.05}, {"lr": 0.01}),
    (torch.optim.RAdam, {"lr": 0.05, "weight_decay": 0.1}, {"betas": (0.8, 0.9)}),
    (torch.optim.RAdam, {"lr": 0.05, "weight_decay": 0.1, "decoupled_weight_decay": True}, {"lr": 0.01}),
    (torch.optim.RAdam, {"lr": 0.01, "maximize": True}, {"lr": 0.02}),
]


def case_id(case: tuple[type, dict[str, Any], dict[str, Any]]) -> str:
    opt_type, kwargs, _ = case
    options = ",".join(f"{k}={v}" for k, v in kwargs.items() if k != "lr") or "defaults"
    return f"{opt_type.__name__}[{options}]"
