"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML", ICLR): MAML with its five fixes, each switchable.

:class:`MAMLPlusPlus` is :class:`~metaloop.lightning.MetaLightningModule` with

- **LSLR** (``lslr``): a learned inner learning rate per layer and per inner step (:class:`PerStep`
  over :class:`~metaloop.lightning.PerLayer`), starting at the inner optimizer's ``lr``;
- **MSL** (``msl``, ``msl_anneal_steps``): the meta-loss is the query loss after every inner step,
  weighted by :func:`msl_weights`, annealed toward the final step's loss alone;
- **BNWB / BNRS**: per-step BatchNorm weights and running statistics, in the model
  (:class:`~metaloop.nn.PerStepConv4`'s ``per_step_weights`` and ``per_step_stats``): this module
  passes each forward the number of inner updates its weights have had (``model(x, step=k)``);
- **DA** (``first_order_steps``): first-order meta-gradients for the first meta-steps, then second-order;
- **CA**: cosine annealing of the outer learning rate, the ``scheduler`` argument
  (``torch.optim.lr_scheduler.CosineAnnealingLR``; ``scheduler=cosine`` in the configs).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaloop.lightning.adapted_model import AdaptedModel
from metaloop.lightning.learned import Learned, PerLayer
from metaloop.lightning.module import (
    Batch,
    BatchTasks,
    MetaGrad,
    MetaLightningModule,
    OptimizerFactory,
    SchedulerFactory,
    _LastCall,
    inner_grad_mode,
)
from metaloop.lightning.objectives import Objective
from metaloop.lightning.precision import MemoryFormat
from metaloop.nn.per_step import PerStepBatchNorm2d
from metaloop.optim.loop import inner_trajectory
from metaloop.tasks import Task

__all__ = ["MAMLPlusPlus", "PerStep", "StepModel", "msl_weights", "MSL_MIN_WEIGHT"]

MSL_MIN_WEIGHT = 0.03
"""The floor of a non-final step's multi-step-loss weight, times the number of steps (Antoniou et al.'s code)."""


def msl_weights(steps: int, meta_step: int, anneal_steps: int, min_weight: float = MSL_MIN_WEIGHT) -> list[float]:
    """Returns the multi-step loss's weight of the query loss after each of ``steps`` inner steps at ``meta_step``.

    Antoniou et al. (2019), section 4 ("multi-step loss optimization") and their code
    (``get_per_step_loss_importance_vector``): with ``t = meta_step / anneal_steps``, every step
    starts at ``1 / steps``; the non-final weights fall linearly, ``max((1 - t) / steps,
    min_weight / steps)``, and the final one rises, ``min((1 + t (steps - 1)) / steps,
    1 - (steps - 1) min_weight / steps)``, so they sum to one. From ``meta_step = anneal_steps``
    on, the loss is the final step's alone (``[0, ..., 0, 1]``), as in their code; ``anneal_steps = 0``
    is that from the start (MAML's loss). The authors anneal once per epoch of 500 meta-steps over
    10 epochs; here ``t`` moves every meta-step (``anneal_steps = 5000`` is their schedule, smoothed).

    Raises:
        ValueError: for ``steps < 1``, a negative ``meta_step`` or ``anneal_steps``, or ``min_weight``
            outside ``[0, 1]``.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: the multi-step loss needs at least one inner step")
    if meta_step < 0 or anneal_steps < 0:
        raise ValueError(f"meta_step={meta_step} and anneal_steps={anneal_steps} must be >= 0")
    if not 0.0 <= min_weight <= 1.0:
        raise ValueError(f"min_weight={min_weight} must be in [0, 1] (the paper's: {MSL_MIN_WEIGHT})")
    if meta_step >= anneal_steps:
        return [0.0] * (steps - 1) + [1.0]
    t = meta_step / anneal_steps
    early = max((1.0 - t) / steps, min_weight / steps)
    final = min((1.0 + t * (steps - 1)) / steps, 1.0 - (steps - 1) * min_weight / steps)
    return [early] * (steps - 1) + [final]


class PerStep(Learned):
    """One learned value per inner step of what ``inner`` learns: a leading dimension of ``steps``.

    MAML++'s LSLR is ``PerStep(PerLayer(), steps)``: one learning rate per layer and inner step.
    Only :class:`MAMLPlusPlus` knows the step: it hands the rule row ``k`` at inner step ``k``
    (the last row for steps past ``steps - 1``).
    """

    def __init__(self, inner: Learned, steps: int) -> None:
        super().__init__(inner.init)
        if steps < 1:
            raise ValueError(f"steps={steps}: per-step values need at least one inner step")
        self.inner, self.steps = inner, steps

    def key(self, name: str) -> str:
        return self.inner.key(name)

    def shape(self, param: Tensor) -> tuple[int, ...]:
        return (self.steps, *self.inner.shape(param))


class StepModel(AdaptedModel):
    """An adapted model that runs ``module(*args, step=step)``: a step-indexed net after ``step`` inner updates.

    ``step`` None calls the module without it (a model without per-step parts).
    """

    def __init__(self, module: nn.Module, weights: Mapping[str, Tensor], step: int | None) -> None:
        super().__init__(module, weights)
        self.step = step

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.step is not None:
            kwargs = {"step": self.step, **kwargs}
        return super().__call__(*args, **kwargs)


class MAMLPlusPlus(MetaLightningModule):
    """MAML++ (Antoniou et al. 2019): MAML with learned per-step rates, a multi-step loss and a derivative-order schedule.

    Arguments not listed are :class:`~metaloop.lightning.MetaLightningModule`'s. The meta-gradient is
    unrolled (``meta_grad="unrolled"``: the multi-step loss needs every step's weights). The
    parameters of :class:`~metaloop.nn.PerStepBatchNorm2d` layers do not adapt in the inner loop
    (they are meta-learned, per step with BNWB; as in the authors' code).

    Args:
        model: the network; with :class:`~metaloop.nn.PerStepBatchNorm2d` layers (BNWB, BNRS), its
            ``forward(x, step=k)`` takes the number of inner updates ``k`` the weights have had, and the
            layers' ``steps`` must equal ``inner_steps`` (:class:`~metaloop.nn.PerStepConv4`).
        inner_steps: inner steps per task in training (>= 1; the paper: 5).
        lslr: learn one inner learning rate per layer and inner step (``learned["lr/<layer>"]``, shape
            ``(inner_steps,)``), starting at the inner optimizer's ``lr``. False keeps the optimizer's.
        msl: the multi-step loss, ``sum_k w_k L_query(after step k)`` with :func:`msl_weights`. False: the
            final step's query loss (MAML).
        msl_anneal_steps: the meta-steps over which the weights move to the final step (the paper: 10
            epochs of 500 meta-steps, 5000); after them the loss is the final step's.
        first_order_steps: derivative-order annealing: meta-steps ``0 .. first_order_steps - 1`` are
            first-order, later ones second-order (the paper: 50 epochs, 25000; 0 is second-order throughout,
            as the authors' released Omniglot configurations).
        first_order: every meta-step first-order (whatever ``first_order_steps`` says).
        meta_grad: accepted so that a configuration's ``inner.meta_grad`` cannot be silently ignored:
            only ``"unrolled"``.
        truncate: accepted so that a configuration's ``inner.truncate`` cannot be silently ignored: only None.

    Raises:
        ValueError: as the base class, for ``inner_steps < 1``, negative schedule lengths, ``lslr`` with
            ``learnable`` naming ``lr``, a ``meta_grad`` other than ``"unrolled"``, a model whose per-step
            BatchNorm has another number of steps,
            ``batch_tasks="vmap"`` with per-step running statistics (buffers: BNRS), or no adapted parameter left.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_optim: OptimizerFactory,
        outer_optim: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        adapt_params: str | None = None,
        learnable: Mapping[str, Learned] | None = None,
        batch_tasks: BatchTasks = "auto",
        head: str | None = None,
        lslr: bool = True,
        msl: bool = True,
        msl_anneal_steps: int = 5000,
        first_order_steps: int = 25000,
        first_order: bool = False,
        meta_grad: MetaGrad = "unrolled",
        truncate: int | None = None,
        memory_format: MemoryFormat = "auto",
    ) -> None:
        if meta_grad != "unrolled":
            raise ValueError(
                f"meta_grad={meta_grad!r}: MAML++ unrolls the inner loop (its multi-step loss scores every step's "
                "weights); use meta_grad='unrolled' (inner.meta_grad=unrolled), or module=maml for truncated or implicit"
            )
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps={inner_steps!r}: MAML++ needs at least one inner step (the paper: 5)")
        for name, value in (("msl_anneal_steps", msl_anneal_steps), ("first_order_steps", first_order_steps)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a whole number of meta-steps >= 0")
        for name, layer in model.named_modules():
            if isinstance(layer, PerStepBatchNorm2d) and layer.steps != inner_steps:
                raise ValueError(
                    f"the model's per-step BatchNorm {name!r} has steps={layer.steps} but inner_steps={inner_steps}; "
                    "build the model with steps=inner_steps (model.steps: ${inner.steps})"
                )
        learnable = dict(learnable or {})
        if lslr:
            if "lr" in learnable:
                raise ValueError(
                    "lslr=True learns the inner lr per layer and step, and learnable also names 'lr'; drop one "
                    "(learnable=none, or lslr=false)"
                )
            learnable["lr"] = PerStep(PerLayer(), inner_steps)
        super().__init__(
            model, objective, inner_optim, outer_optim, scheduler=scheduler, inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps, adapt_params=adapt_params, learnable=learnable,
            batch_tasks=batch_tasks, head=head, first_order=first_order, truncate=truncate, memory_format=memory_format,
        )
        self.save_hyperparameters(
            "inner_steps", "eval_inner_steps", "adapt_params", "batch_tasks", "head", "lslr", "msl",
            "msl_anneal_steps", "first_order_steps", "first_order",
        )
        self.lslr, self.msl = lslr, msl
        self.msl_anneal_steps, self.first_order_steps = msl_anneal_steps, first_order_steps
        self._per_step = {name for name, spec in learnable.items() if isinstance(spec, PerStep)}
        self._stepwise = any(isinstance(m, PerStepBatchNorm2d) for m in model.modules())

    # -- construction hooks -----------------------------------------------------------------
    def _select_adapted(self, pattern: str | None) -> list[str]:
        norms = {
            f"{name}.{p}" for name, m in self.model.named_modules() if isinstance(m, PerStepBatchNorm2d)
            for p, _ in m.named_parameters()
        }
        chosen = [n for n in super()._select_adapted(pattern) if n not in norms]
        if not chosen:
            raise ValueError(
                f"adapt_params={pattern!r} selects only per-step BatchNorm parameters, which MAML++ meta-learns but "
                "does not adapt; select other parameters (None adapts all others)"
            )
        return chosen

    # -- schedules ----------------------------------------------------------------------------
    @property
    def meta_step(self) -> int:
        """Returns the number of outer steps taken (the trainer's ``global_step``; 0 outside a Trainer)."""
        return self.global_step

    def loss_weights(self) -> list[float]:
        """Returns the weights of the query losses after each training inner step at this meta-step (see :func:`msl_weights`)."""
        return msl_weights(self.inner_steps, self.meta_step, self.msl_anneal_steps if self.msl else 0)

    def is_first_order(self) -> bool:
        """True if this meta-step is first-order: ``first_order``, or derivative-order annealing (``meta_step < first_order_steps``)."""
        return self.first_order or self.meta_step < self.first_order_steps

    # -- the inner loop -----------------------------------------------------------------------
    def _model_at(self, step: int, weights: Mapping[str, Tensor]) -> StepModel:
        return StepModel(self.model, weights, step if self._stepwise else None)

    def _initial_weights(self, n_ways: int | None) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
        """As the base class's; a head resized to ``n_ways`` keeps its per-step rates (one per step, not per class)."""
        params, hparams = super()._initial_weights(n_ways)
        if self.head is None or not self._per_step:
            return params, hparams
        # the base resizes a head's per-element values by their shape, and a row of inner_steps rates would pass
        # for a bias's per-element values when inner_steps equals the trained n_ways
        learned = self.inner_hparams()
        for name in hparams:
            if name.startswith(f"{self.head}."):
                for hp in self._per_step:
                    value = learned[name][hp]
                    if isinstance(value, Tensor) and value.ndim == 1:
                        hparams[name][hp] = value
        return params, hparams

    def _step_hparams(self, hparams: dict[str, dict[str, Any]], steps: int) -> list[dict[str, dict[str, Any]]]:
        """Returns each inner step's hyperparameters: row ``min(k, inner_steps - 1)`` of the per-step learned values."""
        if not self._per_step:
            return [hparams] * steps
        per_step = []
        for k in range(steps):
            row = min(k, self.inner_steps - 1)
            per_step.append({
                name: {
                    hp: (tuple(v[row] for v in value) if isinstance(value, tuple) else value[row]) if hp in self._per_step else value
                    for hp, value in hp_values.items()
                }
                for name, hp_values in hparams.items()
            })
        return per_step

    def _trajectory(
        self, support: Batch, steps: int, *, n_ways: int | None, create_graph: bool, batched: bool
    ) -> Iterator[StepModel]:
        """Returns an iterator over the model after 0, 1, ..., ``steps`` inner steps on ``support`` (``_model_at(k)``)."""
        params, hparams = self._initial_weights(n_ways)
        fixed = {n: p for n, p in params.items() if n not in hparams}

        def support_loss(weights: dict[str, Tensor], step: int) -> Tensor:
            return self.inner_loss(self._model_at(step, {**fixed, **weights}), support)

        weights = inner_trajectory(
            support_loss, {n: params[n] for n in hparams}, rule=self.rule, hparams=self._step_hparams(hparams, steps),
            steps=steps, first_order=self.is_first_order(), create_graph=create_graph, batched=batched,
        )
        adapted = (self._model_at(k + 1, {**fixed, **w}) for k, w in enumerate(weights))
        return itertools.chain([self._model_at(0, params)], adapted)

    def _adapt(
        self, support: Batch, steps: int | None, *, n_ways: int | None, create_graph: bool, batched: bool
    ) -> StepModel:
        """Returns the model after ``steps`` inner steps (``eval_inner_steps`` if None); see :meth:`adapt`."""
        steps = self.eval_inner_steps if steps is None else steps
        with inner_grad_mode(create_graph):
            for fmodel in self._trajectory(support, steps, n_ways=n_ways, create_graph=create_graph, batched=batched):
                pass  # the last step's model
        return fmodel

    # -- training -------------------------------------------------------------------------------
    def _task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *, batched: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns one task's multi-step loss ``sum_k w_k L_query(after step k)`` and the final step's query metrics.

        Steps whose weight is zero (after the annealing) are not scored: no query forward.
        """
        query = (query_x, query_y)
        loss: Tensor | float = 0.0
        last: _LastCall | None = None
        trajectory = self._trajectory((support_x, support_y), self.inner_steps, n_ways=None, create_graph=True, batched=batched)
        for weight, fmodel in zip(self.loss_weights(), itertools.islice(trajectory, 1, None)):
            if weight:
                last = _LastCall(fmodel)
                loss = loss + weight * self.outer_loss(last, query)
        assert last is not None and isinstance(loss, Tensor)  # the final weight is never zero
        with torch.no_grad():
            metrics = self.task_metrics(last.replay, query)
        return loss, metrics

    def training_step(self, batch: Task, batch_idx: int) -> Tensor:
        """Returns the meta-batch's mean multi-step loss after one outer step; logs the schedules' state too."""
        weights, first_order = self.loss_weights(), self.is_first_order()
        loss = super().training_step(batch, batch_idx)
        self.log_dict({"train/msl_final_weight": float(weights[-1]), "train/second_order": float(not first_order)})
        return loss

    # -- checks ---------------------------------------------------------------------------------
    def check_task(self, task: Task, stage: str = "fit") -> None:
        """As the base class's, with the model in evaluation mode (so the check's forward updates no running statistics)."""
        training = self.model.training
        self.model.eval()
        try:
            super().check_task(task, stage)
        finally:
            self.model.train(training)
