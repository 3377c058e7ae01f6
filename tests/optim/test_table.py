"""The optimizer table: shells, configs and test cases read it; a new optimizer is one rule and one row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from optim_cases import OPTIONS
from torch import nn

import metaloop
from metaloop.optim import OPTIMIZERS, Rule, differentiable_version, register_optim
from metaloop.optim.loop import inner_loop
from metaloop.transforms import TransformOptimizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "inner_optim"
TORCH_ROWS = {t for t in OPTIMIZERS if t.__module__.startswith("torch.optim")}


def config_targets() -> dict[str, str]:
    return {path.stem: yaml.safe_load(path.read_text())["_target_"] for path in CONFIGS.glob("*.yaml")}


def test_every_torch_row_has_an_inner_optim_config_and_every_config_a_row():
    targets = config_targets()
    for optim_type in TORCH_ROWS:
        assert targets.get(optim_type.__name__.lower()) == f"torch.optim.{optim_type.__name__}", optim_type
    for name, target in targets.items():
        module, _, cls = target.rpartition(".")
        optim_type = getattr(__import__(module, fromlist=[cls]), cls)
        assert optim_type in OPTIMIZERS, f"configs/inner_optim/{name}.yaml targets {target}, not in the table"


def test_every_row_has_a_higher_named_shell_and_test_cases():
    assert {t for t, _, _ in OPTIONS} == TORCH_ROWS
    for optim_type, rule in OPTIMIZERS.items():
        shell = differentiable_version(optim_type)
        assert shell.__name__ == f"Differentiable{optim_type.__name__}" and shell.rule is rule
        if optim_type in TORCH_ROWS:
            assert getattr(metaloop.optim, shell.__name__) is shell
    assert metaloop.optim.DifferentiableAdamW.rule is metaloop.optim.DifferentiableAdam.rule


class SignSGD(torch.optim.SGD):
    """A twelfth optimizer: signSGD (Bernstein et al. 2018) as a torch.optim.SGD subclass."""


def _sign_update(param, grad, state, hparams):
    return param - torch.sign(grad) * hparams["lr"], state


SIGN_SGD = Rule(init=lambda param, hparams: {}, update=_sign_update, scalar_state=())


def test_a_twelfth_optimizer_is_one_rule_and_one_row():
    """register_optim(SignSGD, SIGN_SGD) adds the row; innerloop_ctx, inner_loop and the shell name follow."""
    register_optim(SignSGD, SIGN_SGD)
    try:
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        x, y = torch.randn(5, 3), torch.randn(5, 1)
        opt = SignSGD(model.parameters(), lr=0.1)
        with metaloop.innerloop_ctx(model, opt) as (fmodel, diffopt):
            assert type(diffopt).__name__ == "DifferentiableSignSGD"
            loss = ((fmodel(x) - y) ** 2).mean()
            grads = torch.autograd.grad(loss, list(fmodel.parameters()), retain_graph=True)
            diffopt.step(loss)
            for p0, p1, g in zip(fmodel.parameters(time=0), fmodel.parameters(), grads):
                torch.testing.assert_close(p1, p0 - 0.1 * torch.sign(g))
        weights = dict(model.named_parameters())
        fast = inner_loop(lambda w: ((torch.func.functional_call(model, w, (x,)) - y) ** 2).mean(), weights,
                          rule=metaloop.optim.get_rule(SignSGD), hparams=dict.fromkeys(weights, {"lr": 0.1}), steps=1)
        for name, p in fast.items():
            torch.testing.assert_close(p, dict(zip(weights, fmodel.parameters()))[name])
    finally:
        del OPTIMIZERS[SignSGD]


def test_transform_row_is_added_by_the_transforms_layer():
    assert OPTIMIZERS[TransformOptimizer] is metaloop.optim.TRANSFORM
    assert differentiable_version(TransformOptimizer) is metaloop.transforms.DifferentiableTransformOptimizer
