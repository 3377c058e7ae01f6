"""learn2learn's ``learn2learn.vision.datasets`` on metaloop's readers: same constructors, same items.

Each dataset reads one split (``mode``: ``train``, ``validation`` or ``test``) of the published
files in ``root`` through :mod:`metaloop.tasks.image_benchmarks` (pickles through the restricted
unpickler) and returns what learn2learn's returns, before ``transform``:

- ``MiniImagenet``: a float32 ``(3, 84, 84)`` tensor with values in [0, 255], and an int label
  (classes numbered in the pickle's ``class_dict`` order).
- ``TieredImagenet``: a PIL RGB image and its ``label_specific`` int.
- ``CIFARFS``: a PIL RGB 32x32 image and an int label (the split's classes in sorted order, as
  torchvision's ``ImageFolder`` numbers them).
- ``FC100``: a PIL RGB 32x32 image and its CIFAR-100 class id.
- ``FullOmniglot``: a PIL grayscale 105x105 image (black strokes on white, as torchvision's
  ``Omniglot`` gives) and its class among 1,623 (background characters first).
- ``CUBirds200``, ``VGGFlower102``, ``FGVCAircraft``, ``DescribableTextures``: a PIL RGB image
  (its published size) and the class's position in the split's class list (Meta-Dataset's splits,
  :mod:`metaloop.tasks.benchmark_splits`); ``mode='all'`` joins the splits in learn2learn's order.

``transform`` and ``target_transform`` are any callables: metaloop's plain-torch
:mod:`metaloop.tasks.image_transforms`, or torchvision's where installed. Labels are also listed
in ``targets``, so ``MetaDataset`` indexes a dataset without loading its images. ``download=True``
fetches missing files (failing fast, with the file to fetch by hand, without network access).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from metaloop.tasks.benchmark_splits import AIRCRAFT_SPLITS, CUB_IMAGENET_DUPLICATES, FLOWERS_SPLITS
from metaloop.tasks.image_benchmarks import SplitImages, decode_image, read_split
from metaloop.tasks.omniglot import Omniglot

__all__ = [
    "FullOmniglot",
    "MiniImagenet",
    "TieredImagenet",
    "CIFARFS",
    "FC100",
    "CUBirds200",
    "VGGFlower102",
    "FGVCAircraft",
    "DescribableTextures",
]

_MODES = ("train", "validation", "test")


def _check_mode(mode: str, name: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"{name} mode={mode!r} must be one of {list(_MODES)}")


class _Split(Dataset):
    """Returns ``(transform(image), target_transform(label))`` of one split: the shared body of the datasets below.

    With ``boxes``, each image is cropped to its bounding box.
    """

    def __init__(
        self,
        split: SplitImages,
        labels: list[int],
        transform: Callable[[Any], Any] | None,
        target_transform: Callable[[Any], Any] | None,
        boxes: list[tuple[int, int, int, int]] | None = None,
    ) -> None:
        self.images = split.images
        self.targets = labels
        self.transform = transform
        self.target_transform = target_transform
        self.boxes = boxes

    def load(self, index: int) -> Any:
        """Returns image ``index`` as learn2learn's dataset gives it, before ``transform``."""
        return decode_image(self.images[index], box=self.boxes[index] if self.boxes is not None else None)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self.load(index), self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label


def _first_appearance(names: list[str]) -> list[int]:
    order = {name: i for i, name in enumerate(dict.fromkeys(names))}
    return [order[name] for name in names]


class MiniImagenet(_Split):
    """mini-ImageNet (Ravi & Larochelle's split) from ``root/mini-imagenet-cache-<mode>.pkl``; images are float ``(3, 84, 84)`` in [0, 255]."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "train",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
    ) -> None:
        _check_mode(mode, "MiniImagenet")
        self.root, self.mode = os.path.expanduser(root), mode
        split = read_split("mini-imagenet", self.root, mode, download)
        super().__init__(split, _first_appearance(split.class_names), transform, target_transform)

    def load(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1).float()


class TieredImagenet(_Split):
    """tiered-ImageNet from ``root/tiered-imagenet/<mode>_images_png.pkl`` and ``<mode>_labels.pkl``; PIL images, ``label_specific`` labels."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "train",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
    ) -> None:
        _check_mode(mode, "TieredImagenet")
        self.root, self.mode = os.path.expanduser(root), mode
        split = read_split("tiered-imagenet", self.root, mode, download)
        super().__init__(split, list(split.label_ids or ()), transform, target_transform)


class CIFARFS(_Split):
    """CIFAR-FS (Bertinetto et al. 2019) from ``root/cifarfs.zip`` or its unzipped ``root/cifarfs/``; PIL 32x32 images.

    Attributes:
        classes, class_to_idx: the split's class names (sorted) and their labels, as ``ImageFolder``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "train",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
    ) -> None:
        _check_mode(mode, "CIFARFS")
        self.root, self.mode = os.path.expanduser(root), mode
        split = read_split("cifarfs", self.root, mode, download)
        self.classes = sorted(set(split.class_names))
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        super().__init__(split, [self.class_to_idx[name] for name in split.class_names], transform, target_transform)


class FC100(_Split):
    """FC100 (Oreshkin et al. 2018) from ``root/FC100_<mode>.pickle`` (or ``root/fc100.zip``); PIL 32x32 images, CIFAR-100 class ids."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "train",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
    ) -> None:
        _check_mode(mode, "FC100")
        self.root, self.mode = os.path.expanduser(root), mode
        split = read_split("fc100", self.root, mode, download)
        super().__init__(split, list(split.label_ids or ()), transform, target_transform)


_MODES_ALL = ("train", "validation", "test", "all")


def _fine_grained(
    name: str, root: str, mode: str, order: tuple[str, ...], download: bool, keep: Callable[[Any], bool] = lambda path: True
) -> tuple[SplitImages, list[int]]:
    """Returns the images of ``mode`` (``'all'``: the splits in ``order``, learn2learn's) and each one's class position in the mode's class list."""
    if mode not in _MODES_ALL:
        raise ValueError(f"mode={mode!r} must be one of {list(_MODES_ALL)}")
    parts = [read_split(name, root, split, download) for split in (order if mode == "all" else (mode,))]
    images = [image for part in parts for image in part.images]
    names = [n for part in parts for n in part.class_names]
    boxes = None if any(part.boxes is None for part in parts) else [b for part in parts for b in part.boxes]  # type: ignore[union-attr]
    kept = [i for i, image in enumerate(images) if keep(image)]
    split = SplitImages([images[i] for i in kept], [names[i] for i in kept], None, None if boxes is None else [boxes[i] for i in kept])
    return split, _first_appearance(split.class_names)


class CUBirds200(_Split):
    """CUB-200-2011 birds from ``root/cubirds200/CUB_200_2011``; images also in ImageNet are left out unless ``include_imagenet_duplicates``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "all",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
        include_imagenet_duplicates: bool = False,
        bounding_box_crop: bool = False,
    ) -> None:
        self.root, self.mode = os.path.expanduser(root), mode
        self.include_imagenet_duplicates, self.bounding_box_crop = include_imagenet_duplicates, bounding_box_crop
        duplicates = {f for split, files in CUB_IMAGENET_DUPLICATES.items() if mode in (split, "all") for f in files}
        split, labels = _fine_grained(
            "cub200", self.root, mode, ("train", "test", "validation"), download,
            keep=lambda path: include_imagenet_duplicates or Path(path).name not in duplicates,
        )
        if bounding_box_crop and split.boxes is None:
            raise FileNotFoundError(f"bounding_box_crop=True needs {self.root}/cubirds200/CUB_200_2011/bounding_boxes.txt and images.txt")
        super().__init__(split, labels, transform, target_transform, split.boxes if bounding_box_crop else None)


class DescribableTextures(_Split):
    """Describable Textures (DTD) from ``root/describable_textures/dtd/images``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "all",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
    ) -> None:
        self.root, self.mode = os.path.expanduser(root), mode
        split, labels = _fine_grained("dtd", self.root, mode, ("train", "test", "validation"), download)
        super().__init__(split, labels, transform, target_transform)


class FGVCAircraft(_Split):
    """FGVC-Aircraft (variants) from ``root/fgvc_aircraft/fgvc-aircraft-2013b/data``; ``bounding_box_crop`` crops to ``images_box.txt``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "all",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
        bounding_box_crop: bool = False,
    ) -> None:
        self.root, self.mode, self.bounding_box_crop = os.path.expanduser(root), mode, bounding_box_crop
        split, _ = _fine_grained("fgvc-aircraft", self.root, mode, ("train", "validation", "test"), download)
        # learn2learn numbers a mode's classes in its variant list's order (not in order of appearance)
        variants = [v for s in (("train", "validation", "test") if mode == "all" else (mode,)) for v in AIRCRAFT_SPLITS[s]]
        position = {v: i for i, v in enumerate(variants)}
        if bounding_box_crop and split.boxes is None:
            raise FileNotFoundError(f"bounding_box_crop=True needs {self.root}/fgvc_aircraft/fgvc-aircraft-2013b/data/images_box.txt")
        super().__init__(split, [position[n] for n in split.class_names], transform, target_transform, split.boxes if bounding_box_crop else None)


class VGGFlower102(_Split):
    """VGG Flowers 102 from ``root/vgg_flower102`` (``jpg/`` and ``imagelabels.mat``); labels number the mode's categories in Meta-Dataset's order (``'all'``: 1..102)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "all",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
    ) -> None:
        self.root, self.mode = os.path.expanduser(root), mode
        split, _ = _fine_grained("vgg-flowers", self.root, mode, ("train", "validation", "test"), download)
        categories = list(range(1, 103)) if mode == "all" else FLOWERS_SPLITS[mode]
        position = {c: i for i, c in enumerate(categories)}
        order = sorted(range(len(split.images)), key=lambda i: int(Path(split.images[i]).stem.split("_")[1]))  # type: ignore[arg-type]
        split = SplitImages([split.images[i] for i in order], [split.class_names[i] for i in order])
        super().__init__(split, [position[int(n)] for n in split.class_names], transform, target_transform)


class FullOmniglot(Dataset):
    """All 1,623 Omniglot characters (background then evaluation set) as ``(PIL 105x105 grayscale image, class)``, on :class:`metaloop.tasks.Omniglot`.

    Reads ``images_background`` and ``images_evaluation`` (zips or unzipped folders) from
    ``root/omniglot-py`` (torchvision's layout, which learn2learn uses) or from ``root`` itself;
    ``download=True`` fetches the zips (sha256-verified). Images are decoded once and cached by
    metaloop's Omniglot.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
    ) -> None:
        self.root = os.path.expanduser(root)
        torchvision_layout = Path(self.root) / "omniglot-py"
        folder = torchvision_layout if torchvision_layout.is_dir() else Path(self.root)
        self.dataset = Omniglot(root=folder, full=True, download=download, image_size=105)
        self.targets = self.dataset.targets.tolist()
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        # metaloop's Omniglot stores strokes as 255; torchvision gives the drawing as published (black strokes on white)
        image: Any = Image.fromarray(255 - self.dataset.images[index, 0].numpy(), mode="L")
        label: Any = self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label
