"""Tasks for meta-learning, independent of Lightning: episodic samplers, Omniglot, the few-shot image benchmarks, sinusoid regression.

A task source is any callable ``source(split, generator) -> Task`` (:class:`TaskSource`);
:func:`sample_meta_batch`, :class:`TaskStream` and :class:`TaskList` turn one into reproducible
meta-batches, and ``metaloop.lightning.MetaDataModule`` serves them to a Trainer.
"""

from __future__ import annotations

from metaloop.tasks import episodes
from metaloop.tasks.episodes import *  # noqa: F403
from metaloop.tasks.image_benchmarks import BENCHMARKS, FewShotImages, read_split
from metaloop.tasks.omniglot import Omniglot
from metaloop.tasks.pickles import load_pickle
from metaloop.tasks.sinusoid import SinusoidTasks

__all__ = [
    *episodes.__all__,
    "BENCHMARKS",
    "FewShotImages",
    "load_pickle",
    "read_split",
    "Omniglot",
    "SinusoidTasks",
]
