"""CAVIA (Zintgraf et al. 2019, "Fast Context Adaptation via Meta-Learning"): adapt only per-task context parameters.

The network's weights are meta-learned by the outer loop only; the inner loop adapts a small
context vector, which starts from zeros for every task and is not meta-learned. The network reads
the context as extra inputs (:class:`ContextMLP`, the paper's regression model) or through a FiLM
layer that scales and shifts a convolutional block's feature maps (:class:`FiLMConv4`, the
paper's image classifier). :class:`CaviaModule` is :class:`~metaloop.lightning.MetaLightningModule`
with the context parameters as the adapted set, each task's adaptation starting from zeros.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaloop.lightning.learned import Learned
from metaloop.lightning.models import MLP, Conv4
from metaloop.lightning.module import BatchTasks, MetaGrad, MetaLightningModule, OptimizerFactory, SchedulerFactory
from metaloop.lightning.objectives import Objective
from metaloop.lightning.precision import MemoryFormat
from metaloop.optim.implicit import ImplicitOptions

__all__ = ["CaviaModule", "ContextMLP", "FiLMConv4", "CONTEXT"]

CONTEXT = r"(^|\.)context$"  # the names of context parameters: `context`, in the model or any submodule


def _context_parameter(size: int) -> nn.Parameter:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"context_size={size!r} must be a positive whole number (CAVIA: 4 for sinusoids, 100 for images)")
    # not meta-learned (no outer gradient, no outer optimizer update): a placeholder for each task's context
    return nn.Parameter(torch.zeros(size), requires_grad=False)


class ContextMLP(MLP):
    """Returns ``MLP([x, context])``: a ReLU MLP whose first layer also reads the context vector (CAVIA's regression net).

    ``sizes`` are the layer sizes without the context: ``[1, 40, 40, 1]`` with ``context_size=4``
    builds a 5-40-40-1 MLP (Zintgraf et al. 2019, section 5.1). ``context`` is a parameter that
    does not require grad and stays zero; :class:`CaviaModule` adapts a fresh copy per task.
    """

    def __init__(self, sizes: Sequence[int] = (1, 40, 40, 1), context_size: int = 4) -> None:
        if len(sizes) < 2:
            raise ValueError(f"sizes={list(sizes)} needs at least an input and an output size, e.g. [1, 40, 40, 1]")
        super().__init__([sizes[0] + context_size, *sizes[1:]])
        self.context = _context_parameter(context_size)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(torch.cat([x, self.context.expand(*x.shape[:-1], -1).to(x.dtype)], dim=-1))


class FiLMConv4(Conv4):
    """Returns class logits of :class:`Conv4` with block ``film_block``'s feature maps modulated by the context (FiLM).

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


class CaviaModule(MetaLightningModule):
    """A LightningModule that meta-learns a network for CAVIA: the inner loop adapts only per-task context parameters.

    The adapted parameters are the model's context parameters (``adapt_params``, by default
    every parameter named ``context``: :class:`ContextMLP`, :class:`FiLMConv4`). Each task's
    adaptation starts them from zeros, whatever the model holds, in training, evaluation and
    :meth:`adapt`: tasks of a meta-batch share no context, and no gradient reaches the model's
    own context tensors (they are not meta-learned). All other weights are meta-learned by the
    outer optimizer through the inner loop (second order unless ``first_order``). Training,
    evaluation, logged metrics and checkpoints are those of :class:`MetaLightningModule`.

    The arguments not listed here are as for :class:`~metaloop.lightning.MetaLightningModule`.

    Args:
        adapt_params: a regular expression of the context parameters' names (None: :data:`CONTEXT`).
        head: the classifier's name; None: the model's ``head`` if it is an ``nn.Linear``, else its last one.

    Raises:
        ValueError: as :class:`MetaLightningModule` does, and when no parameter is a context
            parameter or the pattern also selects the classifier head (whose trained weights
            the per-task reset would discard).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_optim: OptimizerFactory,
        outer_optim: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        adapt_params: str | None = None,
        learnable: Mapping[str, Learned] | None = None,
        batch_tasks: BatchTasks = "auto",
        head: str | None = None,
        meta_grad: MetaGrad = "unrolled",
        truncate: int | None = None,
        implicit: ImplicitOptions | Mapping[str, Any] | None = None,
        memory_format: MemoryFormat = "auto",
    ) -> None:
        pattern = CONTEXT if adapt_params is None else adapt_params
        names = [n for n, _ in model.named_parameters()]
        if not any(re.search(pattern, n) for n in names):
            raise ValueError(
                f"CAVIA adapts context parameters, but adapt_params={pattern!r} matches none of the model's parameters "
                f"{names}; use a model with context parameters (model=context_mlp, model=film_conv4)"
            )
        if head is None and isinstance(getattr(model, "head", None), nn.Linear):
            head = "head"  # not the last linear layer: FiLMConv4's film comes after it
        super().__init__(
            model, objective, inner_optim, outer_optim, scheduler, inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps, first_order=first_order, adapt_params=pattern, learnable=learnable,
            batch_tasks=batch_tasks, head=head, meta_grad=meta_grad, truncate=truncate, implicit=implicit,
            memory_format=memory_format,
        )
        if self.head is not None and any(n.startswith(f"{self.head}.") for n in self.adapted_names):
            raise ValueError(
                f"adapt_params={pattern!r} selects the head {self.head!r}, but CAVIA starts the adapted parameters "
                "from zeros for every task; select only the context parameters (e.g. '(^|\\.)context$')"
            )

    def _initial_weights(self, n_ways: int | None) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
        """Returns the weights to adapt from: the model's, with every context parameter a fresh zero tensor."""
        params, hparams = super()._initial_weights(n_ways)
        for name in self.adapted_names:
            params[name] = torch.zeros_like(params[name], requires_grad=True)
        return params, hparams
