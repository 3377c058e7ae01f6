"""Learned-hyperparameter specs: which adapted parameters share a value, and its shape."""

from __future__ import annotations

import pytest
import torch

from metaloop.lightning import PerElement, PerLayer, PerTensor, Shared
from metaloop.algorithms.learned import is_number_or_tuple

NAMES = ["body.0.weight", "body.0.bias", "head.weight"]


@pytest.mark.parametrize("spec,keys", [
    (Shared(), ["", "", ""]),
    (PerLayer(), ["body.0", "body.0", "head"]),
    (PerTensor(), NAMES),
    (PerElement(), NAMES),
])
def test_keys_say_which_parameters_share_a_value(spec, keys):
    assert [spec.key(n) for n in NAMES] == keys


def test_shapes_and_initial_values():
    weight = torch.zeros(3, 4)
    assert Shared().shape(weight) == PerLayer().shape(weight) == PerTensor().shape(weight) == ()
    assert PerElement().shape(weight) == (3, 4)
    assert Shared(0.1).init == 0.1 and Shared((0.9, 0.99)).init == (0.9, 0.99) and PerTensor().init is None


@pytest.mark.parametrize("value,learnable", [
    (0.1, True), (0, True), ((0.9, 0.999), True), (torch.tensor(0.5), True),
    (True, False), ("x", False), ((), False), (torch.tensor(1), False), (None, False),
])
def test_what_can_be_learned(value, learnable):
    assert is_number_or_tuple(value) is learnable
