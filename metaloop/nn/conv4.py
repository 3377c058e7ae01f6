"""The 4-block conv net of few-shot image classification (Finn et al. 2017), in one place: its block, trunk and classifier.

A conv-4 is four blocks of [3x3 convolution, normalisation, ReLU, 2x downsampling], flattened, then a
linear layer. :func:`conv_block` builds one block and every conv-4 of metaloop is made of it:

- :class:`Conv4`: the blocks laid out flat in ``features`` (``features.0.weight`` is the first
  convolution), a linear ``head``; BatchNorm on the batch's statistics. ANIL adapts ``"^head\\."``.
- :func:`conv4_backbone`: :class:`Conv4`'s ``features`` alone, the embedding net of ProtoNets/MetaOptNet.
- :class:`PerStepConv4`: the same net with MAML++'s per-step BatchNorm (parameters
  ``blocks.{i}.conv.*``, ``blocks.{i}.norm.*``, ``head.*``), run as ``forward(x, step)``.
- :class:`~metaloop.nn.vision.CNN4` and its relatives: learn2learn's layout of the same blocks
  (``features.{i}.conv``, ``features.{i}.normalize``, ``classifier``), so learn2learn's state dicts load.

Each layout keeps the parameter names its checkpoints were written with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from metaloop.nn.per_step import EvalStats, PerStepBatchNorm2d, Steps

__all__ = ["conv_block", "batch_stats_norm", "Conv4", "conv4_backbone", "PerStepConv4"]

Norm = Callable[[int], nn.Module]  # channels -> a normalisation layer of that many channels


def batch_stats_norm(channels: int) -> nn.Module:
    """Returns BatchNorm that always normalises with the batch's statistics (no running statistics, no buffers), as MAML's code."""
    return nn.BatchNorm2d(channels, track_running_stats=False)


def conv_block(
    in_channels: int,
    out_channels: int,
    norm: Norm = batch_stats_norm,
    downsample: int = 2,
    max_pool: bool = True,
    kernel_size: int | tuple[int, int] = 3,
) -> tuple[nn.Conv2d, nn.Module, nn.ReLU, nn.Module]:
    """Returns one conv-4 block as its four layers ``(conv, norm, relu, pool)``: ``pool(relu(norm(conv(x))))``.

    The convolution is ``kernel_size`` (3x3) with padding 1; ``downsample`` is the factor that divides the resolution, by a
    ``downsample`` x ``downsample`` max-pooling or, without ``max_pool``, by the convolution's stride (``pool``
    is then the identity). The norm layer is made first (an initialisation that draws random numbers, as
    learn2learn's, draws before the convolution's).
    """
    normalize = norm(out_channels)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1 if max_pool else downsample, padding=1)
    pool: nn.Module = nn.MaxPool2d(downsample, downsample) if max_pool else nn.Identity()
    return conv, normalize, nn.ReLU(), pool


def check_classes(out_features: object, network: str, fix: str) -> None:
    """Raises ValueError unless ``out_features`` (a classifier's number of classes) is a positive int; ``fix`` ends the message."""
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features={out_features!r}: {network} is a classifier and needs the number of classes (the task's n_ways); {fix}")


def conv4_features(hidden: int, image_size: int, example: str = "Omniglot: 28") -> int:
    """Returns the number of flattened features four 2x poolings leave of ``image_size`` x ``image_size`` maps: ``hidden * (image_size // 16)^2``.

    Raises:
        ValueError: ``image_size < 16``.
    """
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small for four 2x2 poolings; use at least 16 ({example})")
    return hidden * (image_size // 16) ** 2


def conv4_backbone(in_channels: int = 1, hidden: int = 64, image_size: int = 28, norm: Norm = batch_stats_norm) -> nn.Sequential:
    """Returns :class:`Conv4`'s trunk without its linear head: flattened ``hidden * (image_size // 16)^2`` features.

    The four blocks' layers laid out flat, then ``Flatten``: the embedding network of Prototypical Networks
    (Snell et al. 2017: 64 features for 28x28 Omniglot) and of MetaOptNet's Omniglot/CIFAR experiments
    (Lee et al. 2019).

    >>> import torch
    >>> conv4_backbone()(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 64])
    """
    conv4_features(hidden, image_size)
    layers = [layer for i in range(4) for layer in conv_block(in_channels if i == 0 else hidden, hidden, norm)]
    return nn.Sequential(*layers, nn.Flatten())


class Conv4(nn.Module):
    """Returns class logits ``(n, out_features)`` of images ``(n, in_channels, S, S)``: Finn et al. (2017)'s conv net.

    Four :func:`conv_block` of ``hidden`` filters (``features``, see :func:`conv4_backbone`), then a linear
    ``head`` on the flattened features (``hidden * (S // 16)^2`` of them: 64 for 28x28 Omniglot;
    25 * hidden for 84x84 MiniImagenet, where the paper used ``hidden=32``). BatchNorm uses the
    statistics of the batch it sees, in training and evaluation alike (``track_running_stats=False``),
    as in the paper's code: a task's support and query sets are normalised by their own statistics,
    and the model has no buffers.
    """

    def __init__(self, out_features: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        check_classes(out_features, "Conv4", "pick a classification task (task=omniglot) or, for regression, a regression model (model=mlp)")
        self.features = conv4_backbone(in_channels, hidden, image_size)
        self.head = nn.Linear(conv4_features(hidden, image_size), out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class PerStepConv4(nn.Module):
    """Returns class logits ``(n, out_features)`` of images ``(n, in_channels, S, S)`` after ``step`` inner updates.

    MAML++'s network (Antoniou et al. 2019): :class:`Conv4` with :class:`~metaloop.nn.PerStepBatchNorm2d`
    for BatchNorm (``per_step_weights``: BNWB, ``per_step_stats`` and ``eval_stats``: BNRS; both False
    is Conv4's batch-statistics BatchNorm). ``forward(x, step)`` takes the number of inner updates the
    weights have had; :class:`~metaloop.lightning.MAMLPlusPlus` passes it. Parameters are named
    ``blocks.{i}.conv.*``, ``blocks.{i}.norm.*`` and ``head.*``.

    Raises:
        ValueError: as :class:`Conv4` and :class:`~metaloop.nn.PerStepBatchNorm2d`.
    """

    def __init__(
        self,
        out_features: int,
        steps: Steps,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        per_step_weights: bool = True,
        per_step_stats: bool = True,
        eval_stats: EvalStats = "running",
    ) -> None:
        super().__init__()
        check_classes(out_features, "PerStepConv4", "pick a classification task (task=omniglot)")
        width = conv4_features(hidden, image_size)

        def norm(channels: int) -> nn.Module:
            return PerStepBatchNorm2d(channels, steps, per_step_weights, per_step_stats, eval_stats)

        # Conv4's blocks; ReLU and pooling hold no parameters and run as functions in forward
        blocks = (conv_block(in_channels if i == 0 else hidden, hidden, norm)[:2] for i in range(4))
        self.blocks = nn.ModuleList(nn.ModuleDict({"conv": conv, "norm": normalize}) for conv, normalize in blocks)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        for block in self.blocks:
            x = F.max_pool2d(F.relu(block["norm"](block["conv"](x), step)), 2)
        return self.head(x.flatten(1))
