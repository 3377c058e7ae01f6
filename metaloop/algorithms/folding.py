"""``batch_tasks="fold"``: a gradient-based learner's meta-batch adapted with tasks folded into channels.

Each inner step runs the network once for every task (:class:`metaloop.nn.folded.FoldedModel`: the tasks'
weights stacked along a leading dimension, convolutions grouped by task, BatchNorm's statistics per
task) and takes the gradient of the sum of the tasks' support losses, which gives each task's stacked
weights exactly its own gradient, at every order. The learner's loss and metric hooks
(:meth:`~metaloop.algorithms.MetaLightningModule.inner_loss`, ``outer_loss``, ``task_metrics``) still
score each task: they run under :func:`torch.func.vmap` on the folded outputs, where ``fmodel(x)``
answers with the task's outputs for that ``x``. Nothing here is approximate; ``tests/algorithms/test_folding.py``
checks meta-gradients against the task-by-task loop to 1e-10 in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metaloop.optim.loop import inner_trajectory
from metaloop.tasks import Task

if TYPE_CHECKING:
    from metaloop.algorithms.maml import MetaLightningModule

__all__ = [
    "FOLD_HOOKS", "fold_learner_problems", "folded_trajectory", "folded_query_losses", "folded_meta_gradient", "folded_evaluation",
]

#: hooks a learner may not override for its meta-batches to be folded (they see one task's weights or examples)
FOLD_HOOKS = ("model_at", "support_at", "trajectory", "adapt", "task_loss", "meta_gradient", "evaluate_task", "evaluate_tasks")

Batch = tuple[Tensor, Tensor]


class _Outputs:
    """What a loss hook receives as ``fmodel`` under folding: ``fmodel(x)`` gives the outputs computed for ``x``."""

    def __init__(self, outputs: Tensor, x: Tensor) -> None:
        self.outputs, self.x = outputs, x

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if x is not self.x or args or kwargs:
            raise ValueError(
                "with batch_tasks='fold' a loss or metric hook may run fmodel only on the inputs of the batch it is "
                "given; use batch_tasks='vmap' or 'sequential' for a hook that runs the model on other inputs"
            )
        return self.outputs


def per_task(hook: Callable[..., Any], outputs: Tensor, batch: Batch) -> Any:
    """Returns ``hook(fmodel, (x, y))`` of every task, with a leading task dimension, ``fmodel(x)`` giving the task's ``outputs``."""
    return torch.func.vmap(lambda out, x, y: hook(_Outputs(out, x), (x, y)))(outputs, *batch)


def stacked(weights: Mapping[str, Tensor], tasks: int) -> dict[str, Tensor]:
    """Returns every weight repeated for ``tasks`` tasks, ``(tasks, *shape)``, as a view (its gradient sums the tasks')."""
    return {n: w.expand(tasks, *w.shape) for n, w in weights.items()}


def fold_learner_problems(learner: MetaLightningModule, base: type) -> list[str]:
    """Returns why ``learner``'s meta-batches cannot be folded (empty if they can); ``base`` is the class whose hooks fold."""
    from metaloop.nn.folded import fold_problems

    problems = fold_problems(learner.model) if learner.folded is None else []
    overridden = [h for h in FOLD_HOOKS if getattr(type(learner), h) is not getattr(base, h)]
    if overridden:
        problems.append(f"{type(learner).__name__} overrides {', '.join(overridden)}, which see one task at a time")
    if learner.inner.meta_grad == "implicit":
        problems.append("meta_grad='implicit' solves each task's inner problem separately")
    if not learner.rule.elementwise:
        problems.append("its inner rule reads whole tensors (not elementwise: Rule.elementwise is False)")
    if len(learner.inner_modules):
        problems.append("its learned gradient transforms act on one task's tensors")
    return problems


def folded_trajectory(
    learner: MetaLightningModule, support: Batch, steps: int, *, n_ways: int | None = None, create_graph: bool = False,
    functional: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Returns an iterator over the stacked weights of every task after 0, 1, ..., ``steps`` inner steps on ``support``.

    The folded form of :meth:`~metaloop.algorithms.MetaLightningModule.trajectory` (its options: truncation,
    per-step hyperparameters, first order); ``support`` has a leading task dimension. ``functional`` takes the
    inner gradients with :func:`torch.func.grad` (inside a :mod:`torch.func` transform or :func:`torch.compile`).
    """
    tasks = support[0].shape[0]
    params, hparams = learner.initial_weights(n_ways)
    fixed = stacked({n: p for n, p in params.items() if n not in hparams}, tasks)
    start = stacked({n: params[n] for n in hparams}, tasks)

    def support_loss(weights: dict[str, Tensor], step: int) -> Tensor:
        return per_task(learner.inner_loss, learner.folded({**fixed, **weights}, support[0]), support).sum()

    yield {**fixed, **start}
    for weights in inner_trajectory(
        support_loss, start, rule=learner.rule, hparams=[learner.step_hparams(hparams, k) for k in range(steps)],
        steps=steps, first_order=learner.is_first_order(), create_graph=create_graph,
        truncate=learner.inner.truncate if create_graph else None, batched=functional,
    ):
        yield {**fixed, **weights}


def _last(weights: Iterator[dict[str, Tensor]]) -> dict[str, Tensor]:
    for last in weights:
        pass
    return last


def folded_query_losses(learner: MetaLightningModule, batch: Task, functional: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Returns every task's query loss after ``inner.steps`` folded steps (with the graph to the initial weights and learned
    hyperparameters), and every task's query metrics, detached."""
    support = (batch.support_x, batch.support_y)
    adapted = _last(folded_trajectory(learner, support, learner.inner.steps, create_graph=True, functional=functional))
    query = (batch.query_x, batch.query_y)
    outputs = learner.folded(adapted, batch.query_x)
    losses = per_task(learner.outer_loss, outputs, query)
    metrics = per_task(learner.task_metrics, outputs.detach(), query)
    return losses, {k: v.detach() for k, v in metrics.items()}


def folded_meta_gradient(learner: MetaLightningModule, batch: Task) -> tuple[Tensor, dict[str, Tensor]]:
    """Returns the meta-batch's mean query loss and metrics after adding its meta-gradient to ``.grad`` (one backward,
    or the compiled meta-step where the learner has one)."""
    if learner.compiled is not None:
        return learner.compiled(batch)
    losses, metrics = folded_query_losses(learner, batch)
    learner.meta_backward(losses.sum() / losses.shape[0])
    return losses.detach().mean(), {k: v.mean() for k, v in metrics.items()}


def folded_evaluation(learner: MetaLightningModule, n_ways: int | None, batch: Task) -> dict[str, dict[str, Tensor]]:
    """Returns every task's query metrics before (``"pre"``) and after (``"post"``) ``inner.eval_steps`` steps, ``(tasks,)`` each."""
    from metaloop.algorithms.maml import inner_grad_mode

    query = (batch.query_x, batch.query_y)
    with inner_grad_mode(False):
        trajectory = folded_trajectory(learner, (batch.support_x, batch.support_y), learner.inner.eval_steps, n_ways=n_ways)
        initial = next(trajectory)
        with torch.no_grad():
            before = per_task(learner.task_metrics, learner.folded(initial, batch.query_x), query)
        adapted = _last(trajectory) if learner.inner.eval_steps else initial
    with torch.no_grad():
        after = per_task(learner.task_metrics, learner.folded(adapted, batch.query_x), query)
    return {"pre": before, "post": after}
