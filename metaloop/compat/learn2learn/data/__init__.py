"""learn2learn's ``learn2learn.data``: meta-datasets, tasksets and task transforms, in pure Python and torch.

``l2l.data.MetaDataset(dataset)`` indexes a classification dataset by label;
``l2l.data.Taskset(dataset, task_transforms=[NWays(dataset, 5), KShots(dataset, 1), LoadData(dataset),
RemapLabels(dataset)], num_tasks=-1)`` then draws 5-way 1-shot tasks. For seeded, worker-independent
meta-batches on the native side use :class:`metaloop.tasks.EpisodeSampler` (``benchmarks/l2l_data.py``
compares the two).
"""

from __future__ import annotations

from metaloop.compat.learn2learn.data import transforms, utils
from metaloop.compat.learn2learn.data.meta_dataset import FilteredMetaDataset, MetaDataset, UnionMetaDataset
from metaloop.compat.learn2learn.data.task_dataset import DataDescription, TaskDataset, Taskset
from metaloop.compat.learn2learn.data.utils import InfiniteIterator, OnDeviceDataset, partition_task

__all__ = [
    "transforms",
    "utils",
    "MetaDataset",
    "UnionMetaDataset",
    "FilteredMetaDataset",
    "Taskset",
    "TaskDataset",
    "DataDescription",
    "partition_task",
    "InfiniteIterator",
    "OnDeviceDataset",
]
