"""The config keys of the meta-gradient modes (inner.meta_grad, inner.truncate, inner.implicit.*) reach the module."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metaloop.cli import config_dir
from metaloop.optim.implicit import ImplicitOptions


def module_from(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["task=sinusoid", "model=mlp", "inner.lr=0.01", *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.module, _convert_="partial")


def test_defaults_are_the_unrolled_mode_with_default_implicit_options():
    module = module_from([])
    assert (module.inner.meta_grad, module.inner.truncate, module.inner.implicit) == ("unrolled", None, ImplicitOptions())


@pytest.mark.parametrize("overrides, mode, truncate, implicit", [
    (["inner.meta_grad=truncated", "inner.steps=5", "inner.truncate=2"], "truncated", 2, ImplicitOptions()),
    (["inner.meta_grad=implicit", "inner.implicit.lam=0.5", "inner.implicit.solver=neumann",
      "inner.implicit.maxiter=7", "inner.implicit.tol=1e-6"], "implicit", None,
     ImplicitOptions(lam=0.5, solver="neumann", maxiter=7, tol=1e-6)),
])
def test_meta_grad_keys_build_a_module_that_adapts(overrides, mode, truncate, implicit):
    module = module_from(overrides)
    assert (module.inner.meta_grad, module.inner.truncate, module.inner.implicit) == (mode, truncate, implicit)
    x, y = torch.linspace(-3, 3, 10)[:, None], torch.sin(torch.linspace(-3, 3, 10))[:, None]
    loss = module.outer_loss(module.adapt((x, y), steps=module.inner.steps, create_graph=True), (x, y))
    grads = torch.autograd.grad(loss, list(module.model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_a_bad_mode_in_the_config_names_the_value():
    with pytest.raises(Exception, match="meta_grad='bptt' is not accepted \\(not one of the choices\\); use one of unrolled, truncated, implicit"):
        module_from(["inner.meta_grad=bptt"])
