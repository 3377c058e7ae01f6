"""learn2learn's ``learn2learn.vision.benchmarks``: ``get_tasksets(name, ...)`` and ``list_tasksets()``.

``get_tasksets`` returns ``BenchmarkTasksets(train, validation, test)``, three
:class:`~metaloop.compat.learn2learn.data.Taskset` of N-way K-shot tasks (``train_samples`` /
``test_samples`` samples per class, to be split into support and query by the caller, as in
learn2learn's examples). ``"omniglot"`` reads the full set from ``root`` (or ``root/omniglot-py``),
downloading it unless ``download=False``; without it (offline, say) it falls back, with a warning,
to the minimal Omniglot splits bundled with metaloop. The others read the published files from
``root`` (see :mod:`metaloop.compat.learn2learn.vision.datasets`).

One deliberate difference: learn2learn 0.2.x's Omniglot tasksets draw the tasks of all three
splits from all 1,623 characters (their task transforms are built on the whole dataset); here each
split's tasks come from its own characters (1,100 / 100 / 423 of the full set, shuffled by
``random.Random(seed)``, ``seed=0`` unless given), so validation and test characters are never trained
on, and every process (a resumed run, an evaluation, another DDP rank) gets the same split.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, TensorDataset

from metaloop.compat.learn2learn.data import FilteredMetaDataset, MetaDataset, OnDeviceDataset, Taskset
from metaloop.compat.learn2learn.data.transforms import ConsecutiveLabels, FusedNWaysKShots, KShots, LoadData, NWays, RemapLabels
from metaloop.compat.learn2learn.vision.datasets import CIFARFS, FC100, MiniImagenet, TieredImagenet
from metaloop.compat.learn2learn.vision.transforms import RandomClassRotation
from metaloop.tasks.image_transforms import ColorJitter, Compose, Normalize, RandomCrop, RandomHorizontalFlip, ToTensor
from metaloop.tasks.omniglot import Omniglot

__all__ = ["BenchmarkTasksets", "get_tasksets", "list_tasksets"]


class BenchmarkTasksets(NamedTuple):
    """The tasksets of a benchmark's three splits."""

    train: Taskset
    validation: Taskset
    test: Taskset


Device = torch.device | str | None
Splits = tuple[Dataset, Dataset, Dataset]
Transforms = tuple[list[Any], list[Any], list[Any]]


def _episodes(dataset: MetaDataset, ways: int, samples: int, remap_last: bool = False) -> list[Any]:
    """NWays, KShots, LoadData, then RemapLabels and ConsecutiveLabels (in the other order when ``remap_last``, as learn2learn's validation sets)."""
    relabel = [ConsecutiveLabels(dataset), RemapLabels(dataset)] if remap_last else [RemapLabels(dataset), ConsecutiveLabels(dataset)]
    return [NWays(dataset, ways), KShots(dataset, samples), LoadData(dataset), *relabel]


def _omniglot_images(root: str, download: bool) -> Omniglot:
    folder = os.path.join(root, "omniglot-py") if os.path.isdir(os.path.join(root, "omniglot-py")) else root
    try:
        return Omniglot(root=folder, full=True, download=download)
    except FileNotFoundError as err:
        warnings.warn(
            f"the full Omniglot set is not in {folder} ({err}); using the minimal Omniglot splits bundled with metaloop"
            " (242 characters of 8 alphabets) instead, so accuracies are not comparable to the full benchmark's",
            stacklevel=4,  # the caller of get_tasksets
        )
        return Omniglot()


def omniglot_tasksets(
    train_ways: int, train_samples: int, test_ways: int, test_samples: int, root: str, device: Device = None,
    download: bool = True, seed: int = 0, **kwargs: Any,
) -> tuple[Splits, Transforms]:
    """Omniglot 28x28 (strokes 1 on 0), characters split 1100/100/423 (in proportion for the bundled set), each class rotated by a random quarter turn.

    The split is a function of ``seed`` alone (not of the global ``random`` state), the same in every process.
    """
    omniglot = _omniglot_images(root, download)
    images = omniglot.images.float().div_(255)
    targets = omniglot.targets
    if device is not None:
        images, targets = images.to(device), targets.to(device)
    dataset = MetaDataset(TensorDataset(images, targets))
    classes = sorted(dataset.labels)
    random.Random(seed).shuffle(classes)
    n_train, n_val = round(len(classes) * 1100 / 1623), round(len(classes) * 100 / 1623)
    splits = [classes[:n_train], classes[n_train : n_train + n_val], classes[n_train + n_val :]]
    datasets = tuple(FilteredMetaDataset(dataset, labels) for labels in splits)
    transforms = tuple(
        [
            FusedNWaysKShots(split, n=ways, k=samples),
            LoadData(split),
            RemapLabels(split),
            ConsecutiveLabels(split),
            RandomClassRotation(split, [0.0, 90.0, 180.0, 270.0]),
        ]
        for split, ways, samples in zip(datasets, (train_ways, test_ways, test_ways), (train_samples, test_samples, test_samples))
    )
    return datasets, transforms  # type: ignore[return-value]


def _augmentations(data_augmentation: str | None, scale: float) -> tuple[Callable[[Any], Any] | None, Callable[[Any], Any] | None]:
    """Returns (train, test) image transforms for learn2learn's ``data_augmentation`` names; images arrive in [0, ``scale``]."""
    if data_augmentation is None:
        return None, None
    to_unit = (lambda x: x / scale) if scale != 1 else (lambda x: x)
    if data_augmentation == "normalize":
        return to_unit, to_unit
    if data_augmentation == "lee2019":
        normalize = Normalize(
            mean=[120.39586422 / 255.0, 115.59361427 / 255.0, 104.54012653 / 255.0],
            std=[70.68188272 / 255.0, 68.27635443 / 255.0, 72.54505529 / 255.0],
        )
        train = Compose([to_unit, RandomCrop(84, padding=8), ColorJitter(0.4, 0.4, 0.4), RandomHorizontalFlip(), normalize])
        return train, Compose([to_unit, normalize])
    raise ValueError(f"data_augmentation={data_augmentation!r} must be None, 'normalize' or 'lee2019'")


def _on_device(datasets: list[Any], device: Device, transforms: tuple[Any, Any, Any]) -> Splits:
    """Sets each split's image transform; with a ``device``, first moves the split there as an OnDeviceDataset."""
    out = []
    for dataset, transform in zip(datasets, transforms):
        if device is None:
            if transform is not None:
                base = dataset.transform
                dataset.transform = transform if base is None else Compose([base, transform])
            out.append(dataset)
        else:
            out.append(OnDeviceDataset(dataset, device=device, transform=transform))
    return tuple(out)  # type: ignore[return-value]


def _image_tasksets(
    make: Callable[[str], Dataset], train_ways: int, train_samples: int, test_ways: int, test_samples: int,
    device: Device, augment: tuple[Any, Any],
) -> tuple[Splits, Transforms]:
    train, valid, test = _on_device([make(mode) for mode in ("train", "validation", "test")], device, (augment[0], augment[1], augment[1]))
    train, valid, test = MetaDataset(train), MetaDataset(valid), MetaDataset(test)
    transforms = (
        _episodes(train, train_ways, train_samples),
        _episodes(valid, test_ways, test_samples, remap_last=True),
        _episodes(test, test_ways, test_samples),
    )
    return (train, valid, test), transforms


def mini_imagenet_tasksets(
    train_ways: int = 5, train_samples: int = 10, test_ways: int = 5, test_samples: int = 10, root: str = "~/data",
    data_augmentation: str | None = None, device: Device = None, download: bool = True, **kwargs: Any,
) -> tuple[Splits, Transforms]:
    """mini-ImageNet; images are float in [0, 255] unless ``data_augmentation`` is ``'normalize'`` (to [0, 1]) or ``'lee2019'``."""
    augment = _augmentations(data_augmentation, 255.0)
    return _image_tasksets(lambda mode: MiniImagenet(root, mode=mode, download=download),
                           train_ways, train_samples, test_ways, test_samples, device, augment)


def tiered_imagenet_tasksets(
    train_ways: int = 5, train_samples: int = 10, test_ways: int = 5, test_samples: int = 10, root: str = "~/data",
    data_augmentation: str | None = None, device: Device = None, download: bool = True, **kwargs: Any,
) -> tuple[Splits, Transforms]:
    """tiered-ImageNet; images are float tensors in [0, 1] (``'lee2019'`` augments and normalises)."""
    augment = _augmentations(data_augmentation, 1.0)
    return _image_tasksets(lambda mode: TieredImagenet(root, mode=mode, transform=ToTensor(), download=download),
                           train_ways, train_samples, test_ways, test_samples, device, augment)


def cifarfs_tasksets(
    train_ways: int = 5, train_samples: int = 10, test_ways: int = 5, test_samples: int = 10, root: str = "~/data",
    device: Device = None, download: bool = True, **kwargs: Any,
) -> tuple[Splits, Transforms]:
    """CIFAR-FS; images are float ``(3, 32, 32)`` tensors in [0, 1]."""
    return _image_tasksets(lambda mode: CIFARFS(root, mode=mode, transform=ToTensor(), download=download),
                           train_ways, train_samples, test_ways, test_samples, device, (None, None))


def fc100_tasksets(
    train_ways: int = 5, train_samples: int = 10, test_ways: int = 5, test_samples: int = 10, root: str = "~/data",
    device: Device = None, download: bool = True, **kwargs: Any,
) -> tuple[Splits, Transforms]:
    """FC100; images are float ``(3, 32, 32)`` tensors in [0, 1]."""
    return _image_tasksets(lambda mode: FC100(root, mode=mode, transform=ToTensor(), download=download),
                           train_ways, train_samples, test_ways, test_samples, device, (None, None))


_TASKSETS: dict[str, Callable[..., tuple[Splits, Transforms]]] = {
    "omniglot": omniglot_tasksets,
    "mini-imagenet": mini_imagenet_tasksets,
    "tiered-imagenet": tiered_imagenet_tasksets,
    "fc100": fc100_tasksets,
    "cifarfs": cifarfs_tasksets,
}


def list_tasksets() -> list[str]:
    """Returns the names :func:`get_tasksets` accepts."""
    return list(_TASKSETS)


def get_tasksets(
    name: str,
    train_ways: int = 5,
    train_samples: int = 10,
    test_ways: int = 5,
    test_samples: int = 10,
    num_tasks: int = -1,
    root: str | os.PathLike[str] = "~/data",
    device: Device = None,
    **kwargs: Any,
) -> BenchmarkTasksets:
    """Returns the train, validation and test tasksets of benchmark ``name`` (see :func:`list_tasksets`).

    Args:
        train_samples, test_samples: samples per class in a task (support plus query).
        num_tasks: tasks per taskset, or -1 for endless sampling.
        device: hold the data on this device (as learn2learn's ``OnDeviceDataset``).
        kwargs: passed to the benchmark: ``download`` (default True), ``data_augmentation`` for
            the ImageNet subsets (None, ``'normalize'``, ``'lee2019'``), ``seed`` for Omniglot's
            split of characters into train, validation and test (default 0).

    Raises:
        ValueError: an unknown ``name``, or ways/samples the splits cannot provide.
        FileNotFoundError: a benchmark's files are missing from ``root`` (not raised for
            ``"omniglot"``, which falls back to the bundled splits with a warning).
    """
    if name not in _TASKSETS:
        raise ValueError(f"unknown taskset {name!r}; choose one of {list_tasksets()}")
    root = os.path.expanduser(root)
    datasets, transforms = _TASKSETS[name](
        train_ways=train_ways, train_samples=train_samples, test_ways=test_ways, test_samples=test_samples,
        root=root, device=device, **kwargs,
    )
    return BenchmarkTasksets(*(Taskset(dataset, task_transforms=t, num_tasks=num_tasks) for dataset, t in zip(datasets, transforms)))
