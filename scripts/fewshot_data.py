"""Writes small stand-ins for the few-shot benchmarks' published files, in their exact formats, with random images.

For tests and for trying learn2learn's examples offline: the readers in
``metaloop.tasks.image_benchmarks`` (and learn2learn's own) read these as they read the real files.

    python scripts/fewshot_data.py ROOT [mini-imagenet tiered-imagenet cifarfs fc100 cub200 dtd fgvc-aircraft vgg-flowers] \
        [--classes 6 5 5] [--per-class 20]

The fine-grained sets (cub200, dtd, fgvc-aircraft, vgg-flowers) have fixed class lists: every class
gets ``--per-class`` small JPEGs, and ``--classes`` does not apply to them.
"""

from __future__ import annotations

import argparse
import io
import pickle
import struct
import zipfile
import zlib
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


def _jpeg(rng: np.random.Generator, path: Path, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="JPEG")


def write_cub200(root: Path, per_class: int = 2, seed: int = 0) -> None:
    """``root/cubirds200/CUB_200_2011/``: ``images/<class>/<name>.jpg`` of the 200 classes, ``images.txt``, ``bounding_boxes.txt``.

    The first class folder of the ImageNet-duplicate list also gets that duplicate's file name.
    """
    from metaloop.tasks.benchmark_splits import CUB_IMAGENET_DUPLICATES, CUB_SPLITS

    rng = np.random.default_rng(seed)
    base = root / "cubirds200" / "CUB_200_2011"
    lines, boxes = [], []
    duplicate = CUB_IMAGENET_DUPLICATES["train"][0]
    for c, name in enumerate(sorted(n for split in CUB_SPLITS.values() for n in split)):
        files = [f"{name.split('.', 1)[1]}_{i:04d}_{c}.jpg" for i in range(per_class)]
        if name == CUB_SPLITS["train"][0]:
            files[0] = duplicate
        for file in files:
            _jpeg(rng, base / "images" / name / file)
            lines.append(f"{len(lines) + 1} {name}/{file}")
            boxes.append(f"{len(boxes) + 1} 2.0 3.0 20.0 10.0")
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")


def write_dtd(root: Path, per_class: int = 2, seed: int = 0) -> None:
    """``root/describable_textures/dtd/images/<texture>/<texture>_<id>.jpg`` of the 47 textures."""
    from metaloop.tasks.benchmark_splits import DTD_SPLITS

    rng = np.random.default_rng(seed)
    for name in (n for split in DTD_SPLITS.values() for n in split):
        for i in range(per_class):
            _jpeg(rng, root / "describable_textures" / "dtd" / "images" / name / f"{name}_{i:04d}.jpg")


def write_fgvc_aircraft(root: Path, per_class: int = 2, seed: int = 0) -> None:
    """``root/fgvc_aircraft/fgvc-aircraft-2013b/data/``: ``images/<id>.jpg``, ``images_variant_{train,val,test}.txt``, ``images_box.txt``."""
    from metaloop.tasks.benchmark_splits import AIRCRAFT_SPLITS

    rng = np.random.default_rng(seed)
    data = root / "fgvc_aircraft" / "fgvc-aircraft-2013b" / "data"
    variants = [v for split in AIRCRAFT_SPLITS.values() for v in split]
    families: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    boxes = []
    for v, variant in enumerate(variants):
        for i in range(per_class):
            image = f"{1000000 + v * 100 + i:07d}"
            _jpeg(rng, data / "images" / f"{image}.jpg")
            families[("train", "val", "test")[i % 3]].append(f"{image} {variant}")  # official families mix variants
            boxes.append(f"{image} 1 2 30 20")
    for family, lines in families.items():
        (data / f"images_variant_{family}.txt").write_text("\n".join(lines) + "\n")
    (data / "images_box.txt").write_text("\n".join(boxes) + "\n")


def _mat_element(kind: int, payload: bytes) -> bytes:
    return struct.pack("<II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def write_mat(path: Path, name: str, values: np.ndarray, compress: bool = True) -> None:
    """Writes a MATLAB level-5 MAT-file holding the double array ``name`` (as MATLAB saves ``imagelabels.mat``)."""
    array = np.asarray(values, dtype="<f8")
    matrix = b"".join([
        _mat_element(6, struct.pack("<II", 6, 0)),  # array flags: mxDOUBLE_CLASS
        _mat_element(5, struct.pack(f"<{array.ndim}i", *array.shape)),
        _mat_element(1, name.encode()),
        _mat_element(9, array.tobytes(order="F")),
    ])
    element = _mat_element(14, matrix)
    if compress:
        packed = zlib.compress(element)
        element = struct.pack("<II", 15, len(packed)) + packed
    header = b"MATLAB 5.0 MAT-file, written by metaloop's scripts/fewshot_data.py".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    path.write_bytes(header + element)


def write_vgg_flowers(root: Path, per_class: int = 2, seed: int = 0) -> None:
    """``root/vgg_flower102/``: ``jpg/image_NNNNN.jpg`` and ``imagelabels.mat`` (``labels``: 1 x n doubles, categories 1..102)."""
    rng = np.random.default_rng(seed)
    folder = root / "vgg_flower102"
    labels = rng.permutation(np.repeat(np.arange(1, 103), per_class))
    for i in range(len(labels)):
        _jpeg(rng, folder / "jpg" / f"image_{i + 1:05d}.jpg")
    write_mat(folder / "imagelabels.mat", "labels", labels[None, :])


FINE_GRAINED = {"cub200": write_cub200, "dtd": write_dtd, "fgvc-aircraft": write_fgvc_aircraft, "vgg-flowers": write_vgg_flowers}

WRITERS = {
    "mini-imagenet": write_mini_imagenet,
    "tiered-imagenet": write_tiered_imagenet,
    "cifarfs": write_cifarfs,
    "fc100": write_fc100,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("names", nargs="*", help="benchmarks to write (default: all)")
    parser.add_argument("--classes", type=int, nargs=3, default=(6, 5, 5), help="classes in train, val, test")
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    known = sorted(WRITERS) + sorted(FINE_GRAINED)
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose among {known}")
    args.root.mkdir(parents=True, exist_ok=True)
    for name in args.names or known:
        if name in WRITERS:
            WRITERS[name](args.root, tuple(args.classes), args.per_class)
        else:
            FINE_GRAINED[name](args.root, args.per_class)
        print(f"wrote {name} to {args.root}")


if __name__ == "__main__":
    main()
