"""Reptile (Nichol, Achiam & Schulman 2018): meta-learning by moving the initial weights towards each task's adapted ones.

:class:`ReptileModule` adapts a copy of the initial weights ``theta`` to each task of a
meta-batch with ``inner_steps`` steps of the inner optimizer on the task's support set, without
a graph through the inner loop, and then moves ``theta`` towards the mean of the adapted
weights ``phi_i``: the meta-gradient is ``theta - mean_i(phi_i)`` and no query loss is
back-propagated. Outer SGD with learning rate ``eps`` makes the step the paper's interpolation
``theta <- theta + eps * mean_i(phi_i - theta)``; the recipes anneal ``eps`` linearly from 1 to 0
(``scheduler=linear``). Validation, test, checkpoints and logged metrics are those of
:class:`~metaloop.lightning.MetaLightningModule`.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import torch
from torch import Tensor

from metaloop.algorithms.base import Batch
from metaloop.algorithms.maml import MetaLightningModule
from metaloop.tasks import Task
from metaloop.typed import AtLeast, Hint, check_arguments

__all__ = ["ReptileModule", "mini_batches"]


class ReptileModule(MetaLightningModule):
    """A LightningModule that meta-learns ``model``'s initial weights with Reptile (first-order, no query backward).

    Each training step adapts the weights that ``adapt_params`` selects to every task's support
    set (with ``train_on_query``, support and query sets) with ``inner_steps`` steps of
    ``inner_optim`` (a fresh optimizer state per task; the paper: Adam with lr 1e-3 and
    ``betas=(0, 0.999)``), each step on a mini-batch of ``inner_batch`` examples or on all of
    them, then adds the Reptile gradient
    ``theta - mean_i(phi_i)`` to each adapted parameter's ``.grad`` and steps ``outer_optim``.
    With ``outer_optim=SGD(lr=eps)`` the step is ``theta + eps * mean_i(phi_i - theta)``; a
    scheduler on the outer optimizer anneals ``eps`` (Nichol et al.: linearly from 1 to 0 over
    training). Without ``train_on_query`` the query set of a training task is only scored
    (``train/loss``, ``train/acc`` after adaptation) and no gradient flows from it. Under DDP the Reptile gradient is all-reduced
    like any gradient: it is the gradient of ``sum_i ||theta - phi_i||^2 / (2 tasks)``.

    Takes :class:`~metaloop.algorithms.MetaLightningModule`'s arguments (``inner.first_order`` is moot: no
    graph goes through the inner loop) and its own:

    Args:
        inner_batch: examples per inner step in training: mini-batches drawn without replacement
            from the task's examples, reshuffled when they run out (Nichol et al. 2018: 10); one
            draw per meta-step, shared by its tasks, seeded by the step. None: every example at
            every step. Evaluation adapts on the whole support set (the paper's test protocol).
        train_on_query: in training, fit the support and query sets together. Nichol et al. train
            on 10 examples per class and test on 1: with ``task.k_shots=1`` and ``task.k_queries=9``
            this gives the training tasks their 10 shots. The logged training metrics are then
            on examples the inner loop has fitted.

    Raises:
        ValueError: as :class:`~metaloop.algorithms.MetaLightningModule` does, and for learned inner
            hyperparameters, a ``meta_grad`` other than ``"unrolled"`` or an inner optimizer with
            learned transforms (a :class:`~metaloop.transforms.TransformOptimizer`): Reptile's
            meta-gradient reaches the initial weights only, so those would never train.
    """

    def __init__(
        self,
        *args: Any,
        inner_batch: Annotated[int | None, AtLeast(1), Hint("examples per inner step in training")] = None,
        train_on_query: bool = False,
        **kwargs: Any,
    ) -> None:
        check_arguments(ReptileModule.__init__, inner_batch=inner_batch, train_on_query=train_on_query)
        super().__init__(*args, **kwargs)
        # every learner takes the inner options and learnable: refuse what Reptile cannot honour
        if self._learnable:
            raise ValueError(
                f"learnable={sorted(self._learnable)!r}: Reptile's meta-gradient reaches only the initial weights, so "
                "learned inner hyperparameters would never train; use learnable=none"
            )
        if self.inner.meta_grad != "unrolled":
            raise ValueError(
                f"meta_grad={self.inner.meta_grad!r}: Reptile's meta-gradient is theta - mean(phi), with no graph "
                "through the inner loop; use inner.meta_grad=unrolled (the default)"
            )
        if len(self.inner_modules):
            raise ValueError(
                f"Reptile's meta-gradient reaches only the initial weights, so the inner optimizer's learned "
                f"{', '.join(self.inner_modules)} would never train; use a torch.optim inner optimizer (inner_optim=adam)"
            )
        self.save_hyperparameters("inner_batch", "train_on_query")
        self.inner_batch, self.train_on_query = inner_batch, train_on_query

    def support_at(self, support: Any, step: int) -> Batch:
        """Returns the examples of inner step ``step``: ``(x, y)``, or, in training with ``inner_batch``, the mini-batch
        that row ``step`` of ``batches`` indexes in ``support = (x, y, batches)``."""
        if len(support) == 3:
            x, y, batches = support
            return x[batches[step]], y[batches[step]]
        return support

    def _adapted_weights(
        self, batches: Tensor | None, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *,
        batched: bool,
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """Returns one task's adapted weights ``phi`` (the adapted parameters only), query loss and query metrics, detached.

        ``batches``: the indices of each inner step's mini-batch (:func:`mini_batches`), or None for all examples.
        """
        x, y = (torch.cat([support_x, query_x]), torch.cat([support_y, query_y])) if self.train_on_query else (support_x, support_y)
        support = (x, y) if batches is None else (x, y, batches)
        fmodel = self.adapt(support, self.inner.steps, batched=batched)
        with torch.no_grad():
            metrics = self.task_metrics(fmodel, (query_x, query_y))
        return {n: fmodel.weights[n] for n in self.adapted_names}, metrics["loss"], metrics

    def meta_gradient(self, batch: Task) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the meta-batch's mean query loss and metrics after adaptation (detached), after adding the
        Reptile gradient ``theta - mean_i(phi_i)`` to the ``.grad`` of the adapted parameters.

        The gradient comes from a backward of ``sum_i ||theta - phi_i||^2 / (2 tasks)`` with ``phi_i``
        detached (one backward per chunk of tasks, as :meth:`~metaloop.algorithms.MetaLightningModule.meta_gradient`), so
        Lightning's precision plugins and DDP's all-reduce see an ordinary backward.
        """
        tasks = batch.support_x.shape[0]
        params = dict(self.model.named_parameters())
        batches = None
        if self.inner_batch is not None:
            # drawn outside vmap (no random operations under it), the same for every task, and seeded by the step
            # so that a resumed run draws what an uninterrupted one would
            examples = batch.support_x.shape[1] + (batch.query_x.shape[1] if self.train_on_query else 0)
            generator = torch.Generator().manual_seed(self.global_step)
            batches = mini_batches(examples, self.inner_batch, self.inner.steps, generator).to(batch.support_x.device)
        losses, per_chunk = [], []
        for last, (phi, chunk_losses, chunk_metrics) in self.over_tasks(functools.partial(self._adapted_weights, batches), batch):
            distance = sum(((params[n] - w) ** 2).sum() for n, w in phi.items())
            self.meta_backward(distance / (2 * tasks), sync=last)
            losses.append(chunk_losses)
            per_chunk.append(chunk_metrics)
        metrics = {k: torch.cat([m[k] for m in per_chunk]).mean() for k in per_chunk[0]}
        return torch.cat(losses).mean(), metrics


def mini_batches(examples: int, size: int, steps: int, generator: torch.Generator) -> Tensor:
    """Returns ``(steps, size)`` example indices: consecutive mini-batches of shuffled passes over ``examples`` examples.

    Each pass is a fresh permutation and a mini-batch may span two passes, as in Nichol et al.'s
    code; a mini-batch larger than the data repeats examples.
    """
    passes = -(-size * steps // examples)
    order = torch.cat([torch.randperm(examples, generator=generator) for _ in range(passes)])
    return order[: size * steps].view(steps, size)
