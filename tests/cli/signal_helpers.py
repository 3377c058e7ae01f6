"""Callbacks the DDP signal and timeout tests name in Hydra overrides (importable as ``signal_helpers``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning


class StepMarker(lightning.Callback):
    """Writes ``PID STEP`` to ``folder/rank<R>`` after each meta-step, so a test knows each rank's process and progress."""

    def __init__(self, folder: str, pause: float = 0.0) -> None:
        self.folder = Path(folder)
        self.pause = pause

    def on_train_batch_end(self, trainer: lightning.Trainer, *args: object) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / f"rank{trainer.global_rank}"
        marker.with_suffix(".tmp").write_text(f"{os.getpid()} {trainer.global_step}")
        marker.with_suffix(".tmp").replace(marker)
        time.sleep(self.pause)


class StallAt(lightning.Callback):
    """On rank ``rank``, after meta-step ``step``: sleeps forever (``error`` null) or raises ValueError(``error``)."""

    def __init__(self, rank: int, step: int, error: str | None = None) -> None:
        self.rank, self.step, self.error = rank, step, error

    def on_train_batch_end(self, trainer: lightning.Trainer, *args: object) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        if self.error is not None:
            raise ValueError(self.error)
        while True:
            time.sleep(1)
