"""Shared fixtures for metaloop.tasks: a toy labelled dataset and the bundled Omniglot, decoded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from torch.utils.data import TensorDataset

from metaloop.tasks import Omniglot


class ToyImages(TensorDataset):
    """Returns ``classes * per_class`` random uint8 5x5 images (all distinct, as are their rotations), labelled by class.

    Labels are ``10 * class`` so samplers must remap them; ``class_groups["family"]`` puts four
    consecutive classes in a family, for group splits.
    """

    def __init__(self, classes: int = 24, per_class: int = 6, counts: list[int] | None = None) -> None:
        counts = counts if counts is not None else [per_class] * classes
        images = torch.randint(0, 256, (sum(counts), 1, 5, 5), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
        labels = torch.repeat_interleave(torch.arange(len(counts)) * 10, torch.tensor(counts))
        super().__init__(images, labels)
        self.class_names = {10 * c: f"char{c:02d}" for c in range(len(counts))}
        self.class_groups = {"family": {10 * c: f"family{c // 4}" for c in range(len(counts))}}


@pytest.fixture
def toy() -> ToyImages:
    return ToyImages()


@pytest.fixture
def make_toy() -> type[ToyImages]:
    return ToyImages


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder for the test session, shared by all pytest-xdist workers (their base temps share a parent)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "omniglot-cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture(scope="session")
def omniglot(omniglot_cache: Path) -> Omniglot:
    """The bundled Omniglot; the lock lets the first worker decode it and the others read its cache."""
    with FileLock(str(omniglot_cache.with_suffix(".lock"))):
        return Omniglot(cache_dir=omniglot_cache)
