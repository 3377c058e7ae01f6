"""Helpers the CLI tests name in Hydra overrides (importable as ``cli_helpers``) or call."""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import lightning
import pytest

from metaloop.cli import main

# a few meta-steps on tiny meta-batches: enough to run every part of a recipe
TINY = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "task.meta_batch_size=2",
    "task.eval_meta_batch_size=2",
    "task.num_val_tasks=2",
    "task.num_test_tasks=2",
    "~callbacks.progress_bar",
]
# evaluation sets large enough for a confidence interval
SMALL_EVAL = ["task.num_val_tasks=4", "task.num_test_tasks=4", "task.eval_meta_batch_size=4"]


class CrashAt(lightning.Callback):
    """Raises at the start of meta-step ``step`` (1-based), as an interrupted run would stop."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: lightning.Trainer, *args: object) -> None:
        if trainer.global_step + 1 == self.step:
            raise RuntimeError(f"simulated crash at meta-step {self.step}")


def cli(*args: str) -> None:
    """Runs ``metaloop ARGS`` in this process; a non-zero exit fails the calling test."""
    try:
        main(list(args))
    except SystemExit as exit:
        pytest.fail(f"metaloop {' '.join(args)} exited with {exit.code!r}")


def cli_error(*args: str) -> str:
    """Returns the error message of ``metaloop ARGS``, which must exit non-zero."""
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    assert exit.value.code not in (0, None)
    return str(exit.value.code)


def metrics_file(run: Path) -> Path:
    """Returns the CSV logger's file of the run's latest version: ``run/logs/version_N/metrics.csv``."""
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1] / "metrics.csv"


def last_metrics(run: Path) -> dict[str, float]:
    """Returns the last logged value of every metric in the run's latest ``metrics.csv``."""
    values: dict[str, float] = {}
    with open(metrics_file(run)) as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


class SigtermAt(lightning.Callback):
    """Sends this process SIGTERM after meta-step ``step``, as a cluster scheduler ending a job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: lightning.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class WaitForFile(lightning.Callback):
    """Holds the run after its first meta-step until the file ``path`` exists (at most 5 minutes)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: lightning.Trainer, *args: object) -> None:
        for _ in range(3000):
            if os.path.exists(self.path):
                return
            time.sleep(0.1)
