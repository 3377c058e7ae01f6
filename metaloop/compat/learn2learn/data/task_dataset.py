"""learn2learn's ``Taskset`` (alias ``TaskDataset``) and ``DataDescription``: tasks drawn by composing task transforms.

A *task description* is a list of :class:`DataDescription`, one per sample of the task: the
sample's index in the dataset and the functions that turn that index into data (``LoadData``
appends the loading, ``RemapLabels`` the relabelling). Task transforms
(:mod:`metaloop.compat.learn2learn.data.transforms`) map a description, or ``None`` for "every
sample", to a new one; the taskset runs each sample's functions and collates the results.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from metaloop.compat.learn2learn.data.meta_dataset import MetaDataset

__all__ = ["DataDescription", "TaskDescription", "Taskset", "TaskDataset"]


class DataDescription:
    """Describes one sample of a task: its ``index`` in the dataset and the ``transforms`` that turn the index into data."""

    __slots__ = ("index", "transforms")

    def __init__(self, index: int) -> None:
        self.index = index
        self.transforms: list[Callable[[Any], Any]] = []

    def copy(self) -> DataDescription:
        """Returns a description of the same sample with its own copy of the transform list."""
        twin = DataDescription(self.index)
        twin.transforms = list(self.transforms)
        return twin

    def __repr__(self) -> str:
        return f"DataDescription(index={self.index}, transforms={len(self.transforms)})"


TaskDescription = list[DataDescription]
TransformFn = Callable[[TaskDescription | None], TaskDescription]


class Taskset(Dataset):
    """Returns tasks of ``dataset``: ``task_collate`` of the samples that ``task_transforms`` describe.

    With ``num_tasks = n > 0`` the taskset holds ``n`` tasks: task ``i`` is described on first use
    and its description cached, so indexing ``i`` again (or iterating again) gives the same samples
    (random per-sample transforms such as data augmentation still draw anew). With
    ``num_tasks = -1`` every access describes a new task, ``len()`` is 1 and iteration never ends.
    Randomness comes from Python's ``random`` module, as in learn2learn: seed it for reproducible tasks.

    Args:
        dataset: the data; wrapped in a :class:`MetaDataset` unless it is one.
        task_transforms: a list of task transforms, applied in order starting from ``None``,
            or one callable that maps ``None`` to a description.
        num_tasks: the number of tasks, or -1 for an endless supply.
        task_collate: combines a task's samples; default ``torch``'s ``default_collate``
            (samples ``(x, y)`` become ``(X, Y)`` stacked tensors).

    Raises:
        ValueError: ``num_tasks`` is 0 or below -1.
    """

    def __init__(
        self,
        dataset: Dataset,
        task_transforms: Sequence[TransformFn] | TransformFn | None = None,
        num_tasks: int = -1,
        task_collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if num_tasks == 0 or num_tasks < -1:
            raise ValueError(f"num_tasks={num_tasks}: pass a positive number of tasks, or -1 for an endless supply")
        self.dataset = dataset if isinstance(dataset, MetaDataset) else MetaDataset(dataset)
        self.task_transforms = task_transforms if task_transforms is not None else []
        self.num_tasks = num_tasks
        self.task_collate = task_collate if task_collate is not None else default_collate
        self.sampled_descriptions: dict[int, TaskDescription] = {}
        self._task_id = 0

    def sample_task_description(self) -> TaskDescription:
        """Returns a new task description: the task transforms applied in turn, starting from ``None``."""
        if callable(self.task_transforms):
            return self.task_transforms(None)
        description: TaskDescription | None = None
        for transform in self.task_transforms:
            description = transform(description)
        if description is None:  # no transforms: the task is the whole dataset
            description = [DataDescription(i) for i in range(len(self.dataset))]
        return description

    def get_task(self, task_description: TaskDescription) -> Any:
        """Returns the collated data of ``task_description``: each sample's transforms run on its index."""
        samples = []
        for data_description in task_description:
            data: Any = data_description.index
            for transform in data_description.transforms:
                data = transform(data)
            samples.append(data)
        return self.task_collate(samples)

    def sample(self) -> Any:
        """Returns a task chosen at random among the ``num_tasks`` (a new one when ``num_tasks`` is -1)."""
        return self[random.randint(0, len(self) - 1)]

    def __len__(self) -> int:
        return 1 if self.num_tasks == -1 else self.num_tasks

    def __getitem__(self, i: int) -> Any:
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        if not -self.num_tasks <= i < self.num_tasks:
            raise IndexError(f"task {i} is out of range for a Taskset of num_tasks={self.num_tasks}")
        i %= self.num_tasks
        if i not in self.sampled_descriptions:
            self.sampled_descriptions[i] = self.sample_task_description()
        return self.get_task(self.sampled_descriptions[i])

    def __iter__(self) -> Iterator[Any]:
        self._task_id = 0
        return self

    def __next__(self) -> Any:
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        if self._task_id >= self.num_tasks:
            raise StopIteration
        self._task_id += 1
        return self[self._task_id - 1]

    def __add__(self, other: Any) -> Taskset:
        raise TypeError("Tasksets cannot be added; build one Taskset over a UnionMetaDataset of their datasets instead")


class TaskDataset(Taskset):
    """learn2learn's older name of :class:`Taskset` (deprecated there); the same class, with a one-time warning."""

    _warned = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not TaskDataset._warned:
            TaskDataset._warned = True
            warnings.warn("TaskDataset is deprecated, use Taskset instead.", DeprecationWarning, stacklevel=2)
