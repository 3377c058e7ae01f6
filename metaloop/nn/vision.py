"""Few-shot vision backbones: the 4-layer conv nets, ResNet-12 and WRN-28-10, with learn2learn's names and parameter names.

Every classifier is ``classifier(features(x))``: ``features`` is the backbone (also offered alone
as ``*Backbone``) and ``classifier`` a linear layer, so ANIL adapts ``adapt_params="^classifier\\."``
and prototypical heads use ``model.features``. Module and parameter names follow learn2learn's
``learn2learn.vision.models``, so its state dicts (and its pretrained backbones) load unchanged.
The conv nets are :func:`metaloop.nn.conv4.conv_block`'s blocks in learn2learn's layout and
initialisation (metaloop's own conv-4 is :class:`~metaloop.nn.Conv4`). Imports only torch.

References: Finn et al. 2017 (MAML's conv nets); Ravi & Larochelle 2017 (CNN4 for 84x84);
Santoro et al. 2016 (the Omniglot MLP); Mishra et al. 2018 and Lee et al. 2019 (ResNet-12, DropBlock
from Ghiasi et al. 2018); Zagoruyko & Komodakis 2016, Dhillon et al. 2020 (WRN-28-10).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloop.nn.conv4 import conv4_features, conv_block

__all__ = [
    "maml_init_",
    "fc_init_",
    "LinearBlock",
    "ConvBlock",
    "ConvBase",
    "OmniglotFC",
    "OmniglotCNN",
    "CNN4Backbone",
    "CNN4",
    "MiniImagenetCNN",
    "DropBlock",
    "ResNet12Backbone",
    "ResNet12",
    "WRN28Backbone",
    "WRN28",
]


def maml_init_(module: nn.Module) -> nn.Module:
    """Returns ``module`` with Glorot-uniform weights (gain 1) and zero bias, as in MAML's code; in place."""
    nn.init.xavier_uniform_(module.weight, gain=1.0)  # type: ignore[arg-type]
    nn.init.zeros_(module.bias)  # type: ignore[arg-type]
    return module


def fc_init_(module: nn.Module) -> nn.Module:
    """Returns ``module`` with weights from a normal(0, 0.01) truncated at 2 standard deviations and zero bias; in place."""
    if getattr(module, "weight", None) is not None:
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.01, a=-0.02, b=0.02)  # type: ignore[arg-type]
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)  # type: ignore[arg-type]
    return module


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


class LinearBlock(nn.Module):
    """Returns ``relu(batchnorm(linear(x)))``: one layer of :class:`OmniglotFC` (BatchNorm without running statistics)."""

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.normalize = nn.BatchNorm1d(output_size, affine=True, momentum=0.999, eps=1e-3, track_running_stats=False)
        self.linear = fc_init_(nn.Linear(input_size, output_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.normalize(self.linear(x)))


def _uniform_batch_norm(channels: int) -> nn.Module:
    """Returns BatchNorm with running statistics and weights drawn from uniform(0, 1), as learn2learn's ConvBlock."""
    norm = nn.BatchNorm2d(channels, affine=True)
    nn.init.uniform_(norm.weight)
    return norm


class ConvBlock(nn.Module):
    """Returns ``maxpool(relu(batchnorm(conv3x3(x))))``, halving the resolution by pooling or, without ``max_pool``, by a stride-2 convolution.

    :func:`~metaloop.nn.conv4.conv_block` with learn2learn's names (``conv``, ``normalize``), its
    initialisations (:func:`maml_init_`, BatchNorm weights from uniform(0, 1)) and running statistics.
    ``max_pool_factor`` scales the pooling window and stride (or the convolution's stride):
    ``int(2 * max_pool_factor)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        max_pool: bool = True,
        max_pool_factor: float = 1.0,
    ) -> None:
        super().__init__()
        stride = int(2 * max_pool_factor)
        if stride < 1:
            raise ValueError(f"max_pool_factor={max_pool_factor} gives a stride of {stride}; use at least 0.5")
        conv, normalize, relu, pool = conv_block(in_channels, out_channels, _uniform_batch_norm, stride, max_pool, kernel_size)
        self.max_pool, self.normalize, self.relu = pool, normalize, relu  # learn2learn's order of registration
        self.conv = maml_init_(conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.max_pool(self.relu(self.normalize(self.conv(x))))


class ConvBase(nn.Sequential):
    """Returns the feature maps of ``layers`` :class:`ConvBlock` of ``hidden`` filters (Omniglot: 64, 1 channel, strided; mini-ImageNet: 32, 3 channels, max-pooled)."""

    def __init__(
        self, hidden: int = 64, channels: int = 1, max_pool: bool = False, layers: int = 4, max_pool_factor: float = 1.0
    ) -> None:
        _check_size("hidden", hidden)
        _check_size("layers", layers)
        super().__init__(
            *(
                ConvBlock(channels if i == 0 else hidden, hidden, (3, 3), max_pool=max_pool, max_pool_factor=max_pool_factor)
                for i in range(layers)
            )
        )


class OmniglotFC(nn.Module):
    """Returns class logits of flattened images: Santoro et al. (2016)'s MLP, :class:`LinearBlock` layers of ``sizes`` (default 256-128-64-64)."""

    def __init__(self, input_size: int, output_size: int, sizes: Sequence[int] | None = None) -> None:
        super().__init__()
        sizes = list(sizes) if sizes is not None else [256, 128, 64, 64]
        if not sizes:
            raise ValueError("sizes=[] must list at least one hidden layer size, e.g. [256, 128, 64, 64]")
        _check_size("output_size", output_size)
        layers = [LinearBlock(fan_in, fan_out) for fan_in, fan_out in zip([input_size, *sizes[:-1]], sizes)]
        self.features = nn.Sequential(nn.Flatten(), nn.Sequential(*layers))
        self.classifier = fc_init_(nn.Linear(sizes[-1], output_size))
        self.input_size = input_size

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _View(nn.Module):
    """Returns ``x`` reshaped to ``(-1, *shape)``."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, *self.shape)


class _SpatialMean(nn.Module):
    """Returns the mean of feature maps ``(n, c, h, w)`` over ``h, w``: ``(n, c)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class OmniglotCNN(nn.Module):
    """Returns class logits of 28x28 images (any shape that views as ``(-1, 1, 28, 28)``): Finn et al. (2017)'s Omniglot conv net.

    ``layers`` strided :class:`ConvBlock` of ``hidden_size`` filters, averaged over space, then a
    linear classifier with standard-normal weights. ``base`` is the conv trunk (also ``features[1]``).
    """

    def __init__(self, output_size: int = 5, hidden_size: int = 64, layers: int = 4) -> None:
        super().__init__()
        _check_size("output_size", output_size)
        self.hidden_size = hidden_size
        self.base = ConvBase(hidden=hidden_size, channels=1, max_pool=False, layers=layers)
        self.features = nn.Sequential(_View(1, 28, 28), self.base, _SpatialMean(), nn.Flatten())
        self.classifier = nn.Linear(hidden_size, output_size, bias=True)
        nn.init.normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CNN4Backbone(ConvBase):
    """Returns flattened features ``(n, hidden_size * s * s)`` of images: ``layers`` max-pooled :class:`ConvBlock` (84x84 -> 5x5 with 4 layers).

    ``max_pool_factor`` defaults to ``4 // layers``, so fewer layers pool more.
    """

    def __init__(
        self,
        hidden_size: int = 64,
        layers: int = 4,
        channels: int = 3,
        max_pool: bool = True,
        max_pool_factor: float | None = None,
    ) -> None:
        _check_size("layers", layers)
        super().__init__(
            hidden=hidden_size,
            layers=layers,
            channels=channels,
            max_pool=max_pool,
            max_pool_factor=max_pool_factor if max_pool_factor is not None else 4 // layers,
        )

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).flatten(1)


class CNN4(nn.Module):
    """Returns class logits of ``(n, channels, 84, 84)`` images: Ravi & Larochelle (2017)'s 4-layer conv net (``MiniImagenetCNN``).

    ``embedding_size`` is the backbone's output size: by default ``25 * hidden_size``, for 84x84
    inputs (5x5 maps), or, given ``image_size`` S (a metaloop addition, for configs), the size for
    S x S inputs with four layers, ``hidden_size * (S // 16) ** 2`` (CIFAR-FS's 32x32: ``4 * hidden_size``).
    """

    def __init__(
        self,
        output_size: int,
        hidden_size: int = 64,
        layers: int = 4,
        channels: int = 3,
        max_pool: bool = True,
        embedding_size: int | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_size("output_size", output_size)
        _check_size("layers", layers)
        if image_size is not None:
            width = conv4_features(hidden_size, image_size, "mini-ImageNet: 84")
            embedding_size = width if embedding_size is None else embedding_size
        self.features = CNN4Backbone(
            hidden_size=hidden_size, channels=channels, max_pool=max_pool, layers=layers, max_pool_factor=4 // layers
        )
        self.classifier = maml_init_(nn.Linear(embedding_size or 25 * hidden_size, output_size, bias=True))
        self.hidden_size = hidden_size

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


MiniImagenetCNN = CNN4


class DropBlock(nn.Module):
    """Returns ``x`` with random ``block_size`` x ``block_size`` squares zeroed in training (Ghiasi et al. 2018), rescaled to keep the mean.

    Square corners are drawn per channel with probability ``gamma`` on the positions where a whole
    square fits; the kept activations are scaled by ``numel / kept``. Identity in evaluation.
    """

    def __init__(self, block_size: int) -> None:
        super().__init__()
        _check_size("block_size", block_size)
        self.block_size = block_size

    def forward(self, x: Tensor, gamma: float, block_size: int | None = None) -> Tensor:
        """``block_size`` overrides the module's square size for this call."""
        if not self.training:
            return x
        size = block_size or self.block_size
        n, c, h, w = x.shape
        corners = torch.bernoulli(torch.full((n, c, h - size + 1, w - size + 1), gamma, device=x.device, dtype=x.dtype))
        # a corner at (i, j) zeroes rows i..i+size-1 and columns j..j+size-1: position p is dropped if a corner lies in p-size+1..p
        dropped = F.max_pool2d(F.pad(corners, (size - 1,) * 4), size, stride=1)
        keep = 1.0 - dropped
        return keep * x * (keep.numel() / keep.sum().clamp_min(1.0))


class _ResidualBlock(nn.Module):
    """One ResNet-12 stage: three 3x3 conv-BN layers (LeakyReLU 0.1), a 1x1 shortcut, max-pooling by ``stride``, then dropout or DropBlock."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        drop_rate: float = 0.0,
        drop_block: bool = False,
        block_size: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.maxpool = nn.MaxPool2d(stride)
        self.downsample = downsample
        self.stride = stride
        self.drop_rate = drop_rate
        self.drop_block = drop_block
        self.block_size = block_size
        self.DropBlock = DropBlock(block_size)
        self.num_batches_tracked = 0  # a Python counter, not a buffer: it sets DropBlock's warm-up, as in Lee et al.'s code

    def forward(self, x: Tensor) -> Tensor:
        self.num_batches_tracked += 1
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.maxpool(self.relu(out + (self.downsample(x) if self.downsample is not None else x)))
        if self.drop_rate <= 0:
            return out
        if not self.drop_block:
            return F.dropout(out, p=self.drop_rate, training=self.training)
        # the drop rate ramps up linearly over 40,000 forward passes; gamma makes the dropped fraction 1 - keep_rate.
        # Squares larger than the feature map (inputs under 84x84) shrink to it, where the original code divides by zero.
        keep_rate = max(1.0 - self.drop_rate / 40000 * self.num_batches_tracked, 1.0 - self.drop_rate)
        size = out.shape[2]
        block = min(self.block_size, size)
        gamma = (1 - keep_rate) / block**2 * size**2 / (size - block + 1) ** 2
        return self.DropBlock(out, gamma=gamma, block_size=block)


class ResNet12Backbone(nn.Module):
    """Returns features of ``(n, channels, 84, 84)`` images: ResNet-12, four residual stages each halving the resolution.

    Args:
        avg_pool: average the final 5x5 maps (640 features with ``wider``); ``False`` keeps them
            (16,000 features, Lee et al. 2019).
        wider: 64-160-320-640 filters (MetaOptNet); ``False``: 64-128-256-512 (TADAM).
        embedding_dropout: dropout on the flattened features.
        dropblock_dropout: dropout rate of the stages (dropout in the first two, DropBlock in the last two).
        dropblock_size: DropBlock's square size.
    """

    def __init__(
        self,
        avg_pool: bool = True,
        wider: bool = True,
        embedding_dropout: float = 0.0,
        dropblock_dropout: float = 0.1,
        dropblock_size: int = 5,
        channels: int = 3,
    ) -> None:
        super().__init__()
        filters = [64, 160, 320, 640] if wider else [64, 128, 256, 512]
        stages = []
        inplanes = channels
        for i, planes in enumerate(filters):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=1, bias=False), nn.BatchNorm2d(planes))
            block = _ResidualBlock(
                inplanes, planes, 2, downsample, dropblock_dropout, drop_block=i >= 2, block_size=dropblock_size if i >= 2 else 1
            )
            stages.append(nn.Sequential(block))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool: nn.Module = nn.AvgPool2d(5, stride=1) if avg_pool else nn.Identity()
        self.flatten = nn.Flatten()
        self.embedding_dropout = embedding_dropout
        self.keep_avg_pool = avg_pool
        self.dropout = nn.Dropout(p=embedding_dropout)
        self.dropblock_dropout = dropblock_dropout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.dropout(self.flatten(self.avgpool(x)))


class ResNet12(nn.Module):
    """Returns class logits of 84x84 images: :class:`ResNet12Backbone` then a linear classifier on ``hidden_size`` features.

    ``hidden_size`` is 640 with the default backbone; 16000 with ``avg_pool=False`` (Lee et al. 2019),
    512 with ``wider=False``.
    """

    def __init__(
        self,
        output_size: int,
        hidden_size: int = 640,
        avg_pool: bool = True,
        wider: bool = True,
        embedding_dropout: float = 0.0,
        dropblock_dropout: float = 0.1,
        dropblock_size: int = 5,
        channels: int = 3,
    ) -> None:
        super().__init__()
        _check_size("output_size", output_size)
        self.features = ResNet12Backbone(avg_pool, wider, embedding_dropout, dropblock_dropout, dropblock_size, channels)
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _WideBlock(nn.Module):
    """One pre-activation wide residual block: BN-ReLU-conv3x3, dropout, BN-ReLU-conv3x3 (stride), plus a 1x1 shortcut when shapes change."""

    def __init__(self, in_planes: int, planes: int, dropout_rate: float, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        return self.conv2(F.relu(self.bn2(out))) + self.shortcut(x)


class WRN28Backbone(nn.Module):
    """Returns 640 features of images (84x84 in the papers; any size works): the wide ResNet WRN-28-10, averaged over space.

    Three stages of four :class:`_WideBlock` with 160, 320 and 640 filters (strides 1, 2, 2) after a
    16-filter stem; ``dropout`` inside each block.
    """

    def __init__(self, dropout: float = 0.0, depth: int = 28, widen_factor: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth={depth} must be 6n + 4 for a wide ResNet (e.g. 28, 16, 40)")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=True)
        self.layer1 = self._stage(widths[1], blocks, dropout, 1)
        self.layer2 = self._stage(widths[2], blocks, dropout, 2)
        self.layer3 = self._stage(widths[3], blocks, dropout, 2)
        self.bn1 = nn.BatchNorm2d(widths[3], momentum=0.9)

    def _stage(self, planes: int, blocks: int, dropout: float, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(_WideBlock(self.in_planes, planes, dropout, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1)


class WRN28(nn.Module):
    """Returns class logits of images: :class:`WRN28Backbone` then a linear classifier on its ``hidden_size`` = 640 features."""

    def __init__(self, output_size: int, hidden_size: int = 640, dropout: float = 0.0) -> None:
        super().__init__()
        _check_size("output_size", output_size)
        self.features = WRN28Backbone(dropout=dropout)
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
