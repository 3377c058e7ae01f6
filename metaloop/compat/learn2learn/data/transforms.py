"""learn2learn's task transforms: ``NWays``, ``KShots``, ``LoadData``, ``RemapLabels``, ``ConsecutiveLabels``, ``FilterLabels``, ``FusedNWaysKShots``.

Each is called on a task description (a list of
:class:`~metaloop.compat.learn2learn.data.task_dataset.DataDescription`) and returns a new one;
called on ``None`` it starts from every sample of the dataset (``NWays`` and
``FusedNWaysKShots`` start from only the samples they pick, which is what makes them fast).
They read labels from the dataset's ``indices_to_labels`` / ``labels_to_indices`` tables (a
:class:`~metaloop.compat.learn2learn.data.MetaDataset`) and draw from Python's ``random``.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Any

from metaloop.compat.learn2learn.data.task_dataset import DataDescription, TaskDescription

__all__ = [
    "TaskTransform",
    "DataDescription",
    "LoadData",
    "FilterLabels",
    "ConsecutiveLabels",
    "RemapLabels",
    "NWays",
    "KShots",
    "FusedNWaysKShots",
]


class TaskTransform:
    """Base of the task transforms over ``dataset``: ``new_task()`` describes every sample of it; subclasses define ``__call__``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def new_task(self) -> TaskDescription:
        """Returns the description of the task holding every sample of the dataset."""
        return [DataDescription(i) for i in range(len(self.dataset))]


def _check_count(name: str, value: int, least: int) -> None:
    if not isinstance(value, int) or value < least:
        raise ValueError(f"{name}={value!r} must be an integer of at least {least}")


def _label_of(sample: Any) -> Hashable:
    label = sample[1]
    return label.item() if hasattr(label, "item") else label


class LoadData(TaskTransform):
    """Appends the loading of each sample, ``dataset[index]``, to its transforms."""

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            task_description = self.new_task()
        load = self.dataset.__getitem__
        for data_description in task_description:
            data_description.transforms.append(load)
        return task_description


class FilterLabels(TaskTransform):
    """Keeps the samples whose label is in ``labels``."""

    def __init__(self, dataset: Any, labels: Sequence[Hashable]) -> None:
        super().__init__(dataset)
        self.labels = list(labels)
        kept = set(self.labels)
        self._kept_indices = frozenset(i for i, label in dataset.indices_to_labels.items() if label in kept)

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            return [DataDescription(i) for i in sorted(self._kept_indices)]
        return [dd for dd in task_description if dd.index in self._kept_indices]


class ConsecutiveLabels(TaskTransform):
    """Reorders the samples so that those of a label are consecutive (labels in sorted order, samples in their order).

    Before :class:`RemapLabels` the groups follow the original labels' order, so the remapped labels
    come out grouped but not in increasing order; after it, the data is not yet loaded and the order
    is that of the original labels too.
    """

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            task_description = self.new_task()
        labels = self.dataset.indices_to_labels
        return sorted(task_description, key=lambda dd: labels[dd.index])


class _Remap:
    """Replaces a loaded sample's label (position 1) by its position in ``labels``."""

    def __init__(self, labels: Sequence[Hashable]) -> None:
        self.position = {label: i for i, label in enumerate(labels)}

    def __call__(self, data: Any) -> list[Any]:
        data = list(data)
        data[1] = self.position[_label_of(data)]
        return data


class RemapLabels(TaskTransform):
    """Relabels the ``N`` labels present in the task ``0 .. N-1`` (in random order when ``shuffle``), once the data is loaded.

    Place it after :class:`LoadData`: it appends a function that rewrites the loaded sample's label.
    """

    def __init__(self, dataset: Any, shuffle: bool = True) -> None:
        super().__init__(dataset)
        self.shuffle = shuffle

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            task_description = self.new_task()
        labels_of = self.dataset.indices_to_labels
        labels = list(dict.fromkeys(labels_of[dd.index] for dd in task_description))
        if self.shuffle:
            random.shuffle(labels)
        remap = _Remap(labels)
        for dd in task_description:
            dd.transforms.append(remap)
        return task_description


class NWays(TaskTransform):
    """Keeps the samples of ``n`` labels drawn at random among those in the task (from the whole dataset on ``None``).

    Raises:
        ValueError: at construction when ``n`` is below 1 or exceeds the dataset's labels; when
            called on a task with fewer than ``n`` labels.
    """

    def __init__(self, dataset: Any, n: int = 2) -> None:
        super().__init__(dataset)
        _check_count("n", n, 1)
        if n > len(dataset.labels):
            raise ValueError(f"NWays n={n} exceeds the {len(dataset.labels)} labels of the dataset; lower n")
        self.n = n
        self.indices_to_labels = dataset.indices_to_labels

    def new_task(self) -> TaskDescription:
        classes = random.sample(self.dataset.labels, k=self.n)
        return [DataDescription(i) for label in classes for i in self.dataset.labels_to_indices[label]]

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            return self.new_task()
        labels_of = self.indices_to_labels
        present = list(dict.fromkeys(labels_of[dd.index] for dd in task_description))
        if self.n > len(present):
            raise ValueError(f"NWays n={self.n} exceeds the {len(present)} labels left in the task; lower n or filter less")
        chosen = set(random.sample(present, k=self.n))
        return [dd for dd in task_description if labels_of[dd.index] in chosen]


def _draw_shots(descriptions: list[DataDescription], k: int, replacement: bool, label: Hashable) -> list[DataDescription]:
    if replacement:
        return [dd.copy() for dd in random.choices(descriptions, k=k)]
    if k > len(descriptions):
        raise ValueError(
            f"KShots k={k} exceeds the {len(descriptions)} samples of label {label!r}; lower k or pass replacement=True"
        )
    return random.sample(descriptions, k=k)


class KShots(TaskTransform):
    """Keeps ``k`` random samples of each label in the task (drawn with replacement when ``replacement``), grouped by label."""

    def __init__(self, dataset: Any, k: int = 1, replacement: bool = False) -> None:
        super().__init__(dataset)
        _check_count("k", k, 1)
        self.k = k
        self.replacement = replacement

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            task_description = self.new_task()
        labels_of = self.dataset.indices_to_labels
        by_label: dict[Hashable, list[DataDescription]] = {}
        for dd in task_description:
            by_label.setdefault(labels_of[dd.index], []).append(dd)
        return [
            dd for label, dds in by_label.items() for dd in _draw_shots(dds, self.k, self.replacement, label)
        ]


class FusedNWaysKShots(TaskTransform):
    """``KShots(k) . NWays(n) . FilterLabels(filter_labels)`` in one step: ``n`` random labels, ``k`` samples of each.

    Called on ``None`` it draws the labels and samples straight from ``labels_to_indices`` without
    describing the whole dataset, which is what makes it fast; on a description, it applies the
    three transforms in turn.

    Raises:
        ValueError: ``n`` exceeds ``filter_labels`` (default: all labels), or, without
            replacement, ``k`` exceeds the samples of a label when it is drawn.
    """

    def __init__(
        self,
        dataset: Any,
        n: int = 2,
        k: int = 1,
        replacement: bool = False,
        filter_labels: Sequence[Hashable] | None = None,
    ) -> None:
        super().__init__(dataset)
        _check_count("n", n, 1)
        _check_count("k", k, 1)
        self.n, self.k, self.replacement = n, k, replacement
        self.filter_labels = list(filter_labels) if filter_labels is not None else list(dataset.labels)
        if n > len(self.filter_labels):
            raise ValueError(f"FusedNWaysKShots n={n} exceeds the {len(self.filter_labels)} labels to draw from; lower n")
        self.filter = FilterLabels(dataset, self.filter_labels)
        self.nways = NWays(dataset, n)
        self.kshots = KShots(dataset, k=k, replacement=replacement)

    def new_task(self) -> TaskDescription:
        task: TaskDescription = []
        for label in random.sample(self.filter_labels, k=self.n):
            indices = self.dataset.labels_to_indices[label]
            if self.replacement:
                chosen = random.choices(indices, k=self.k)
            elif self.k > len(indices):
                raise ValueError(
                    f"FusedNWaysKShots k={self.k} exceeds the {len(indices)} samples of label {label!r};"
                    " lower k or pass replacement=True"
                )
            else:
                chosen = random.sample(indices, k=self.k)
            task += [DataDescription(i) for i in chosen]
        return task

    def __call__(self, task_description: TaskDescription | None) -> TaskDescription:
        if task_description is None:
            return self.new_task()
        return self.kshots(self.nways(self.filter(task_description)))
