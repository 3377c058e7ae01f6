"""Meta-learning an embedding for a few-shot head fitted on each task's support set: Prototypical Networks, MetaOptNet.

Metric-based meta-learners have no inner optimisation of the network: an embedding network
(the backbone) maps a task's support and query images to vectors, a head
(:class:`metaloop.nn.PrototypicalClassifier`, :class:`metaloop.nn.SVClassifier`) is fitted
on the support embeddings in closed form or by a differentiable solver, and the query loss
trains the backbone through the head. :func:`head_logits` is that step, shared with
learn2learn's ``LightningPrototypicalNetworks`` and ``LightningMetaOptNet``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from metaloop.algorithms.base import Batch, MetaLearner, Predictor
from metaloop.algorithms.objectives import Classification
from metaloop.tasks import Task

__all__ = ["FewShotHead", "head_logits", "PrototypicalModule"]



class FewShotHead(Protocol):
    """A classifier fitted on support embeddings: ``fit_(support, labels)``, then ``head(query) -> logits``."""

    def fit_(self, support: Tensor, labels: Tensor) -> Any: ...

    def __call__(self, query: Tensor) -> Tensor: ...


def head_logits(backbone: Callable[[Tensor], Tensor], head: FewShotHead, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
    """Returns the head's logits for ``query_x`` after fitting it on the embedded support set, shape ``(n_query, n_ways)``.

    Support and query pass through ``backbone`` together (one forward; batch statistics, if
    any, cover the whole task, as in Snell et al.'s code). The head is fitted and applied in
    float32 with autocast off: under ``bf16-mixed`` the backbone runs in bfloat16, but the
    prototypes' distances and the SVM's dual solver (the inner problem) keep float32 arithmetic.
    """
    embeddings = backbone(torch.cat([support_x, query_x]))
    with torch.autocast(embeddings.device.type, enabled=False):
        embeddings = embeddings.float()
        support, query = embeddings[: support_x.size(0)], embeddings[support_x.size(0) :]
        head.fit_(support, support_y)
        return head(query)


class PrototypicalModule(MetaLearner):
    """A learner that meta-learns an embedding ``model`` for a few-shot ``head`` (Prototypical Networks, MetaOptNet).

    Each training step fits ``head`` on each task's embedded support set and adds the gradient of the mean
    query cross-entropy (:func:`head_logits`). Validation and test log ``{stage}/acc_post`` and
    ``{stage}/loss_post`` (the head fitted on the support set is this learner's adaptation) with their 95%
    confidence half-widths. :meth:`adapt` returns the head fitted on a task's support set, for any number of ways.

    Args:
        model: the embedding network (images to vectors), e.g. :func:`metaloop.nn.conv4_backbone`.
        head: ``PrototypicalClassifier()`` or ``SVClassifier(C_reg=0.1, max_iters=15)``.
        outer_optim: an optimizer partial, called on the model's parameters.
        kwargs: :class:`~metaloop.algorithms.MetaLearner`'s (``scheduler``, ``memory_format``).
    """

    #: evaluation scores the query sets with the head fitted on the support set: ``val/acc_post`` (there is no "pre")
    evaluation_phases: tuple[str, ...] = ("post",)

    def __init__(self, model: nn.Module, head: FewShotHead, outer_optim: Callable[..., torch.optim.Optimizer], **kwargs: Any) -> None:
        if not callable(getattr(head, "fit_", None)):
            raise TypeError(
                f"head {type(head).__name__} has no fit_(support, labels); use metaloop.nn.PrototypicalClassifier "
                "or metaloop.nn.SVClassifier"
            )
        super().__init__(model, Classification(), outer_optim, **kwargs)
        self.head = head

    @property
    def backbone(self) -> nn.Module:
        """The embedding network (``model``; its name before 0.4)."""
        return self.model

    def adapt(self, support: Batch, steps: int | None = None, *, n_ways: int | None = None) -> Predictor:
        """Returns ``f(x) -> logits``: the head fitted on the embedded support set ``(x, y)``, for its classes.

        Support and query are embedded together at each call, as in training (batch statistics cover the
        task). ``steps`` is unused (the head is fitted in closed form or by its solver); ``n_ways`` only
        checks the number of classes of the support set.

        Raises:
            ValueError: if ``n_ways`` differs from the number of classes in the support set.
        """
        x, y = support
        if n_ways is not None and n_ways != self.objective.output_size(y):
            raise ValueError(f"n_ways={n_ways} differs from the {self.objective.output_size(y)} classes of the support set")
        return functools.partial(head_logits, self.model, self.head, x, y)

    def task_metrics(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> dict[str, Tensor]:
        """Returns one task's query metrics (``loss``, ``acc``) with the head fitted on its support set."""
        return self.objective.metrics(head_logits(self.model, self.head, support_x, support_y, query_x), query_y)

    def meta_gradient(self, batch: Task) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the meta-batch's mean query loss and metrics, detached, after adding the gradient of the mean loss."""
        tasks = batch.support_x.shape[0]
        per_task = []
        for last, metrics in self.over_tasks(lambda *task, batched: self.task_metrics(*task), batch):
            self.meta_backward(metrics["loss"].sum() / tasks, sync=last)
            per_task.append({k: v.detach() for k, v in metrics.items()})
        mean = {k: torch.cat([m[k] for m in per_task]).mean() for k in per_task[0]}
        return mean.pop("loss"), mean

    def evaluate_task(
        self, n_ways: int | None, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *, batched: bool
    ) -> dict[str, dict[str, Tensor]]:
        """Returns one task's query metrics with the head fitted on its support set (phase ``"post"``)."""
        return {"post": self.task_metrics(support_x, support_y, query_x, query_y)}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Loads a state dict, also one saved before 0.4 (the embedding under ``backbone.`` instead of ``model.``)."""
        renamed = {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in state_dict.items()}
        return super().load_state_dict(renamed, strict=strict, assign=assign)
