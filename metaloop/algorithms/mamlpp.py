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
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from metaloop.algorithms.adapted_model import AdaptedModel
from metaloop.algorithms.learned import PerLayer, PerStep
from metaloop.algorithms.maml import MetaLightningModule, _LastCall
from metaloop.nn.per_step import PerStepBatchNorm2d
from metaloop.tasks import Task
from metaloop.typed import AtLeast, Hint, check_arguments

__all__ = ["MAMLPlusPlus", "PerStep", "StepModel", "msl_weights", "MSL_MIN_WEIGHT"]  # PerStep: where it was first defined

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


_ANNEAL = "meta-steps over which the multi-step loss anneals to the last step; 0: the last step's loss only"
_FIRST_ORDER = "meta-steps of first-order meta-gradients before second-order; 0: second-order throughout"


class MAMLPlusPlus(MetaLightningModule):
    """MAML++ (Antoniou et al. 2019): MAML with learned per-step rates, a multi-step loss and a derivative-order schedule.

    Takes :class:`~metaloop.algorithms.MetaLightningModule`'s arguments (``inner.steps`` >= 1, the paper: 5) and
    its own below. The meta-gradient is unrolled (``inner.meta_grad="unrolled"``: the multi-step loss needs
    every step's weights). The parameters of :class:`~metaloop.nn.PerStepBatchNorm2d` layers do not adapt in
    the inner loop (they are meta-learned, per step with BNWB; as in the authors' code). With such layers
    (BNWB, BNRS) the model's ``forward(x, step=k)`` takes the number of inner updates ``k`` its weights have
    had (:meth:`model_at`), and the layers' ``steps`` must equal ``inner.steps`` (:class:`~metaloop.nn.PerStepConv4`).

    Args:
        lslr: learn one inner learning rate per layer and inner step (``learned["lr/<layer>"]``, shape
            ``(inner.steps,)``: ``PerStep(PerLayer(), steps)``), starting at the inner optimizer's ``lr``.
        msl: the multi-step loss, ``sum_k w_k L_query(after step k)`` with :func:`msl_weights`. False: the
            final step's query loss (MAML).
        msl_anneal_steps: the meta-steps over which the weights move to the final step (the paper: 10
            epochs of 500 meta-steps, 5000); after them the loss is the final step's.
        first_order_steps: derivative-order annealing: meta-steps ``0 .. first_order_steps - 1`` are
            first-order, later ones second-order (the paper: 50 epochs, 25000; 0 is second-order throughout,
            as the authors' released Omniglot configurations). ``inner.first_order`` makes every meta-step first-order.

    Raises:
        ValueError: as the base class, for ``inner.steps < 1``, negative schedule lengths, ``lslr`` with
            ``learnable`` naming ``lr``, a ``meta_grad`` other than ``"unrolled"``, or a model whose per-step
            BatchNorm has another number of steps.
    """

    def __init__(
        self,
        *args: Any,
        lslr: bool = True,
        msl: bool = True,
        msl_anneal_steps: Annotated[int, AtLeast(0), Hint(_ANNEAL)] = 5000,
        first_order_steps: Annotated[int, AtLeast(0), Hint(_FIRST_ORDER)] = 25000,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_arguments(
            MAMLPlusPlus.__init__, lslr=lslr, msl=msl, msl_anneal_steps=msl_anneal_steps, first_order_steps=first_order_steps
        )
        if self.inner.meta_grad != "unrolled":
            raise ValueError(
                f"meta_grad={self.inner.meta_grad!r}: MAML++ unrolls the inner loop (its multi-step loss scores every "
                "step's weights); use meta_grad='unrolled' (inner.meta_grad=unrolled), or module=maml for truncated or implicit"
            )
        if self.inner.steps < 1:
            raise ValueError(f"inner.steps={self.inner.steps!r}: MAML++ needs at least one inner step (the paper: 5)")
        for name, layer in self.model.named_modules():
            if isinstance(layer, PerStepBatchNorm2d) and layer.steps != self.inner.steps:
                raise ValueError(
                    f"the model's per-step BatchNorm {name!r} has steps={layer.steps} but inner.steps={self.inner.steps}; "
                    "build the model with steps=inner.steps (model.steps: ${inner.steps})"
                )
        if lslr:
            if "lr" in self._learnable:
                raise ValueError(
                    "lslr=True learns the inner lr per layer and step, and learnable also names 'lr'; drop one "
                    "(learnable=none, or lslr=false)"
                )
            self.learn("lr", PerStep(PerLayer(), self.inner.steps))
        self.save_hyperparameters("lslr", "msl", "msl_anneal_steps", "first_order_steps")
        self.lslr, self.msl = lslr, msl
        self.msl_anneal_steps, self.first_order_steps = msl_anneal_steps, first_order_steps
        self._stepwise = any(isinstance(m, PerStepBatchNorm2d) for m in self.model.modules())

    # -- schedules ----------------------------------------------------------------------------
    @property
    def meta_step(self) -> int:
        """Returns the number of outer steps taken (the trainer's ``global_step``; 0 outside a Trainer)."""
        return self.global_step

    def loss_weights(self) -> list[float]:
        """Returns the weights of the query losses after each training inner step at this meta-step (see :func:`msl_weights`)."""
        return msl_weights(self.inner.steps, self.meta_step, self.msl_anneal_steps if self.msl else 0)

    def is_first_order(self) -> bool:
        """True if this meta-step is first-order: ``inner.first_order``, or derivative-order annealing (``meta_step < first_order_steps``)."""
        return self.inner.first_order or self.meta_step < self.first_order_steps

    # -- hooks --------------------------------------------------------------------------------
    def model_at(self, step: int, weights: Mapping[str, Tensor]) -> StepModel:
        """Returns the model with ``weights`` run as ``model(x, step=step)`` where it has per-step BatchNorm."""
        return StepModel(self.model, weights, step if self._stepwise else None)

    def task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *, batched: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns one task's multi-step loss ``sum_k w_k L_query(after step k)`` and the final step's query metrics.

        Steps whose weight is zero (after the annealing) are not scored: no query forward.
        """
        query = (query_x, query_y)
        loss: Tensor | float = 0.0
        last: _LastCall | None = None
        trajectory = self.trajectory((support_x, support_y), self.inner.steps, create_graph=True, batched=batched)
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
