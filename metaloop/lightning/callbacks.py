"""Callbacks that keep a run's results honest: no non-finite step is taken or reported, the final weights are saved and validated, a resume continues.

:class:`StopOnNonFinite` stops a run *before* the outer optimizer applies a non-finite gradient, so the
weights in memory, and every checkpoint written afterwards, stay finite; the run fails with
:class:`NonFiniteError`. It also fails an evaluation whose figures are not finite
(:class:`NonFiniteEvaluation`): a NaN loss beside a 20% accuracy is no score. :class:`RunCheckpoint` is
Lightning's ``ModelCheckpoint`` that also saves ``last.ckpt`` when training ends between two checkpoint
intervals and when a scheduler's SIGTERM stops the run, and keeps saving to ``last.ckpt`` when a resumed run
folder was moved, so ``last.ckpt`` always holds the weights a run reports. :class:`ValidateFinalStep`
validates those final weights, so the reported validation is theirs. :class:`ContinueSchedule` makes a resumed
run follow the learning-rate schedule its configuration defines (a longer ``trainer.max_steps``: a longer
schedule), not the one stored in the checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = [
    "ContinueSchedule", "MetaStepTimer", "NonFiniteError", "NonFiniteEvaluation", "RunCheckpoint", "StopOnNonFinite",
    "ValidateFinalStep", "check_evaluation", "continued_schedule", "moved_checkpoint_state",
]

_SHOWN_PARAMETERS = 3


class NonFiniteError(RuntimeError):
    """A meta-training loss or gradient that is NaN or infinite; the step was not taken."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class NonFiniteEvaluation(NonFiniteError):
    """An evaluation (``stage`` ``"val"`` or ``"test"``) whose figures ``bad`` are NaN or infinite; ``metrics``: all of that stage's figures."""

    def __init__(self, stage: str, step: int, bad: Mapping[str, float], metrics: Mapping[str, float]) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        super().__init__(f"the {'validation' if stage == 'val' else 'test'} at meta-step {step} is not finite ({shown})", step)
        self.stage = stage
        self.bad = dict(bad)
        self.metrics = dict(metrics)


def check_evaluation(metrics: Mapping[str, Any], stage: str, step: int) -> None:
    """Raises :class:`NonFiniteEvaluation` if a figure of ``stage`` (keys ``stage/...``) in ``metrics`` is NaN or infinite.

    A confidence half-width (``..._ci95``) is not a figure: it is undefined (NaN) for a single task.
    """
    figures = {k: float(v) for k, v in metrics.items() if k.startswith(f"{stage}/")}
    bad = {k: v for k, v in figures.items() if not k.endswith("_ci95") and not math.isfinite(v)}
    if bad:
        raise NonFiniteEvaluation(stage, step, bad, figures)


class StopOnNonFinite(lightning.Callback):
    """Raises :class:`NonFiniteError` when a meta-step's gradients or loss are not finite, before the step is taken,
    and :class:`NonFiniteEvaluation` when a validation or test figure is (see :func:`check_evaluation`).

    Gradients are checked when the outer optimizer is about to step (one device sync per meta-step); the
    returned training loss after the step (a finite gradient with an infinite loss). Checkpoint callbacks
    run after this one, so no checkpoint of a non-finite step is written. A non-finite validation stops
    the fit at once (its checkpoints, of finite weights, are kept), as does the sanity check.
    """

    def on_before_optimizer_step(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [(name, p.grad) for name, p in pl_module.named_parameters() if p.grad is not None]
        if not grads:
            return
        # one fused kernel: the largest |g| of each gradient is finite iff the gradient is (NaN propagates)
        finite = torch.stack(torch._foreach_norm([g for _, g in grads], ord=float("inf"))).isfinite()
        if bool(finite.all()):
            return
        bad = [name for (name, _), ok in zip(grads, finite.tolist()) if not ok]
        shown = ", ".join(bad[:_SHOWN_PARAMETERS]) + (f" and {len(bad) - _SHOWN_PARAMETERS} more" if len(bad) > _SHOWN_PARAMETERS else "")
        raise NonFiniteError(
            f"meta-step {trainer.global_step + 1}: the meta-gradient of {shown} is NaN or infinite; the step was not "
            "taken", trainer.global_step + 1
        )

    def on_train_batch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            raise NonFiniteError(f"meta-step {trainer.global_step}: the meta-training loss is {loss.item()}", trainer.global_step)

    # on_*_end, not on_*_epoch_end: callbacks run that hook before the module logs its epoch metrics
    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        check_evaluation(trainer.callback_metrics, "val", trainer.global_step)

    def on_test_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        check_evaluation(trainer.callback_metrics, "test", trainer.global_step)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` also holds the final step of a run and the step a SIGTERM stopped at.

    Lightning saves only every ``every_n_train_steps``; a run of 3 steps with an interval of 2 would leave
    step 2 in ``last.ckpt`` while reporting results of step 3. On SIGTERM (what cluster schedulers send
    before killing a job) Lightning stops between meta-steps; the state is consistent and saved here.
    Other exceptions save nothing: a failed step must not replace a good checkpoint.

    A run resumed from a folder that was moved or renamed keeps writing ``last.ckpt`` there (Lightning would
    forget the stored file names when ``dirpath`` differs and write ``last-v1.ckpt`` beside the old one): the
    stored paths are read as paths in the new folder (:func:`moved_checkpoint_state`).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("dirpath")
        if stored and self.dirpath and stored != self.dirpath:
            state_dict = moved_checkpoint_state(state_dict, self.dirpath)
        super().load_state_dict(state_dict)

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._save_final(trainer)

    def on_exception(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save_final(trainer)

    def _save_final(self, trainer: lightning.Trainer) -> None:
        if trainer.global_step == 0 or self._last_global_step_saved == trainer.global_step:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = trainer.global_step


class ValidateFinalStep(lightning.Callback):
    """Validates the weights a fit ends with; :attr:`step` is the meta-step of the latest validation (None before one).

    Lightning validates every ``val_check_interval`` meta-steps, so a fit of 12 meta-steps with an
    interval of 5 would report the validation of step 10 beside the weights of step 12. At the last
    meta-step this asks Lightning to stop, which makes its loop validate then, as it does when
    ``trainer.max_time`` stops a run; a step that is due for validation anyway is validated once.
    """

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, *args: Any) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


def moved_checkpoint_state(state: dict[str, Any], dirpath: str) -> dict[str, Any]:
    """Returns a ``ModelCheckpoint`` state with the files it names in its stored ``dirpath`` named in ``dirpath`` instead.

    >>> moved_checkpoint_state({"dirpath": "/a/ckpt", "last_model_path": "/a/ckpt/last.ckpt", "best_k_models": {}}, "/b/ckpt")
    {'dirpath': '/b/ckpt', 'last_model_path': '/b/ckpt/last.ckpt', 'best_k_models': {}}
    """
    old = Path(state["dirpath"])

    def moved(path: Any) -> Any:
        return str(Path(dirpath) / Path(path).name) if isinstance(path, str) and path and Path(path).parent == old else path

    updated = {**state, "dirpath": dirpath, **{k: moved(state[k]) for k in _PATH_KEYS if k in state}}
    if isinstance(state.get("best_k_models"), dict):
        updated["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}
    return updated


# a scheduler's state that counts its progress; the rest is its configuration (T_max, total_iters, gamma, ...)
_PROGRESS = frozenset({"last_epoch", "_step_count", "_last_lr", "base_lrs", "_get_lr_called_within_step", "_is_initial", "verbose"})


def _settings(state: Any) -> Any:
    """Returns a scheduler state without its progress: what its configuration set (nested schedulers too)."""
    if isinstance(state, dict):
        return {k: _settings(v) for k, v in state.items() if k not in _PROGRESS}
    if isinstance(state, (list, tuple)):
        return [_settings(v) for v in state]
    return state


def continued_schedule(
    factory: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
    stored: dict[str, Any],
    base_lrs: Sequence[float],
) -> tuple[dict[str, Any], list[float], dict[str, tuple[Any, Any]]] | None:
    """Returns (scheduler state, learning rates, changed settings) of the schedule ``factory`` defines, at the stored step.

    ``stored`` is the state a checkpoint restored; ``base_lrs`` the initial learning rate of each parameter
    group. When ``factory`` configures the schedule as ``stored`` does, returns None. Otherwise the schedule
    ``factory`` builds is run from the start to the stored step (``last_epoch``) on a stand-in optimizer: its
    state and learning rates are those an uninterrupted run of this configuration would have there.
    """
    params = [torch.zeros(1) for _ in base_lrs]
    stand_in = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)])
    schedule = factory(stand_in)
    configured, restored = _settings(schedule.state_dict()), _settings(stored)
    if configured == restored:
        return None
    changed = {k: (restored.get(k), v) for k, v in configured.items() if restored.get(k) != v}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": the stand-in never steps
        for _ in range(int(stored.get("last_epoch", 0))):
            schedule.step()
    return schedule.state_dict(), [group["lr"] for group in stand_in.param_groups], changed


class ContinueSchedule(lightning.Callback):
    """Makes a resumed fit follow the learning-rate schedule its configuration defines, from the step it reached.

    Lightning restores a scheduler's whole state from the checkpoint, its horizon included: resumed with a larger
    ``trainer.max_steps``, a linear decay stays at 0 and a cosine climbs back. When the module's ``scheduler``
    factory (metaloop's modules take one) configures the schedule otherwise than the checkpoint stored it, the
    schedule and the outer learning rates become those of an uninterrupted run of this configuration at the
    reached step (:func:`continued_schedule`), and one line says so.
    """

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        factory = getattr(pl_module, "scheduler", None)
        if trainer.ckpt_path is None or not callable(factory) or len(trainer.lr_scheduler_configs) != 1:
            return
        restored = trainer.lr_scheduler_configs[0].scheduler
        continued = continued_schedule(factory, restored.state_dict(), list(restored.base_lrs))
        if continued is None:
            return
        state, lrs, changed = continued
        restored.load_state_dict(state)
        for group, lr in zip(restored.optimizer.param_groups, lrs):
            group["lr"] = lr
        if trainer.is_global_zero:
            shown = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            logging.getLogger(__name__).info(
                f"resumed at meta-step {trainer.global_step}: the learning-rate schedule follows this configuration "
                f"({type(restored).__name__} {shown}) from there, not the checkpoint's; outer lr now {lrs[0]:.4g}"
            )


class MetaStepTimer(lightning.Callback):
    """Measures meta-training speed as a user sees it: :attr:`rate` is meta-steps per second of training.

    Each meta-step counts from the end of the previous one to its own end (task sampling, the
    step, logging and every callback), so start-up and the first meta-step (warm-up) are left
    out, and so is the time of validation runs between meta-steps. :attr:`durations` keeps each
    counted meta-step's seconds (benchmarks report their median).
    """

    def __init__(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self.durations: list[float] = []
        self._since: float | None = None
        self._paused_at: float | None = None

    @property
    def rate(self) -> float:
        """Returns meta-steps per second after the first one (NaN before two meta-steps)."""
        return self.steps / self.seconds if self.seconds > 0 else float("nan")

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        if self._since is not None:
            self.steps += 1
            self.seconds += now - self._since
            self.durations.append(now - self._since)
        self._since = now

    def on_validation_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if self._paused_at is not None and self._since is not None:
            self._since += time.perf_counter() - self._paused_at
        self._paused_at = None
