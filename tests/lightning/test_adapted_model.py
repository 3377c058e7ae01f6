"""AdaptedModel: a module run with substituted weights, leaving the module untouched."""

from __future__ import annotations

import torch
from torch import nn

import metaloop.lightning
from metaloop.lightning import AdaptedModel


def test_runs_the_module_with_the_given_weights_and_keeps_the_others():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    x = torch.randn(4, 2)
    head = {"2.weight": torch.zeros(1, 3), "2.bias": torch.ones(1)}
    torch.testing.assert_close(AdaptedModel(module, head)(x), torch.ones(4, 1))
    shifted = {n: p + 1 for n, p in module.named_parameters()}
    expected = torch.tanh(x @ shifted["0.weight"].T + shifted["0.bias"]) @ shifted["2.weight"].T + shifted["2.bias"]
    torch.testing.assert_close(AdaptedModel(module, shifted)(x), expected)
    assert all(not torch.equal(p, shifted[n]) for n, p in module.named_parameters())  # module untouched


def test_the_former_name_still_imports():
    assert metaloop.lightning.FunctionalModel is AdaptedModel
