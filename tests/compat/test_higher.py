"""metaloop.compat.higher: higher's private helpers, served as ``higher.optim``'s names and held outside the native optim."""

from __future__ import annotations

import pytest
import torch

import metaloop
import metaloop.optim
from metaloop.compat import higher as higher_names
from metaloop.compat.higher import _add, _addcdiv, _addcmul


@pytest.mark.parametrize("value", [2.0, torch.tensor(2.0)])
def test_highers_arithmetic_helpers(value):
    t, a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([2.0, 8.0])
    torch.testing.assert_close(_add(t, a), t + a)
    torch.testing.assert_close(_add(t, value, a), t + 2 * a)
    torch.testing.assert_close(_addcdiv(t, a, b), t + a / b)
    torch.testing.assert_close(_addcdiv(t, value, a, b), t + 2 * a / b)
    torch.testing.assert_close(_addcmul(t, a, b), t + a * b)
    torch.testing.assert_close(_addcmul(t, value, a, b), t + 2 * a * b)
    assert not t.equal(_add(t, a)) and t.tolist() == [1.0, 2.0]  # out of place


def test_highers_type_names_are_importable():
    from metaloop.optim import _GradCallbackType, _GroupedGradsType

    assert _GroupedGradsType == list[list[torch.Tensor | None]]
    assert "Callable" in repr(_GradCallbackType)


@pytest.mark.parametrize("name", sorted(higher_names.OPTIM_NAMES))
def test_highers_private_names_are_served_by_higher_optim_but_not_defined_by_metaloop_optim(name):
    higher = metaloop  # import metaloop as higher
    assert getattr(higher.optim, name) is getattr(higher_names, name)
    assert name not in vars(metaloop.optim) and name not in metaloop.optim.__all__
    assert name not in vars(metaloop.optim.differentiable)


def test_other_missing_names_of_metaloop_optim_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute '_nothing'"):
        metaloop.optim._nothing  # noqa: B018
    assert not hasattr(metaloop.optim, "__wrapped__")
