"""The LightningDataModule that serves meta-batches of tasks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning
from torch.utils.data import DataLoader

from metaloop.tasks.episodes import Task, TaskList, TaskSource, TaskStream

__all__ = ["MetaDataModule"]


class _StreamLoader(DataLoader):
    """Returns a DataLoader over a :class:`TaskStream` that starts every pass at ``position()``.

    Workers receive the dataset when ``__iter__`` starts them, so setting ``start`` just before
    reaches every worker; this is why the loader offers no persistent workers.
    """

    def __init__(self, dataset: TaskStream, position: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.position = position

    def __iter__(self) -> Iterator[Task]:  # type: ignore[override]
        self.dataset.start = self.position()  # type: ignore[attr-defined]
        return super().__iter__()


class MetaDataModule(lightning.LightningDataModule):
    """Returns meta-batches of tasks from ``tasks``: an endless training stream, fixed validation and test sets.

    Every loader yields :class:`~metaloop.tasks.Task` meta-batches (fields with a leading task
    dimension); every task is a pure function of ``(seed, split, stream, index)``
    (:func:`~metaloop.tasks.task_seed`), so the numbers of workers and the process's start do not
    change which tasks come out.

    - Training: meta-batch ``i`` holds tasks ``i*meta_batch_size ...`` of stream ``global_rank``, so
      DDP ranks draw different tasks. The stream is endless: train by steps
      (``Trainer(max_steps=..., val_check_interval=<int>, check_val_every_n_epoch=None)``), or cut
      epochs with ``limit_train_batches``. Each pass over the loader starts at the number of
      meta-batches the trainer has already run, which Lightning restores from a checkpoint: resuming
      with ``ckpt_path="last"`` continues with exactly the tasks an uninterrupted run would have seen
      (given the same seed and number of ranks), and later epochs never repeat earlier ones.
    - Validation and test: the first ``num_val_tasks`` / ``num_test_tasks`` tasks of their split, in
      meta-batches of ``eval_meta_batch_size`` (the last may be smaller), the same at every
      evaluation. Under DDP, rank ``r`` scores meta-batches ``r, r + world_size, ...``: every task
      once, none twice (ranks may get one meta-batch more or less than others). ``0`` tasks turns
      that evaluation off.

    Args:
        tasks: a task source (:class:`~metaloop.tasks.TaskSource`): an
            :class:`~metaloop.tasks.EpisodeSampler`, :class:`~metaloop.tasks.SinusoidTasks`, or any
            callable ``(split, generator) -> (support_x, support_y, query_x, query_y)``. From a Hydra
            config, a nested ``_target_`` (with ``_partial_: true`` for a plain function).
        seed: the seed of every task stream and evaluation set.
    """

    def __init__(
        self,
        tasks: TaskSource,
        meta_batch_size: int = 32,
        eval_meta_batch_size: int = 32,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        for name, value, least in [
            ("meta_batch_size", meta_batch_size, 1),
            ("eval_meta_batch_size", eval_meta_batch_size, 1),
            ("num_val_tasks", num_val_tasks, 0),
            ("num_test_tasks", num_test_tasks, 0),
            ("num_workers", num_workers, 0),
        ]:
            if value < least:
                raise ValueError(f"{name}={value} must be at least {least}; pass a larger value")
        num_classes = getattr(tasks, "num_classes", None)  # an EpisodeSampler says which splits have classes
        for split, count in (("val", num_val_tasks), ("test", num_test_tasks)):
            if count and num_classes is not None and num_classes(split) == 0:
                raise ValueError(
                    f"num_{split}_tasks={count} but the task source's split {split!r} has no classes;"
                    f" set num_{split}_tasks=0 (task.num_{split}_tasks=0) or give {split!r} classes in its splits"
                )
        self.tasks, self.seed = tasks, seed
        self.meta_batch_size, self.eval_meta_batch_size = meta_batch_size, eval_meta_batch_size
        self.num_val_tasks, self.num_test_tasks = num_val_tasks, num_test_tasks
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def _rank(self) -> tuple[int, int]:
        """Returns (global rank, world size) of the attached trainer; (0, 1) without one."""
        return (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)

    def _trained_meta_batches(self) -> int:
        """Returns how many training meta-batches the attached trainer has run, counting a restored checkpoint's; 0 without one."""
        return 0 if self.trainer is None else self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def train_dataloader(self) -> DataLoader:
        stream = TaskStream(self.tasks, "train", self.meta_batch_size, self.seed, stream=self._rank()[0])
        return _StreamLoader(
            stream, self._trained_meta_batches, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loader("val", self.num_val_tasks)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loader("test", self.num_test_tasks)

    def _eval_loader(self, split: str, num_tasks: int) -> DataLoader | list[DataLoader]:
        if num_tasks == 0:
            return []
        rank, world_size = self._rank()
        tasks = TaskList(self.tasks, split, num_tasks, self.eval_meta_batch_size, self.seed, rank, world_size)
        return DataLoader(tasks, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
