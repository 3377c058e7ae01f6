"""Lambda, Flatten, Scale, freeze and unfreeze."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaloop.nn import Flatten, Lambda, Scale, freeze, unfreeze


def test_lambda_calls_its_function_with_all_arguments():
    mean23 = Lambda(lambda x, scale=1.0: scale * x.mean(dim=[2, 3]))
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(mean23(x, scale=2.0), 2.0 * x.mean(dim=[2, 3]), rtol=0, atol=0)
    assert isinstance(nn.Sequential(mean23), nn.Module)
    with pytest.raises(TypeError, match="Lambda wraps a callable, got int"):
        Lambda(3)


def test_flatten_keeps_the_batch_dimension():
    x = torch.randn(5, 3, 4, 4)
    assert Flatten()(x).shape == (5, 48)
    assert Flatten()(x.transpose(2, 3)).shape == (5, 48)  # non-contiguous input


@pytest.mark.parametrize("shape,expected", [(None, (1,)), (4, (4,)), ([3, 2], (3, 2)), (torch.Size([2, 2]), (2, 2))])
def test_scale_multiplies_by_a_learnable_tensor(shape, expected):
    scale = Scale(shape, alpha=0.5)
    assert tuple(scale.alpha.shape) == expected and isinstance(scale.alpha, nn.Parameter)
    x = torch.ones(expected)
    torch.testing.assert_close(scale(x), 0.5 * x, rtol=0, atol=0)
    scale(x).sum().backward()
    torch.testing.assert_close(scale.alpha.grad, x, rtol=0, atol=0)


def test_scale_rejects_a_bad_shape():
    with pytest.raises(ValueError, match=r"Scale shape=\(3, 0\) must hold positive ints"):
        Scale((3, 0))


def test_freeze_and_unfreeze_toggle_requires_grad_in_place():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    assert freeze(model) is model
    assert not any(p.requires_grad for p in model.parameters())
    assert unfreeze(model) is model
    assert all(p.requires_grad for p in model.parameters())
