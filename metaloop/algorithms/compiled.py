"""``compile``: a folded learner's meta-step as one function, compiled by :func:`torch.compile` (inductor).

The folded meta-step (:mod:`metaloop.algorithms.folding`) written functionally: the meta-gradient of the mean
query loss is :func:`torch.func.grad_and_value` of a function of the learner's trainable tensors (the model's
weights, learned hyperparameters), whose inner gradients are :func:`torch.func.grad` too. Inductor compiles
the whole of it, forward, inner gradients and meta-gradient, into fused kernels: for small models, whose
steps are mostly Python and kernel launches, that is several times faster. The compiled meta-gradient is
added to ``.grad`` as the backward would add it; it equals the eager one to rounding
(``tests/algorithms/test_compiled.py``).

Compiling costs time once per process (and more the first time on a machine): the compiled code is cached on
disk (``$TORCHINDUCTOR_CACHE_DIR``, by default ``~/.cache/metaloop/inductor``), so a second run of a recipe
recompiles from the cache in seconds. :func:`compile_wins` decides ``compile=None`` (auto) from measured
rates: only where the run is long enough for the compile to pay for itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metaloop.algorithms.folding import folded_query_losses
from metaloop.algorithms.inner import model_kind
from metaloop.tasks import Task

if TYPE_CHECKING:
    from metaloop.algorithms.maml import MetaLightningModule

__all__ = ["AUTO_COMPILE_STEPS", "CompiledMetaStep", "compile_wins", "compiled_meta_step"]

# The shortest run (meta-steps) for which module.compile=None compiles, by device type and model kind; kinds
# not listed are never compiled by auto. Measured on 2 cores of an Intel Xeon (AMX), one thread per run:
# `metaloop fit --config maml_sinusoid.yaml inner.steps=5 trainer.max_steps=2000` ran 57 meta-steps/s eager
# (42 s), 90-94 compiled (96 s the first time on the machine, 53 s from the cache): compiling costs about 67 s
# cold and 25 s warm and saves 6.8 ms a step, so it wins from about 10,000 meta-steps on a fresh machine (the
# paper's 70,000: 823 s against 1,228 s). The conv-4 on CPUs gained nothing (443-489 ms a step compiled against
# 452 eager, after a 142 s compile), and nothing is measured on CUDA yet.
AUTO_COMPILE_STEPS: dict[tuple[str, str], int] = {("cpu", "other"): 10_000}


def compile_wins(device_type: str, kind: str, max_steps: int, precision: str, world_size: int) -> bool:
    """Returns whether ``compile=None`` (auto) compiles a folded learner's meta-step for this run.

    Only single-process float32 runs whose ``max_steps`` reaches :data:`AUTO_COMPILE_STEPS` for the device
    and model kind (``"conv"``: the model has a 2-D convolution; ``"other"``).
    """
    threshold = AUTO_COMPILE_STEPS.get((device_type, kind))
    return threshold is not None and max_steps >= threshold and precision == "32-true" and world_size == 1


class _MetaLoss(nn.Module):
    """The mean folded query loss of a meta-batch as a module's forward, for :func:`torch.func.functional_call`."""

    def __init__(self, learner: MetaLightningModule) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, batch: Task) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        losses, metrics = folded_query_losses(self.learner, batch, functional=True)
        return losses.mean(), (losses.detach(), metrics)


class CompiledMetaStep:
    """``step(batch)`` adds the meta-batch's meta-gradient to ``.grad`` and returns its mean query loss and metrics,
    as :func:`~metaloop.algorithms.folding.folded_meta_gradient` does, through one compiled function."""

    def __init__(self, learner: MetaLightningModule) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "metaloop" / "inductor"))
        # held in a list, not as a submodule: the learner would otherwise contain itself
        self._loss = [_MetaLoss(learner)]
        self._learner = [learner]

        def meta_loss(params: dict[str, Tensor], batch: Task) -> tuple[Tensor, Any]:
            return torch.func.functional_call(self._loss[0], params, (batch,), strict=False)

        self._grad: Callable[..., Any] = torch.compile(torch.func.grad_and_value(meta_loss, has_aux=True))

    def __call__(self, batch: Task) -> tuple[Tensor, dict[str, Tensor]]:
        learner = self._learner[0]
        params = {f"learner.{n}": p for n, p in learner.named_parameters() if p.requires_grad}
        grads, (_, (losses, metrics)) = self._grad(params, Task(*batch))
        for name, p in params.items():
            g = grads[name].detach()
            p.grad = g if p.grad is None else p.grad + g
        return losses.mean(), {k: v.mean() for k, v in metrics.items()}


def compiled_meta_step(learner: MetaLightningModule, stage: str) -> CompiledMetaStep | None:
    """Returns the compiled meta-step of ``learner`` for ``stage`` of its Trainer's run, where its ``compile`` says (None: eager).

    Raises:
        ValueError: for ``compile=True`` where the meta-batch is not folded or the run has several processes.
    """
    want, trainer = learner.compile_meta_step, learner.trainer
    if want and (learner.batching != "fold" or trainer.world_size > 1):
        raise ValueError(
            f"module.compile=true compiles the folded meta-step of one process; this run's tasks are {learner.batching!r} "
            f"on {trainer.world_size} process(es); use inner.batch_tasks=fold on one device, or module.compile=null"
        )
    device_type, precision = trainer.strategy.root_device.type, str(trainer.precision)
    auto = want is None and learner.batching == "fold" and compile_wins(
        device_type, model_kind(learner.model), trainer.max_steps, precision, trainer.world_size
    )
    return CompiledMetaStep(learner) if stage == "fit" and (want or auto) else None
