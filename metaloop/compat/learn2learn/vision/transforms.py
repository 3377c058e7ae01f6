"""learn2learn's ``learn2learn.vision.transforms``: ``RandomClassRotation``."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Any

from metaloop.compat.learn2learn.data.task_dataset import TaskDescription
from metaloop.tasks.image_transforms import rotate

__all__ = ["RandomClassRotation"]


class _RotateSample:
    """Rotates a loaded sample's image (position 0) by ``degrees``."""

    def __init__(self, degrees: float) -> None:
        self.degrees = degrees

    def __call__(self, data: Any) -> tuple[Any, ...]:
        return (rotate(data[0], self.degrees), *tuple(data)[1:])


class RandomClassRotation:
    """A task transform: rotates all images of each class of the task by one angle drawn per class from ``degrees``.

    Place it after ``LoadData``. Images may be tensors ``(..., H, W)`` (quarter turns of square
    images are exact) or PIL images. Unlike learn2learn 0.2.x, where every sample of a task gets the
    rotation drawn for the task's last class (its lambda binds the loop variable late), each class
    keeps its own rotation, as the docstring there promises.
    """

    def __init__(self, dataset: Any, degrees: Sequence[float]) -> None:
        if not degrees:
            raise ValueError("degrees=[] must list at least one angle, e.g. [0, 90, 180, 270]")
        self.dataset = dataset
        self.degrees = list(degrees)

    def __call__(self, task_description: TaskDescription) -> TaskDescription:
        rotations: dict[Hashable, _RotateSample] = {}
        for data_description in task_description:
            label = self.dataset.indices_to_labels[data_description.index]
            if label not in rotations:
                rotations[label] = _RotateSample(random.choice(self.degrees))
            data_description.transforms.append(rotations[label])
        return task_description
