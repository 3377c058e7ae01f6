"""The MAML papers' networks: output shapes, parameter counts, no buffers, and argument errors."""

from __future__ import annotations

import pytest
import torch

from metaloop.lightning import MLP, Conv4


@pytest.mark.parametrize("image_size,features", [(28, 64), (84, 64 * 25)])
def test_conv4_shapes_and_parameter_count(image_size, features):
    model = Conv4(5, image_size=image_size)
    assert model(torch.rand(3, 1, image_size, image_size)).shape == (3, 5)
    assert model.head.in_features == features
    conv = 9 * 64 + 64 + 3 * (9 * 64 * 64 + 64)
    batchnorm = 4 * 2 * 64
    assert sum(p.numel() for p in model.parameters()) == conv + batchnorm + features * 5 + 5
    assert list(model.buffers()) == []  # batch statistics only: vmap-able, nothing to carry between tasks


def test_conv4_normalises_with_the_batch_statistics_in_eval_mode_too():
    model = Conv4(5).eval()
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(model(x), model.train()(x))


def test_mlp_is_1_40_40_1_by_default():
    model = MLP()
    assert [tuple(p.shape) for p in model.parameters()] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    assert model(torch.rand(7, 1)).shape == (7, 1)
    assert MLP([3, 2])(torch.rand(4, 3)).shape == (4, 2)


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="image_size=8 is too small"):
        Conv4(5, image_size=8)
    with pytest.raises(ValueError, match=r"out_features=None: Conv4 is a classifier"):
        Conv4(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sizes=\[4\] needs at least an input and an output size"):
        MLP([4])
