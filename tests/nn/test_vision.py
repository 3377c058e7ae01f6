"""metaloop.nn.vision: output shapes, learn2learn's parameter names, initialisations, DropBlock, and adaptation through them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaloop.nn import (
    CNN4,
    WRN28,
    CNN4Backbone,
    ConvBase,
    DropBlock,
    MiniImagenetCNN,
    OmniglotCNN,
    OmniglotFC,
    ResNet12,
    ResNet12Backbone,
    WRN28Backbone,
    fc_init_,
    maml_init_,
)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# (constructor, input shape, output shape, number of parameters: closed forms written out below)
CONV4_84 = 4 * 64 + 4 * 64 + (3 * 9 * 64 + 64) + 3 * (64 * 9 * 64 + 64)  # BN weights/biases + convs
CASES = {
    "OmniglotFC": (lambda: OmniglotFC(28 * 28, 5), (3, 1, 28, 28), (3, 5),
                   sum(i * o + o + 2 * o for i, o in [(784, 256), (256, 128), (128, 64), (64, 64)]) + 64 * 5 + 5),
    "OmniglotCNN": (lambda: OmniglotCNN(5), (3, 784), (3, 5),
                    4 * 128 + (9 * 64 + 64) + 3 * (64 * 9 * 64 + 64) + 64 * 5 + 5),
    "CNN4": (lambda: CNN4(5), (3, 3, 84, 84), (3, 5), CONV4_84 + 25 * 64 * 5 + 5),
    "CNN4Backbone": (lambda: CNN4Backbone(), (3, 3, 84, 84), (3, 1600), CONV4_84),
    "CNN4 32x32": (lambda: CNN4(5, hidden_size=32, embedding_size=128), (3, 3, 32, 32), (3, 5), None),
    "CNN4 image_size=32": (lambda: CNN4(5, hidden_size=32, image_size=32), (3, 3, 32, 32), (3, 5), None),
    "ConvBase": (lambda: ConvBase(), (3, 1, 28, 28), (3, 64, 2, 2), None),
    "ResNet12": (lambda: ResNet12(5), (2, 3, 84, 84), (2, 5), 12_424_320 + 640 * 5 + 5),
    "ResNet12Backbone 16k": (lambda: ResNet12Backbone(avg_pool=False), (2, 3, 84, 84), (2, 16000), 12_424_320),
    "WRN28": (lambda: WRN28(5), (2, 3, 32, 32), (2, 5), None),
    "WRN28Backbone": (lambda: WRN28Backbone(), (1, 3, 32, 32), (1, 640), None),
}


@pytest.mark.parametrize("name", CASES)
def test_output_shapes_and_parameter_counts(name):
    make, x_shape, y_shape, params = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        y = model(torch.rand(x_shape))
    assert y.shape == y_shape and torch.isfinite(y).all()
    if params is not None:
        assert count(model) == params


def test_resnet12_parameter_count_closed_form():
    filters, total, inplanes = [64, 160, 320, 640], 0, 3
    for planes in filters:
        total += 9 * inplanes * planes + 2 * 9 * planes * planes + 3 * 2 * planes  # three convs + three BNs
        total += inplanes * planes + 2 * planes  # 1x1 shortcut + its BN
        inplanes = planes
    assert total == 12_424_320 == count(ResNet12Backbone())


def test_parameter_names_are_learn2learns():
    """So learn2learn state dicts (and its pretrained backbones) load: names as in learn2learn.vision.models."""
    expected = {
        OmniglotFC(784, 5): ["features.1.0.linear.weight", "features.1.0.normalize.weight", "features.1.3.linear.bias", "classifier.weight"],
        OmniglotCNN(5): ["base.0.conv.weight", "features.1.0.conv.weight", "base.3.normalize.bias", "classifier.bias"],
        CNN4(5): ["features.0.conv.weight", "features.3.normalize.running_mean", "classifier.weight"],
        ResNet12(5): ["features.layer1.0.conv1.weight", "features.layer4.0.bn3.running_var", "features.layer2.0.downsample.0.weight",
                      "features.layer3.0.downsample.1.weight", "classifier.weight"],
        WRN28(5): ["features.conv1.weight", "features.layer1.0.bn1.weight", "features.layer1.0.shortcut.0.weight",
                   "features.layer3.3.conv2.bias", "features.bn1.running_mean", "classifier.bias"],
    }
    for model, names in expected.items():
        keys = set(model.state_dict())
        assert set(names) <= keys, set(names) - keys
    assert MiniImagenetCNN is CNN4


def test_maml_and_fc_initialisations():
    torch.manual_seed(0)
    layer = maml_init_(nn.Linear(300, 200))
    bound = math.sqrt(6 / (300 + 200))
    assert layer.bias.abs().max() == 0 and layer.weight.abs().max() <= bound
    assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    fc = fc_init_(nn.Linear(300, 200))
    assert fc.bias.abs().max() == 0 and fc.weight.abs().max() <= 0.02
    # normal(0, 0.01) truncated at +-2 sigma has standard deviation 0.01 * 0.8796
    assert fc.weight.std().item() == pytest.approx(0.01 * 0.8796, rel=0.02)


def reference_dropblock(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """DropBlock written as loops: each corner (i, j) zeroes the size x size square below-right of it."""
    keep = torch.ones_like(x)
    for n, c, i, j in corners.nonzero().tolist():
        keep[n, c, i : i + size, j : j + size] = 0
    return keep * x * keep.numel() / keep.sum()


@pytest.mark.parametrize("size", [1, 3, 5])
def test_dropblock_matches_the_loop_definition(size):
    block = DropBlock(size).train()
    x = torch.rand(2, 3, 7, 7)
    torch.manual_seed(3)
    out = block(x, gamma=0.1)
    torch.manual_seed(3)
    corners = torch.bernoulli(torch.full((2, 3, 8 - size, 8 - size), 0.1))
    assert corners.sum() > 0
    torch.testing.assert_close(out, reference_dropblock(x, corners, size))
    assert torch.equal(block.eval()(x, gamma=0.5), x)


def test_resnet12_dropout_only_in_training():
    model = ResNet12(5, dropblock_dropout=0.5)
    x = torch.rand(1, 3, 84, 84)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_resnet12_trains_on_images_smaller_than_its_dropblock_expects():
    torch.manual_seed(0)
    model = ResNet12(2, avg_pool=False, hidden_size=640 * 2 * 2, dropblock_dropout=0.5).train()
    y = model(torch.rand(2, 3, 32, 32))  # stage 3 maps are 4x4, below the 5x5 squares
    assert y.shape == (2, 2) and torch.isfinite(y).all()


def test_an_inner_step_through_a_backbone_changes_its_predictions():
    """The models are plain modules: functional_call with adapted parameters works, with second-order gradients."""
    torch.manual_seed(0)
    model = CNN4(3, hidden_size=8, embedding_size=8 * 4, channels=3)
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    adapted = {k: p - 0.05 * g for (k, p), g in zip(params.items(), grads)}
    query_loss = nn.functional.cross_entropy(functional_call(model, adapted, (x,)), y)
    assert query_loss < loss
    meta_grads = torch.autograd.grad(query_loss, list(params.values()))
    assert all(torch.isfinite(g).all() for g in meta_grads)


@pytest.mark.parametrize("make, message", [
    (lambda: CNN4(0), "output_size=0"),
    (lambda: CNN4(5, image_size=8), "image_size=8"),
    (lambda: OmniglotFC(784, 5, sizes=[]), "sizes=\\[\\]"),
    (lambda: WRN28Backbone(depth=27), "depth=27"),
    (lambda: ConvBase(layers=0), "layers=0"),
])
def test_bad_sizes_name_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()
