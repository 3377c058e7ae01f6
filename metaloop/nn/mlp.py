"""The sinusoid regression net of the MAML papers: a ReLU MLP with a ``features`` trunk and a linear ``head``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Returns ``head(relu(... relu(layer_1(x))))``: a ReLU MLP with layer sizes ``sizes`` (sinusoid: 1-40-40-1).

    The hidden layers are ``features`` and the last linear layer ``head``, as :class:`~metaloop.nn.Conv4`'s,
    so ANIL's "adapt the head only" is ``adapt_params="^head\\."`` for either.
    """

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
