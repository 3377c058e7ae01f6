"""Meta-learning an embedding for a few-shot head fitted on each task's support set: Prototypical Networks, MetaOptNet.

Metric-based meta-learners have no inner optimisation of the network: an embedding network
(the backbone) maps a task's support and query images to vectors, a head
(:class:`metaloop.nn.PrototypicalClassifier`, :class:`metaloop.nn.SVClassifier`) is fitted
on the support embeddings in closed form or by a differentiable solver, and the query loss
trains the backbone through the head. :func:`head_logits` is that step, shared with
learn2learn's ``LightningPrototypicalNetworks`` and ``LightningMetaOptNet``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import lightning
import torch
from torch import Tensor, nn

from metaloop.lightning import Classification, Conv4, MeanWithConfidence, MetaDataModule
from metaloop.lightning.precision import MEMORY_FORMATS, MemoryFormat, check_precision, resolve_memory_format, to_memory_format
from metaloop.tasks import Task, sample_task

__all__ = ["FewShotHead", "head_logits", "conv4_backbone", "PrototypicalModule"]

_STAGE_SPLITS = {"fit": "train", "validate": "val", "test": "test"}


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


def conv4_backbone(in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> nn.Module:
    """Returns :class:`Conv4`'s trunk without its linear head: flattened ``hidden * (image_size // 16)^2`` features.

    The embedding network of Prototypical Networks (Snell et al. 2017: 64 features for 28x28
    Omniglot) and of MetaOptNet's Omniglot/CIFAR experiments (Lee et al. 2019).
    """
    return Conv4(1, in_channels=in_channels, hidden=hidden, image_size=image_size).features


class PrototypicalModule(lightning.LightningModule):
    """A LightningModule that meta-learns ``backbone`` for a few-shot ``head`` (Prototypical Networks, MetaOptNet).

    Each training step takes a meta-batch of :class:`~metaloop.tasks.Task` (leading task
    dimension), fits ``head`` on each task's embedded support set, and minimises the mean
    query cross-entropy (:func:`head_logits`). Validation and test log ``{stage}/acc_post``
    and ``{stage}/loss_post`` (the head fitted on the support set is this learner's
    adaptation) with their 95% confidence half-widths, as :class:`MetaLightningModule` does.

    Args:
        backbone: the embedding network (images to vectors), e.g. :func:`conv4_backbone`.
        head: ``PrototypicalClassifier()`` or ``SVClassifier(C_reg=0.1, max_iters=15)``.
        outer_optim: an optimizer partial, called on the backbone's parameters.
        scheduler: an LR scheduler partial called on the optimizer, stepped every meta-step.
        memory_format: the backbone's and its input images' memory format, as
            :class:`~metaloop.lightning.MetaLightningModule`'s (``"auto"``, ``"channels_last"``,
            ``"contiguous"``), resolved in :meth:`setup` for the Trainer's device and precision.
    """

    #: evaluation scores the query sets with the head fitted on the support set: ``val/acc_post`` (there is no "pre")
    evaluation_phases: tuple[str, ...] = ("post",)

    def __init__(
        self,
        backbone: nn.Module,
        head: FewShotHead,
        outer_optim: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        memory_format: MemoryFormat = "auto",
    ) -> None:
        super().__init__()
        if not callable(getattr(head, "fit_", None)):
            raise TypeError(
                f"head {type(head).__name__} has no fit_(support, labels); use metaloop.nn.PrototypicalClassifier "
                "or metaloop.nn.SVClassifier"
            )
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format={memory_format!r} is not one of {', '.join(repr(m) for m in MEMORY_FORMATS)}")
        self.memory_format = memory_format
        self._input_format = resolve_memory_format(memory_format, backbone, "cpu", "32-true")
        self.backbone = backbone.to(memory_format=self._input_format)
        self.head = head
        self.outer_optim = outer_optim
        self.scheduler = scheduler
        self.objective = Classification()
        self.eval_metrics = nn.ModuleDict(
            {f"{stage}_{name}": MeanWithConfidence() for stage in ("val", "test") for name in self.objective.metric_names}
        )

    def task_metrics(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> dict[str, Tensor]:
        """Returns one task's query metrics (``loss``, ``acc``) with the head fitted on its support set."""
        return self.objective.metrics(head_logits(self.backbone, self.head, support_x, support_y, query_x), query_y)

    def _batch_metrics(self, batch: Task) -> dict[str, Tensor]:
        batch = Task(*(to_memory_format(field, self._input_format) for field in batch))
        per_task = [self.task_metrics(*(field[i] for field in batch)) for i in range(batch.support_x.shape[0])]
        return {k: torch.stack([m[k] for m in per_task]) for k in per_task[0]}

    def training_step(self, batch: Task, batch_idx: int) -> Tensor:
        """Returns the mean query loss of the meta-batch (Lightning steps the optimizer on it)."""
        metrics = {k: v.mean() for k, v in self._batch_metrics(batch).items()}
        self.log_dict({f"train/{k}": v.detach() for k, v in metrics.items()}, prog_bar=True)
        return metrics["loss"]

    def configure_optimizers(self) -> Any:
        optimizer = self.outer_optim(self.parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}

    def _evaluation_step(self, batch: Task, stage: str) -> None:
        for name, values in self._batch_metrics(batch).items():
            self.eval_metrics[f"{stage}_{name}"].update(values)

    def _log_evaluation(self, stage: str) -> None:
        for name in self.objective.metric_names:
            metric = self.eval_metrics[f"{stage}_{name}"]
            if metric.update_count == 0 and self.trainer.world_size == 1:
                continue
            mean, half_width = metric.compute()
            key = f"{stage}/{name}_{self.evaluation_phases[0]}"
            self.log(key, mean.float(), prog_bar=name == "acc", sync_dist=True)
            self.log(f"{key}_ci95", half_width.float(), sync_dist=True)
            metric.reset()

    def validation_step(self, batch: Task, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Task, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def check_task(self, task: Task) -> None:
        """Raises ``ValueError`` if the backbone cannot embed ``task``'s inputs or the head's logits do not fit its labels."""
        with torch.no_grad():
            try:
                logits = head_logits(self.backbone, self.head, task.support_x, task.support_y, task.query_x)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                raise ValueError(
                    f"{type(self.backbone).__name__} cannot embed the task's inputs of shape {tuple(task.support_x.shape)} "
                    f"({str(err).splitlines()[0]}); choose a backbone for this task's inputs"
                ) from err
        self.objective.check(logits, task.query_y)

    def check_datamodule(self, datamodule: lightning.LightningDataModule, stage: str) -> None:
        """Raises ``ValueError`` if the first task of ``stage`` cannot be handled (see :meth:`check_task`)."""
        if not isinstance(datamodule, MetaDataModule) or stage not in _STAGE_SPLITS:
            return
        if (stage == "validate" and not datamodule.num_val_tasks) or (stage == "test" and not datamodule.num_test_tasks):
            return
        self.check_task(sample_task(datamodule.tasks, _STAGE_SPLITS[stage], datamodule.seed, 0))

    def setup(self, stage: str) -> None:
        """Checks the Trainer's precision and the attached data module's tasks against the backbone and head before
        any step runs, and chooses ``memory_format="auto"`` for the Trainer's device and precision.

        Raises:
            ValueError: for a precision the head cannot take (see :func:`~metaloop.lightning.precision.check_precision`).
        """
        check_precision(self.trainer.precision)
        device_type = self.trainer.strategy.root_device.type
        self._input_format = resolve_memory_format(self.memory_format, self.backbone, device_type, str(self.trainer.precision))
        self.backbone.to(memory_format=self._input_format)
        self.check_datamodule(self.trainer.datamodule, stage)
