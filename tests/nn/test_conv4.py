"""metaloop.nn.conv4: one conv-4, laid out three ways (Conv4, PerStepConv4, learn2learn's CNN4), computes one function."""

from __future__ import annotations

import pytest
import torch

from metaloop.nn import CNN4, Conv4, ConvBlock, PerStepConv4, conv4_backbone, conv_block

HIDDEN = 8


def conv4_weights(model: Conv4) -> list[dict[str, torch.Tensor]]:
    """Returns each block's convolution and BatchNorm parameters of ``model`` (flat layout: features.{4i} and features.{4i + 1})."""
    return [{"conv.weight": model.features[4 * i].weight, "conv.bias": model.features[4 * i].bias,
             "norm.weight": model.features[4 * i + 1].weight, "norm.bias": model.features[4 * i + 1].bias} for i in range(4)]


@pytest.fixture
def conv4() -> Conv4:
    torch.manual_seed(0)
    model = Conv4(5, in_channels=3, hidden=HIDDEN, image_size=32).double()
    with torch.no_grad():  # BatchNorm starts at (1, 0): give it weights that show whether it is applied
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_per_step_conv4_without_per_step_parts_is_conv4(conv4):
    per_step = PerStepConv4(5, steps=2, in_channels=3, hidden=HIDDEN, image_size=32, per_step_weights=False, per_step_stats=False).double()
    weights = {f"blocks.{i}.{name}": value for i, block in enumerate(conv4_weights(conv4)) for name, value in block.items()}
    per_step.load_state_dict({**weights, "head.weight": conv4.head.weight, "head.bias": conv4.head.bias})
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    for step in (0, 2):
        torch.testing.assert_close(per_step(x, step), conv4(x), rtol=1e-12, atol=1e-12)


def test_learn2learns_cnn4_is_conv4_in_learn2learns_names(conv4):
    """In training mode (BatchNorm on the batch's statistics), CNN4 with Conv4's weights gives Conv4's logits."""
    cnn4 = CNN4(5, hidden_size=HIDDEN, channels=3, image_size=32).double().train()
    weights = {f"features.{i}.{name.replace('norm.', 'normalize.')}": value
               for i, block in enumerate(conv4_weights(conv4)) for name, value in block.items()}
    missing, unexpected = cnn4.load_state_dict({**weights, "classifier.weight": conv4.head.weight, "classifier.bias": conv4.head.bias}, strict=False)
    assert unexpected == [] and all("running" in name or "num_batches" in name for name in missing)
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(cnn4(x), conv4(x), rtol=1e-12, atol=1e-12)


def test_conv4_is_its_backbone_and_a_head():
    torch.manual_seed(0)
    backbone = conv4_backbone(hidden=HIDDEN)
    torch.manual_seed(0)
    model = Conv4(5, hidden=HIDDEN)
    assert list(model.features.state_dict()) == list(backbone.state_dict()) == [
        f"{4 * i + j}.{name}" for i in range(4) for j in (0, 1) for name in ("weight", "bias")]
    assert all(torch.equal(a, b) for a, b in zip(model.features.state_dict().values(), backbone.state_dict().values()))


def test_the_block_downsamples_by_pooling_or_by_stride():
    x = torch.rand(2, 3, 16, 16)
    for max_pool in (True, False):
        conv, norm, relu, pool = conv_block(3, 4, downsample=2, max_pool=max_pool)
        assert pool(relu(norm(conv(x)))).shape == (2, 4, 8, 8)
    assert [name for name, _ in ConvBlock(3, 4, 3).named_children()] == ["max_pool", "normalize", "relu", "conv"]


@pytest.mark.parametrize("make, message", [
    (lambda: Conv4(True), r"out_features=True: Conv4 is a classifier"),
    (lambda: conv4_backbone(image_size=15), r"image_size=15 is too small"),
    (lambda: PerStepConv4(0, steps=1), r"out_features=0: PerStepConv4 is a classifier"),
])
def test_bad_arguments_name_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()
