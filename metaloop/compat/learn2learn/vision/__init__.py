"""learn2learn's ``learn2learn.vision``: ``models``, ``datasets``, ``transforms`` and ``benchmarks``, without torchvision.

Models are :mod:`metaloop.nn.vision`; datasets read the benchmarks' published files through
:mod:`metaloop.tasks.image_benchmarks`; image transforms are plain torch
(:mod:`metaloop.tasks.image_transforms`), and torchvision's are accepted wherever a transform is.
"""

from __future__ import annotations

from metaloop.compat.learn2learn.vision import benchmarks, datasets, models, transforms

__all__ = ["benchmarks", "datasets", "models", "transforms"]
