"""What the ``metaloop`` command shows and records: a progress bar of meta-steps, and at the end a learning-curve plot,
a summary table, and the run's record: ``results.json`` for a fit, ``evaluations/<command>-<time>.json`` for each
``validate`` or ``test`` (which never touch the fit's ``results.json``). Records are strict JSON.

Every logger (``logger=csv|tensorboard|mlflow|wandb``) gets the run's composed config as hyperparameters
(:class:`LogRunConfig`) and, at the end, the final results (:func:`log_results`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import RichProgressBar, Timer
from lightning.pytorch.loggers import Logger
from rich.console import Console
from rich.table import Table

from metaloop.lightning.callbacks import MetaStepTimer

__all__ = [
    "EVALUATIONS", "RESULTS", "LearningCurve", "LogRunConfig", "MetaStepProgressBar", "clock", "latest_record",
    "log_results", "print_summary", "remaining_seconds", "resolved_choices", "write_evaluation", "write_results",
]

RESULTS = "results.json"  # a fit's record, in its run folder
EVALUATIONS = "evaluations"  # the folder of a run's evaluation records: <command>-<time>.json


class MetaStepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting meta-steps of ``max_steps`` ("meta-step 120/2000").

    The task stream is endless, so Lightning's own bar, which counts batches of an epoch out of
    ``max_epochs``, shows "Epoch 0/-2". The bar and its metrics are redrawn at most every
    ``min_interval`` seconds (and at the last meta-step); ``kwargs`` go to ``RichProgressBar``.
    """

    def __init__(self, min_interval: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_interval = min_interval
        self._shown_at = -math.inf

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "meta-step"

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._started = (time.monotonic(), trainer.global_step)

    def get_metrics(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        """Returns the bar's metrics with ``ends in``: the run's estimated remaining time (see :func:`remaining_seconds`)."""
        items = super().get_metrics(trainer, pl_module)
        started = getattr(self, "_started", None)
        if started is not None and trainer.training:
            timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
            left = remaining_seconds(
                trainer.global_step - started[1], trainer.max_steps - trainer.global_step if trainer.max_steps > 0 else None,
                time.monotonic() - started[0], timer.time_remaining() if timer is not None else None,
            )
            if left is not None:
                items["ends in"] = clock(left)
        return items


def remaining_seconds(done: int, to_do: int | None, elapsed: float, time_left: float | None) -> float | None:
    """Returns the estimated seconds until the run ends: ``to_do`` more meta-steps at the rate of the ``done`` ones, or ``time_left``, whichever is sooner.

    ``elapsed`` is the wall time of the ``done`` meta-steps, validation included (it recurs until the end);
    ``to_do`` is None without ``trainer.max_steps``, ``time_left`` None without ``trainer.max_time``.
    None when neither bounds the run or nothing is done yet.

    >>> remaining_seconds(10, 90, 5.0, None)
    45.0
    >>> remaining_seconds(10, 90, 5.0, 30.0)
    30.0
    >>> remaining_seconds(0, 90, 0.0, None) is None
    True
    """
    estimates = [] if done <= 0 or to_do is None else [max(to_do, 0) * elapsed / done]
    if time_left is not None:
        estimates.append(max(time_left, 0.0))
    return min(estimates) if estimates else None


def clock(seconds: float) -> str:
    """Returns ``seconds`` as ``H:MM:SS`` (``M:SS`` under an hour).

    >>> clock(3725.2), clock(59.6)
    ('1:02:05', '1:00')
    """
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

    def on_train_epoch_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, *args: Any) -> None:
        now = time.monotonic()
        if now - self._shown_at < self.min_interval and trainer.global_step < trainer.max_steps:
            return  # a fast run (100 meta-steps/s) would spend a tenth of its time redrawing the bar
        self._shown_at = now
        super().on_train_batch_end(trainer, pl_module, *args)
        self._update(self.train_progress_bar_id, trainer.global_step)


class LearningCurve(lightning.Callback):
    """Saves a PNG of meta-training and validation metrics against meta-steps when fitting ends.

    One panel per metric that is logged both as ``train/<name>`` and ``val/<name>_post``
    (classification: accuracy and loss; regression: loss): the training value of every meta-step
    and the post-adaptation validation mean with its 95% confidence band. The recorded points are
    part of the checkpoint, so a resumed run plots its whole history.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.train: dict[str, list[tuple[int, float]]] = {}
        self.val: dict[str, list[tuple[int, float, float]]] = {}

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, *args: Any) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train/"):
                self.train.setdefault(key[len("train/"):], []).append((trainer.global_step, float(value)))

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        # not on_validation_epoch_end: callbacks run that hook before the module logs its epoch metrics
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        for key, value in metrics.items():
            if key.startswith("val/") and key.endswith("_post"):
                ci = metrics.get(f"{key}_ci95")
                name = key[len("val/"):-len("_post")]
                self.val.setdefault(name, []).append((trainer.global_step, float(value), float(ci) if ci is not None else 0.0))

    def on_fit_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.is_global_zero:
            self.save()

    def save(self) -> Path | None:
        """Returns the path of the written PNG, or None when there is nothing to plot."""
        names = [n for n in self.train if n in self.val] or list(self.train)
        if not names:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
        for ax, name in zip(axes[0], names):
            steps, values = zip(*self.train[name])
            ax.plot(steps, values, color="tab:blue", alpha=0.35, label="meta-train (query, per step)")
            window = max(1, len(values) // 20)
            if window > 1:
                smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
                ax.plot(steps, smooth, color="tab:blue", label=f"meta-train (mean of {window})")
            if name in self.val:
                vsteps, means, cis = zip(*self.val[name])
                ax.errorbar(vsteps, means, yerr=cis, color="tab:orange", marker="o", capsize=3, label="validation (post-adaptation, 95% CI)")
            ax.set_xlabel("meta-step")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.path, dpi=100)
        plt.close(fig)
        return self.path

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = {k: [tuple(p) for p in v] for k, v in state_dict["train"].items()}
        self.val = {k: [tuple(p) for p in v] for k, v in state_dict["val"].items()}


def _format(results: dict[str, float], key: str) -> str | None:
    if key not in results:
        return None
    value, ci = results[key], results.get(f"{key}_ci95")
    scale, unit = (100.0, "%") if key.split("/")[-1].startswith("acc") else (1.0, "")
    text = f"{value * scale:.2f}{unit}" if scale != 1 else f"{value:.4f}"
    if ci is not None and math.isfinite(ci):
        text += f" ± {ci * scale:.2f}{unit}" if scale != 1 else f" ± {ci:.4f}"
    return text


def print_summary(
    cfg: Any,
    trainer: lightning.Trainer,
    results: dict[str, float],
    timings: dict[str, float],
    run_dir: str | Path,
    evaluated: str | None = None,
) -> None:
    """Prints a table of the run: where, how long (``timings``: seconds per command), the meta-step rate, the final metrics.

    ``evaluated`` says which weights the figures are of (e.g. "meta-step 12", or a checkpoint and its step).
    """
    table = Table(box=None, title=f"metaloop {cfg.command}: {cfg.recipe}", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("run folder", str(run_dir))
    table.add_row("resolved", resolved_choices(trainer))
    if evaluated:
        table.add_row("evaluated", evaluated)
    for command, seconds in timings.items():
        table.add_row(f"{command} time", f"{seconds:.1f} s")
    if "fit" in timings:
        steps = trainer.global_step
        rate = steps / timings["fit"] if timings["fit"] > 0 else float("nan")
        training = next((f"{c.rate:.2f}/s training, " for c in trainer.callbacks if isinstance(c, MetaStepTimer) and c.steps), "")
        table.add_row("meta-steps", f"{steps} ({training}{rate:.2f}/s incl. validation; meta-batch {cfg.task.meta_batch_size} per rank)")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in ("train/loss", "train/acc"):
        if key in metrics:
            table.add_row(f"last {key}", _format(metrics, key) or "")
    for stage in ("val", "test"):
        source = results if any(k.startswith(f"{stage}/") for k in results) else metrics
        for name in ("acc", "loss"):
            for when in ("pre", "post"):
                text = _format(source, f"{stage}/{name}_{when}")
                if text is not None:
                    table.add_row(f"{stage} {name} {when}-adaptation", text)
    for callback in trainer.callbacks:
        if isinstance(callback, LearningCurve) and callback.path.exists():
            table.add_row("learning curve", str(callback.path))
        best = getattr(callback, "last_model_path", None)
        if best:
            table.add_row("last checkpoint", str(best))
    Console().print(table)


def resolved_choices(trainer: lightning.Trainer) -> str:
    """Returns what the host-dependent ``auto`` choices became for this run: precision, memory format, task batching.

    ``trainer.precision=auto``, ``memory_format=auto`` and ``batch_tasks=auto`` depend on the device and,
    on CPUs, on bfloat16 hardware (AVX-512 BF16 or AMX); the summary names the outcome so a run says which
    path it took.
    """
    module = trainer.lightning_module
    parts = [f"precision {trainer.precision}"]
    memory_format = getattr(module, "_input_format", None)
    if memory_format is not None:
        parts.append(f"memory format {'channels-last' if memory_format is torch.channels_last else 'contiguous'}")
    batching = getattr(module, "batching", None)
    if batching is not None:
        parts.append("tasks " + {"vmap": "vmapped", "fold": "folded into channels"}.get(batching, "one by one"))
    return ", ".join(parts) + f" on {trainer.strategy.root_device.type}"


def _finite_or_null(value: Any) -> Any:
    """Returns ``value`` with every non-finite float replaced by None (JSON null), in nested dicts too."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json(record: dict[str, Any]) -> str:
    """Returns ``record`` as strict JSON: a non-finite number (a confidence half-width of one task) is null, never ``NaN``."""
    return json.dumps(_finite_or_null(record), indent=1, allow_nan=False)


def write_results(
    results: dict[str, float],
    global_step: int,
    timings: dict[str, float],
    run_dir: str | Path,
    meta_steps_per_s: float | None = None,
    validation_step: int | None = None,
) -> Path:
    """Returns the path of ``results.json`` in ``run_dir`` after writing the fit's final metrics, meta-steps and timings.

    ``meta_steps_per_s`` is the training rate of :class:`~metaloop.lightning.callbacks.MetaStepTimer` (null
    without one); ``validation_step`` the meta-step whose weights the ``val/`` figures are of (the test
    after a fit is of ``global_step``). Strict JSON: a number that is undefined (the confidence half-width of
    a single task) is null. What a sweep reads back from each job (:mod:`metaloop.cli.sweep`); call it on rank 0 only.
    """
    path = Path(run_dir) / RESULTS
    record = {
        "command": "fit", "metrics": results, "global_step": global_step, "validation_step": validation_step,
        "timings": timings, "meta_steps_per_s": meta_steps_per_s,
    }
    path.write_text(_json(record))
    return path


def write_evaluation(
    command: str,
    results: dict[str, float],
    checkpoint: str | None,
    checkpoint_step: int | None,
    timings: dict[str, float],
    run_dir: str | Path,
) -> Path:
    """Returns the path of a new ``evaluations/<command>-<time>.json`` in ``run_dir`` after writing the evaluation's record.

    The record names the checkpoint evaluated (None: the untrained model) and its meta-step; a fit's
    ``results.json`` in the same folder is left as it is. Strict JSON, as :func:`write_results`.
    """
    folder = Path(run_dir) / EVALUATIONS
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{command}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    record = {
        "command": command, "metrics": results, "checkpoint": checkpoint, "checkpoint_step": checkpoint_step,
        "timings": timings,
    }
    text = _json(record)
    for n in range(1, 1000):
        path = folder / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
        try:
            with open(path, "x") as f:  # never replaces an earlier evaluation's record
                f.write(text)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder} holds 999 records named {stem}*.json; remove some")


def latest_record(run_dir: str | Path, command: str, since: float = 0.0) -> Path | None:
    """Returns the record ``command`` last wrote in ``run_dir`` at or after ``since`` (a Unix time), or None.

    A fit's is ``results.json``; an evaluation's the newest ``evaluations/<command>-*.json``.
    """
    folder = Path(run_dir)
    candidates = [folder / RESULTS] if command == "fit" else list((folder / EVALUATIONS).glob(f"{command}-*.json"))
    written = [(p.stat().st_mtime, p) for p in candidates if p.is_file() and p.stat().st_mtime >= since]
    return max(written)[1] if written else None


class LogRunConfig(lightning.Callback):
    """Gives every logger of the trainer the run's composed ``config`` (a resolved, nested dict) as hyperparameters, once.

    Lightning logs only the module's own hyperparameters; trackers (MLflow params, W&B config) then
    hold the whole run: recipe, task, model, optimizers, trainer, seed.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self._logged = False

    def setup(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        if self._logged:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)
        self._logged = True


def log_results(
    loggers: Sequence[Logger], results: Mapping[str, float], global_step: int, meta_steps_per_s: float | None = None
) -> None:
    """Logs the run's final results (what :func:`write_results` writes) to each logger as ``results/<metric>`` at ``global_step``; rank 0 only."""
    # finite values only: a tracker may refuse NaN (the confidence half-width of a single task)
    metrics = {f"results/{name}": float(value) for name, value in results.items() if math.isfinite(float(value))}
    if meta_steps_per_s is not None:
        metrics["results/meta_steps_per_s"] = float(meta_steps_per_s)
    for logger in loggers:
        logger.log_metrics(metrics, step=global_step)
        logger.save()
