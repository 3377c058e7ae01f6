"""learn2learn's ``learn2learn.utils.lightning``: ``EpisodicBatcher``, a LightningDataModule over task samplers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import lightning

__all__ = ["EpisodicBatcher", "Epochifier"]


class TaskSampler(Protocol):
    """Anything with ``sample()`` returning one episode, e.g. a learn2learn ``Taskset``."""

    def sample(self) -> Any: ...


class Epochifier:
    """An iterable of ``length`` episodes, each a fresh ``tasks.sample()``: one Lightning epoch."""

    def __init__(self, tasks: TaskSampler, length: int) -> None:
        self.tasks = tasks
        self.length = length

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.length:
            raise IndexError(f"episode {index} is outside this epoch of {self.length}")
        return self.tasks.sample()

    def __iter__(self) -> Iterator[Any]:
        return (self.tasks.sample() for _ in range(self.length))

    def __len__(self) -> int:
        return self.length


class EpisodicBatcher(lightning.LightningDataModule):
    """Serves ``epoch_length`` episodes per epoch from each task sampler (``sample()``), one episode per batch.

    ``validation_tasks`` defaults to ``train_tasks`` and ``test_tasks`` to ``validation_tasks``,
    as in learn2learn.

    Raises:
        TypeError: if a sampler has no ``sample()``; ValueError: if ``epoch_length < 1``.
    """

    def __init__(
        self,
        train_tasks: TaskSampler,
        validation_tasks: TaskSampler | None = None,
        test_tasks: TaskSampler | None = None,
        epoch_length: int = 1,
    ) -> None:
        super().__init__()
        validation_tasks = train_tasks if validation_tasks is None else validation_tasks
        test_tasks = validation_tasks if test_tasks is None else test_tasks
        for name, tasks in (("train_tasks", train_tasks), ("validation_tasks", validation_tasks), ("test_tasks", test_tasks)):
            if not callable(getattr(tasks, "sample", None)):
                raise TypeError(f"{name} is a {type(tasks).__name__} without sample(); pass a learn2learn Taskset")
        if epoch_length < 1:
            raise ValueError(f"epoch_length={epoch_length} must be at least 1 episode")
        self.train_tasks = train_tasks
        self.validation_tasks = validation_tasks
        self.test_tasks = test_tasks
        self.epoch_length = epoch_length

    @staticmethod
    def epochify(taskset: TaskSampler, epoch_length: int) -> Epochifier:
        """Returns ``epoch_length`` episodes of ``taskset`` as one epoch."""
        return Epochifier(taskset, epoch_length)

    def train_dataloader(self) -> Epochifier:
        return self.epochify(self.train_tasks, self.epoch_length)

    def val_dataloader(self) -> Epochifier:
        return self.epochify(self.validation_tasks, self.epoch_length)

    def test_dataloader(self) -> Epochifier:
        return self.epochify(self.test_tasks, self.epoch_length)
