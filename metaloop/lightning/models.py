"""The networks of the MAML papers: the 4-block conv net for few-shot image classification and the sinusoid MLP.

Both are a ``features`` trunk and a linear ``head``, so ANIL's "adapt the head only" is
``adapt_params="^head\\."`` for either.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["Conv4", "MLP"]


class Conv4(nn.Module):
    """Returns class logits ``(n, out_features)`` of images ``(n, in_channels, S, S)``: Finn et al. (2017)'s conv net.

    Four blocks of [3x3 convolution with ``hidden`` filters, BatchNorm, ReLU, 2x2 max-pooling],
    then a linear head on the flattened features (``hidden * (S // 16)^2`` of them: 64 for 28x28
    Omniglot; 25 * hidden for 84x84 MiniImagenet, where the paper used ``hidden=32``).
    BatchNorm uses the statistics of the batch it sees, in training and evaluation alike
    (``track_running_stats=False``), as in the paper's code: a task's support and query sets are
    normalised by their own statistics, and the model has no buffers.
    """

    def __init__(self, out_features: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        if not isinstance(out_features, int) or out_features < 1:
            raise ValueError(
                f"out_features={out_features!r}: Conv4 is a classifier and needs the number of classes (the task's "
                "n_ways); pick a classification task (task=omniglot) or, for regression, a regression model (model=mlp)"
            )
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small for four 2x2 poolings; use at least 16 (Omniglot: 28)")
        blocks: list[nn.Module] = []
        for i in range(4):
            blocks += [
                nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(hidden * (image_size // 16) ** 2, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Returns ``head(relu(... relu(layer_1(x))))``: a ReLU MLP with layer sizes ``sizes`` (sinusoid: 1-40-40-1)."""

    def __init__(self, sizes: Sequence[int] = (1, 40, 40, 1)) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes={list(sizes)} needs at least an input and an output size, e.g. [1, 40, 40, 1]")
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-2], sizes[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
