"""CAVIA's networks (Zintgraf et al. 2019): per-task context parameters read as extra inputs or through FiLM.

The context is a parameter named ``context`` that does not require grad and stays zero in the model:
:class:`~metaloop.lightning.CaviaModule` adapts a fresh copy of it per task, starting from zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metaloop.nn.conv4 import Conv4
from metaloop.nn.mlp import MLP

__all__ = ["ContextMLP", "FiLMConv4"]


def _context_parameter(size: int) -> nn.Parameter:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"context_size={size!r} must be a positive whole number (CAVIA: 4 for sinusoids, 100 for images)")
    # not meta-learned (no outer gradient, no outer optimizer update): a placeholder for each task's context
    return nn.Parameter(torch.zeros(size), requires_grad=False)


class ContextMLP(MLP):
    """Returns ``MLP([x, context])``: a ReLU MLP whose first layer also reads the context vector (CAVIA's regression net).

    ``sizes`` are the layer sizes without the context: ``[1, 40, 40, 1]`` with ``context_size=4``
    builds a 5-40-40-1 MLP (Zintgraf et al. 2019, section 5.1). ``context`` is a parameter that
    does not require grad and stays zero; :class:`~metaloop.lightning.CaviaModule` adapts a fresh copy per task.
    """

    def __init__(self, sizes: Sequence[int] = (1, 40, 40, 1), context_size: int = 4) -> None:
        if len(sizes) < 2:
            raise ValueError(f"sizes={list(sizes)} needs at least an input and an output size, e.g. [1, 40, 40, 1]")
        super().__init__([sizes[0] + context_size, *sizes[1:]])
        self.context = _context_parameter(context_size)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(torch.cat([x, self.context.expand(*x.shape[:-1], -1).to(x.dtype)], dim=-1))


class FiLMConv4(Conv4):
    """Returns class logits of :class:`~metaloop.nn.Conv4` with block ``film_block``'s feature maps modulated by the context (FiLM).

    After that block's BatchNorm, each channel ``c`` becomes ``(1 + gamma_c) * h_c + beta_c`` with
    ``(gamma, beta) = film(context)``, a linear map of the ``context_size`` context parameters
    (Zintgraf et al. 2019, section 5.3: FiLM at the third of four conv layers, 100 context
    parameters; Perez et al. 2018). The ``1 +`` and a zero-initialised ``film`` bias make FiLM the
    identity at the zero context, so training starts from the plain Conv4 (the authors' code
    uses ``gamma`` itself, with PyTorch's random bias initialisation).
    """

    def __init__(
        self,
        out_features: int,
        context_size: int = 100,
        film_block: int = 3,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
    ) -> None:
        super().__init__(out_features, in_channels=in_channels, hidden=hidden, image_size=image_size)
        if film_block not in (1, 2, 3, 4):
            raise ValueError(f"film_block={film_block!r} is not a block of Conv4; use 1, 2, 3 or 4 (CAVIA: 3)")
        self.context = _context_parameter(context_size)
        self.film = nn.Linear(context_size, 2 * hidden)
        nn.init.zeros_(self.film.bias)
        self.film_block = film_block

    def forward(self, x: Tensor) -> Tensor:
        after_norm = 4 * (self.film_block - 1) + 2  # each block: conv, BatchNorm, ReLU, max-pool
        h = self.features[:after_norm](x)
        gamma, beta = self.film(self.context.to(h.dtype)).chunk(2)
        h = h * (1 + gamma).view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        return self.head(self.features[after_norm:](h))
