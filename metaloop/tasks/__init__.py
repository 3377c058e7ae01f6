"""Tasks for meta-learning, independent of Lightning: episodic samplers, Omniglot, the few-shot image benchmarks, sinusoid regression.

A task source is any callable ``source(split, generator) -> Task`` (:class:`TaskSource`);
:func:`sample_meta_batch`, :class:`TaskStream` and :class:`TaskList` turn one into reproducible
meta-batches, and ``metaloop.lightning.MetaDataModule`` serves them to a Trainer.
"""

from __future__ import annotations

from metaloop.tasks.episodes import (
    SPLITS,
    EpisodeSampler,
    Task,
    TaskList,
    TaskSource,
    TaskStream,
    labelled_tensors,
    sample_meta_batch,
    sample_task,
    split_groups,
    stack_tasks,
    task_seed,
)
from metaloop.tasks.image_benchmarks import BENCHMARKS, FewShotImages, read_split
from metaloop.tasks.omniglot import Omniglot
from metaloop.tasks.pickles import load_pickle
from metaloop.tasks.sinusoid import SinusoidTasks

__all__ = [
    "BENCHMARKS",
    "SPLITS",
    "FewShotImages",
    "load_pickle",
    "read_split",
    "EpisodeSampler",
    "Omniglot",
    "SinusoidTasks",
    "Task",
    "TaskList",
    "TaskSource",
    "TaskStream",
    "labelled_tensors",
    "sample_meta_batch",
    "sample_task",
    "split_groups",
    "stack_tasks",
    "task_seed",
]
