"""The one base of every learner: what a meta-learner is to Lightning, to a checkpoint and to its user.

:class:`MetaLearner` owns what gradient-based and metric-based learners share: the outer optimizer and
its scheduler, the training step around :meth:`~MetaLearner.meta_gradient`, evaluation with 95%
confidence intervals and its logging, the data checks before any step, precision and memory format,
loading a trained run (:meth:`~MetaLearner.load_from_checkpoint`), and the user's interface
``learner.adapt((x, y)) -> predictor``. A learner implements three hooks: :meth:`~MetaLearner.adapt`,
:meth:`~MetaLearner.meta_gradient` and :meth:`~MetaLearner.evaluate_task`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning
import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from metaloop.algorithms.inner import MEASURE_BATCHING_STEPS, Batching, fastest
from metaloop.algorithms.objectives import Objective
from metaloop.lightning.datamodule import MetaDataModule
from metaloop.lightning.metrics import MeanWithConfidence
from metaloop.lightning.precision import MEMORY_FORMATS, MemoryFormat, check_precision, resolve_memory_format, to_memory_format
from metaloop.nn.plain_norms import exact_norms
from metaloop.tasks import Task, sample_task
from metaloop.utils import _recursive_map

__all__ = ["MetaLearner", "Batch", "OptimizerFactory", "SchedulerFactory", "Predictor"]

Batch = tuple[Tensor, Tensor]
OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
Predictor = Callable[[Tensor], Tensor]

STAGE_SPLITS = {"fit": "train", "validate": "val", "test": "test"}


class MetaLearner(lightning.LightningModule):
    """A LightningModule that meta-learns ``model`` on meta-batches of tasks: the base of every learner.

    Each training step takes a meta-batch (:class:`~metaloop.tasks.Task` with a leading task dimension),
    adds its :meth:`meta_gradient` to the parameters' ``.grad`` and steps the outer optimizer (and the
    scheduler, every meta-step). Validation and test score every task with :meth:`evaluate_task` and log
    each metric's mean and 95% confidence half-width over the evaluation tasks, per phase of
    :attr:`evaluation_phases` (``val/acc_post``, ``test/acc_post_ci95``...).

    Args:
        model: the network meta-learned (a classifier for gradient-based learners, an embedding for metric-based ones).
        objective: the task's loss and metrics (:class:`~metaloop.algorithms.Classification`, ``Regression``).
        outer_optim: an optimizer partial, called on all trainable parameters of this module.
        scheduler: an LR scheduler partial called on the outer optimizer, stepped every meta-step.
        memory_format: ``"channels_last"`` keeps a conv net's weights and input images in channels-last (NHWC)
            memory, ``"contiguous"`` in NCHW; ``"auto"`` picks channels-last where it is faster (see
            :func:`metaloop.lightning.precision.auto_memory_format`), resolved in :meth:`setup` for the
            Trainer's device and precision (contiguous outside a Trainer).

    Hooks a learner implements: :meth:`adapt` (the user's interface), :meth:`meta_gradient` (training)
    and :meth:`evaluate_task` (evaluation). It may override :meth:`choose_batching` (how a meta-batch is
    batched on a device), :meth:`evaluate_tasks` (a whole evaluation meta-batch at once) and
    :meth:`check_task` (what a task must satisfy before any step).
    """

    #: when evaluation scores the query sets: before and after adaptation (``val/acc_pre``, ``val/acc_post``)
    evaluation_phases: tuple[str, ...] = ("pre", "post")

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        outer_optim: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        memory_format: MemoryFormat = "auto",
    ) -> None:
        super().__init__()
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format={memory_format!r} is not one of {', '.join(repr(m) for m in MEMORY_FORMATS)}")
        self.automatic_optimization = False
        self.model = model
        self.objective = objective
        self.outer_optim = outer_optim
        self.scheduler = scheduler
        self.memory_format = memory_format
        #: how a meta-batch is adapted: "sequential" (task by task), "vmap" (see :meth:`over_tasks`) or "fold"
        #: (tasks folded into channels, by learners that implement it); chosen in :meth:`setup`
        self.batching: Batching = "sequential"
        #: the paths :meth:`measure_batching` will time on the first training meta-batch (empty: none to measure)
        self.batching_trials: tuple[Batching, ...] = ()
        #: seconds per meta-step of each path it timed
        self.batching_seconds: dict[Batching, float] = {}
        self._input_format = resolve_memory_format(memory_format, model, "cpu", "32-true")
        model.to(memory_format=self._input_format)
        self.eval_metrics = nn.ModuleDict({
            f"{stage}_{name}_{when}": MeanWithConfidence()
            for stage in ("val", "test")
            for name in objective.metric_names
            for when in self.evaluation_phases
        })

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        allow: Iterable[str] = (),
        **kwargs: Any,
    ) -> MetaLearner:
        """Returns the trained learner of a checkpoint written by ``metaloop fit`` (see :func:`metaloop.lightning.runs.load_module`).

        The stored configuration builds only metaloop's own targets and those in ``allow`` (import paths or
        package prefixes ending in ``.``, e.g. ``allow=["mypkg.MyModel"]``; ``$METALOOP_ALLOW_TARGETS`` adds more).
        With constructor arguments in ``kwargs`` (a checkpoint of a learner built in Python), Lightning's own
        loader, with ``weights_only=True``.
        """
        if kwargs or hparams_file is not None:
            if weights_only is False:
                raise ValueError("weights_only must stay True: an unrestricted load would let the checkpoint run code")
            from metaloop.lightning.checkpoint import local_file

            with local_file(checkpoint_path) as local:  # Lightning's download would be unbounded and kept
                return super().load_from_checkpoint(local, map_location, hparams_file, strict, True, **kwargs)
        from metaloop.lightning.runs import load_module

        return load_module(checkpoint_path, map_location=map_location, strict=strict is not False, cls=cls, allow=allow)  # type: ignore[return-value]

    # -- the hooks of a learner ---------------------------------------------------------------
    def adapt(self, support: Batch, steps: int | None = None, *, n_ways: int | None = None) -> Predictor:
        """Returns a predictor ``f(x) -> outputs`` adapted to one task's support set ``(x, y)`` (no task dimension).

        ``steps`` is the number of inner steps where the learner has them; ``n_ways`` the task's number of
        classes where it differs from training (None: as in training).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement adapt(support, steps, *, n_ways)")

    def meta_gradient(self, batch: Task) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the meta-batch's mean loss and mean metrics, detached, after adding its meta-gradient to ``.grad``.

        Backpropagate with :meth:`meta_backward`, chunk by chunk of :meth:`over_tasks` (under DDP only the last
        chunk all-reduces). Works outside a Trainer too (benchmarks, notebooks).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement meta_gradient(batch)")

    def evaluate_task(
        self, n_ways: int | None, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *, batched: bool
    ) -> dict[str, dict[str, Tensor]]:
        """Returns one task's query metrics (scalars, keys ``objective.metric_names``) per phase of :attr:`evaluation_phases`."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate_task(...)")

    def evaluate_tasks(self, n_ways: int | None, batch: Task) -> dict[str, dict[str, Tensor]]:
        """Returns every task's query metrics per phase, ``(tasks,)`` each: :meth:`evaluate_task` over :meth:`over_tasks`."""
        chunks = [result for _, result in self.over_tasks(functools.partial(self.evaluate_task, n_ways), batch)]
        return {when: {name: torch.cat([c[when][name] for c in chunks]) for name in chunks[0][when]} for when in chunks[0]}

    def choose_batching(self, device_type: str, precision: str) -> Batching:
        """Returns how meta-batches are adapted on ``device_type`` under ``precision``: task by task, by default."""
        return "sequential"

    def batching_candidates(self, device_type: str, precision: str) -> tuple[Batching, ...]:
        """Returns the exact ways to adapt a meta-batch that a long run times (:meth:`measure_batching`); the first is
        :meth:`choose_batching`'s, which a short run keeps."""
        return (self.choose_batching(device_type, precision),)

    def measure_batching(self, batch: Task) -> Batching:
        """Times each of :attr:`batching_trials` on ``batch`` (its second meta-gradient: the first pays one-time
        costs), keeps the fastest (:func:`~metaloop.algorithms.inner.fastest`) and returns it; the gradients are cleared.
        Every trial is exact, so the choice changes the speed, not the numbers (up to rounding)."""
        trials, self.batching_trials = self.batching_trials, ()
        device = self.trainer.strategy.root_device
        precision = str(self.trainer.precision)
        for path in trials:
            self._use_batching(path, device.type, precision)
            for _ in range(2):
                self.zero_grad(set_to_none=True)
                start = time.perf_counter()
                self.meta_gradient(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.batching_seconds[path] = time.perf_counter() - start
        self._use_batching(fastest(self.batching_seconds), device.type, precision)
        self.zero_grad(set_to_none=True)
        measured = ", ".join(f"{path} {1e3 * s:.0f} ms" for path, s in self.batching_seconds.items())
        rank_zero_info(f"batch_tasks=auto: measured {measured} per meta-step; using {self.batching}")
        return self.batching

    def _use_batching(self, path: Batching, device_type: str, precision: str) -> None:
        self.batching = path
        self._input_format = resolve_memory_format(self.memory_format, self.model, device_type, precision, path != "sequential")
        self.model.to(memory_format=self._input_format)

    @property
    def batched(self) -> bool:
        """True when meta-batches are adapted under :func:`torch.func.vmap` (``batching == "vmap"``)."""
        return self.batching == "vmap"

    # -- tasks --------------------------------------------------------------------------------
    def over_tasks(self, fn: Callable[..., Any], batch: Task) -> Iterator[tuple[bool, Any]]:
        """Yields ``(last, result)``: ``fn(*task, batched=...)`` over the meta-batch, with a leading task dimension.

        The one place a meta-batch is either vmapped (one chunk holding every task: one backward) or
        looped over (one chunk per task: the graph of one task at a time, and a caller can backpropagate
        each chunk before the next is computed). Inputs take the learner's memory format.
        """
        batch = Task(*(to_memory_format(field, self._input_format) for field in batch))
        if self.batching == "vmap":
            # plain-operation normalization layers: PyTorch's batching rules drop second-order terms (metaloop.nn.plain_norms)
            with exact_norms():
                result = torch.func.vmap(functools.partial(fn, batched=True))(*batch)
            yield True, result
            return
        tasks = batch.support_x.shape[0]
        for i in range(tasks):
            result = fn(*(field[i] for field in batch), batched=False)
            yield i == tasks - 1, _recursive_map(result, lambda t: t.unsqueeze(0))

    def meta_backward(self, loss: Tensor, sync: bool = True) -> None:
        """Backpropagates ``loss``; under DDP, all-reduces only if ``sync``. Outside a Trainer, plain ``backward``."""
        if self._trainer is None:
            loss.backward()
            return
        strategy = self.trainer.strategy
        blocked = not sync and isinstance(strategy, ParallelStrategy)
        with strategy.block_backward_sync() if blocked else contextlib.nullcontext():
            self.manual_backward(loss)

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: Task, batch_idx: int) -> Tensor:
        """Returns the mean loss of the meta-batch, after one outer step on its :meth:`meta_gradient`."""
        if self.batching_trials:
            self.measure_batching(batch)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss, metrics = self.meta_gradient(batch)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        metrics["loss"] = loss
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.outer_optim(self.parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}

    # -- evaluation ---------------------------------------------------------------------------
    def _evaluation_step(self, batch: Task, stage: str) -> None:
        with torch.inference_mode(False):
            # tensors made under inference mode cannot enter autograd; copies made outside it can
            batch = Task(*(field.clone() for field in batch))
        n_ways = self.objective.output_size(batch.support_y)
        results = self.evaluate_tasks(n_ways, batch)
        for when, metrics in results.items():
            for name, values in metrics.items():
                key = f"{stage}_{name}_{when}"
                if key not in self.eval_metrics:
                    raise KeyError(
                        f"evaluate_task returned {name!r} ({when}), which is not in objective.metric_names "
                        f"{self.objective.metric_names} x evaluation_phases {self.evaluation_phases}; add it there so that it is aggregated"
                    )
                self.eval_metrics[key].update(values)

    def _log_evaluation(self, stage: str) -> None:
        for key, metric in self.eval_metrics.items():
            if not key.startswith(f"{stage}_"):
                continue
            if metric.update_count == 0 and self.trainer.world_size == 1:
                continue
            mean, half_width = metric.compute()
            name = key[len(stage) + 1 :]
            # already reduced over ranks by the metric; sync_dist only marks the value as global
            self.log(f"{stage}/{name}", mean.float(), prog_bar=name.endswith("_post"), sync_dist=True)
            self.log(f"{stage}/{name}_ci95", half_width.float(), sync_dist=True)
            metric.reset()

    def validation_step(self, batch: Task, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Task, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # -- checks -------------------------------------------------------------------------------
    def check_task(self, task: Task, stage: str = "fit") -> None:
        """Raises ``ValueError`` if the learner cannot handle ``task`` (one task, no task dimension).

        Runs the learner's predictor before adaptation (``adapt(support, steps=0)``; in evaluation, for the
        task's number of classes) on the query inputs, with the model in evaluation mode (no running
        statistics move), and checks its outputs against the query targets.
        """
        n_ways = None if stage == "fit" else self.objective.output_size(task.support_y)
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                output = self.adapt((task.support_x, task.support_y), 0, n_ways=n_ways)(task.query_x)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            if "n_ways" in str(err):
                raise
            raise ValueError(
                f"{type(self.model).__name__} cannot run on the task's support inputs of shape "
                f"{tuple(task.support_x.shape)} ({str(err).splitlines()[0]}); choose a model for this task's inputs"
            ) from err
        finally:
            self.model.train(training)
        self.objective.check(output, task.query_y)

    def check_datamodule(self, datamodule: lightning.LightningDataModule, stage: str) -> None:
        """Raises ``ValueError`` if the first task ``stage`` would use cannot be handled (see :meth:`check_task`).

        ``stage`` is ``"fit"``, ``"validate"`` or ``"test"``; data modules other than
        :class:`~metaloop.lightning.MetaDataModule`, and evaluation stages without tasks, are not checked.
        """
        if not isinstance(datamodule, MetaDataModule) or stage not in STAGE_SPLITS:
            return
        if (stage == "validate" and not datamodule.num_val_tasks) or (stage == "test" and not datamodule.num_test_tasks):
            return
        self.check_task(sample_task(datamodule.tasks, STAGE_SPLITS[stage], datamodule.seed, 0), stage)

    def setup(self, stage: str) -> None:
        """Checks the Trainer's precision and the attached data module's tasks before any step runs, and chooses
        the batching (:meth:`choose_batching`) and ``memory_format="auto"`` for the Trainer's device and precision.

        Raises:
            ValueError: for a precision the inner loop cannot take (see :func:`~metaloop.lightning.precision.check_precision`).
        """
        check_precision(self.trainer.precision)
        device_type, precision = self.trainer.strategy.root_device.type, str(self.trainer.precision)
        candidates = self.batching_candidates(device_type, precision)
        self._use_batching(candidates[0], device_type, precision)
        steps = self.trainer.max_steps
        long_run = steps == -1 or steps >= MEASURE_BATCHING_STEPS
        # one process: ranks timing apart could choose apart (every path is exact, but their speeds would differ)
        measure = stage == "fit" and len(candidates) > 1 and long_run and self.trainer.world_size == 1
        self.batching_trials = candidates if measure else ()
        self.check_datamodule(self.trainer.datamodule, stage)
