"""metaloop.transforms holds metaloop's own names; learn2learn's module edits live in metaloop.compat.learn2learn and are served at their former paths."""

from __future__ import annotations

import pytest

import metaloop.transforms
from metaloop.compat.learn2learn.optim import learnable_optimizer
from metaloop.compat.learn2learn.utils import module_updates


@pytest.mark.parametrize("name, home", [
    ("clone_module", module_updates), ("update_module", module_updates), ("detach_module", module_updates),
    ("LearnableOptimizer", learnable_optimizer), ("ParameterUpdate", learnable_optimizer), ("ModuleSGD", learnable_optimizer),
])
def test_learn2learns_names_are_compats_and_still_reachable_from_transforms(name, home):
    assert getattr(metaloop.transforms, name) is getattr(home, name)
    assert name not in metaloop.transforms.__all__ and name not in vars(metaloop.transforms)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'clone'"):
        metaloop.transforms.clone  # noqa: B018
