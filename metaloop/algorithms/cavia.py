"""CAVIA (Zintgraf et al. 2019, "Fast Context Adaptation via Meta-Learning"): adapt only per-task context parameters.

The network's weights are meta-learned by the outer loop only; the inner loop adapts a small
context vector, which starts from zeros for every task and is not meta-learned. The network reads
the context as extra inputs (:class:`~metaloop.nn.ContextMLP`, the paper's regression model) or through a FiLM
layer that scales and shifts a convolutional block's feature maps (:class:`~metaloop.nn.FiLMConv4`, the
paper's image classifier). :class:`CaviaModule` is :class:`~metaloop.algorithms.MetaLightningModule`
with the context parameters as the adapted set, each task's adaptation starting from zeros.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metaloop.algorithms.maml import MetaLightningModule

__all__ = ["CaviaModule", "CONTEXT"]

CONTEXT = r"(^|\.)context$"  # the names of context parameters: `context`, in the model or any submodule


class CaviaModule(MetaLightningModule):
    """A learner that meta-learns a network for CAVIA: the inner loop adapts only per-task context parameters.

    The adapted parameters are the model's context parameters (``inner.params``, by default every
    parameter named ``context``: :class:`~metaloop.nn.ContextMLP`, :class:`~metaloop.nn.FiLMConv4`). Each
    task's adaptation starts them from zeros, whatever the model holds, in training, evaluation and
    :meth:`adapt` (:meth:`initial_weights`): tasks of a meta-batch share no context, and no gradient reaches
    the model's own context tensors (they are not meta-learned). All other weights are meta-learned by the
    outer optimizer through the inner loop (second order unless ``inner.first_order``). Takes
    :class:`~metaloop.algorithms.MetaLightningModule`'s arguments.

    Raises:
        ValueError: as :class:`~metaloop.algorithms.MetaLightningModule` does, and when no parameter is a
            context parameter or the pattern also selects the classifier head (whose trained weights the
            per-task reset would discard).
    """

    default_params = CONTEXT
    params_fix = "use a model with context parameters (model=context_mlp, model=film_conv4)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.head is not None and any(n.startswith(f"{self.head}.") for n in self.adapted_names):
            raise ValueError(
                f"params={self.inner.params!r} selects the head {self.head!r}, but CAVIA starts the adapted parameters "
                "from zeros for every task; select only the context parameters (e.g. '(^|\\.)context$')"
            )

    def initial_weights(self, n_ways: int | None = None) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
        """Returns the weights to adapt from: the model's, with every context parameter a fresh zero tensor."""
        params, hparams = super().initial_weights(n_ways)
        for name in self.adapted_names:
            params[name] = torch.zeros_like(params[name], requires_grad=True)
        return params, hparams
