"""Writes small stand-ins for the few-shot benchmarks' published files, in their exact formats, with random images.

For tests and for trying learn2learn's examples offline: the readers in
``metaloop.tasks.image_benchmarks`` (and learn2learn's own) read these as they read the real files.

    python scripts/fewshot_data.py ROOT [mini-imagenet tiered-imagenet cifarfs fc100] [--classes 6 5 5] [--per-class 20]
"""

from __future__ import annotations

import argparse
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


def _images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_mini_imagenet(root: Path, classes: tuple[int, int, int] = (6, 5, 5), per_class: int = 20, seed: int = 0) -> None:
    """``root/mini-imagenet-cache-{train,validation,test}.pkl``: ``{"image_data": (n, 84, 84, 3) uint8, "class_dict": {wnid: indices}}``."""
    rng = np.random.default_rng(seed)
    first = 0
    for split, count in zip(("train", "validation", "test"), classes):
        class_dict = {f"n{first + c:08d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(count)}
        data = {"image_data": _images(rng, count * per_class, 84), "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(data, protocol=2))
        first += count


def write_tiered_imagenet(root: Path, classes: tuple[int, int, int] = (6, 5, 5), per_class: int = 20, seed: int = 0) -> None:
    """``root/tiered-imagenet/{split}_images_png.pkl`` (PNG bytes as uint8 arrays) and ``{split}_labels.pkl``."""
    rng = np.random.default_rng(seed)
    folder = root / "tiered-imagenet"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in zip(SPLITS, classes):
        images = [np.frombuffer(_png(image), dtype=np.uint8) for image in _images(rng, count * per_class, 84)]
        specific = np.repeat(np.arange(count), per_class)
        labels = {
            "label_specific": specific,
            "label_general": specific // 2,
            "label_specific_str": [f"{split}_synset_{c}" for c in range(count)],
            "label_general_str": [f"{split}_category_{c}" for c in range((count + 1) // 2)],
        }
        (folder / f"{split}_images_png.pkl").write_bytes(pickle.dumps(images, protocol=2))
        (folder / f"{split}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=2))


def write_cifarfs(root: Path, classes: tuple[int, int, int] = (6, 5, 5), per_class: int = 20, seed: int = 0) -> None:
    """``root/cifarfs.zip``: ``cifar100/data/<class>/<class>_s_<id>.png`` (32x32) and ``cifar100/splits/bertinetto/<split>.txt``."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(root / "cifarfs.zip", "w") as zf:
        first = 0
        for split, count in zip(SPLITS, classes):
            names = [f"class_{first + c:03d}" for c in range(count)]
            zf.writestr(f"cifar100/splits/bertinetto/{split}.txt", "".join(f"{n}\n" for n in names))
            for name in names:
                for i, image in enumerate(_images(rng, per_class, 32)):
                    zf.writestr(f"cifar100/data/{name}/{name}_s_{i:06d}.png", _png(image))
            first += count


def write_fc100(root: Path, classes: tuple[int, int, int] = (6, 5, 5), per_class: int = 20, seed: int = 0) -> None:
    """``root/FC100_{train,val,test}.pickle``: ``{"data": (n, 32, 32, 3) uint8, "labels": [CIFAR-100 class ids]}``."""
    rng = np.random.default_rng(seed)
    first = 0
    for split, count in zip(SPLITS, classes):
        labels = [int(first + c) for c in range(count) for _ in range(per_class)]
        data = {"data": _images(rng, count * per_class, 32), "labels": labels}
        (root / f"FC100_{split}.pickle").write_bytes(pickle.dumps(data, protocol=2))
        first += count


WRITERS = {
    "mini-imagenet": write_mini_imagenet,
    "tiered-imagenet": write_tiered_imagenet,
    "cifarfs": write_cifarfs,
    "fc100": write_fc100,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("names", nargs="*", help=f"benchmarks to write (default: all of {sorted(WRITERS)})")
    parser.add_argument("--classes", type=int, nargs=3, default=(6, 5, 5), help="classes in train, val, test")
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(WRITERS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose among {sorted(WRITERS)}")
    args.root.mkdir(parents=True, exist_ok=True)
    for name in args.names or sorted(WRITERS):
        WRITERS[name](args.root, tuple(args.classes), args.per_class)
        print(f"wrote {name} to {args.root}")


if __name__ == "__main__":
    main()
