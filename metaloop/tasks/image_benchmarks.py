"""Readers of the few-shot image benchmarks' published files: mini-ImageNet, tiered-ImageNet, CIFAR-FS, FC100, CUB-200-2011, DTD, FGVC-Aircraft, VGG Flowers.

Each benchmark is published as files that learn2learn (and the papers' code) read: pickles of
arrays, pickles of PNG bytes, folders of PNGs with split lists, or (the fine-grained sets, split
by class as Meta-Dataset does, :mod:`metaloop.tasks.benchmark_splits`) folders of JPEGs with
label files. :func:`read_split` reads one
split of one benchmark into a :class:`SplitImages` (images and the class name of each), and
:class:`FewShotImages` holds all splits of a benchmark in memory as uint8 tensors for
:class:`~metaloop.tasks.EpisodeSampler` (``split_by="split"`` keeps the benchmark's class splits).

Pickles are read with :func:`metaloop.tasks.pickles.load_pickle`, which refuses any pickle that
would run code. A missing file raises :class:`FileNotFoundError` naming the file, where to put it
and where to fetch it; ``download=True`` fetches files with a short timeout and, offline, fails
fast with the same message. The published files carry no official checksums (learn2learn checks
none), so integrity is checked by format: a file that does not parse as its benchmark's layout
raises :class:`ValueError` naming it.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from metaloop.tasks.benchmark_splits import AIRCRAFT_SPLITS, CUB_SPLITS, DTD_SPLITS, FLOWERS_SPLITS
from metaloop.tasks.episodes import SPLITS
from metaloop.tasks.pickles import load_pickle

__all__ = ["BENCHMARKS", "Benchmark", "FewShotImages", "SplitImages", "decode_image", "read_mat_array", "read_split"]

DOWNLOAD_TIMEOUT_S = 15.0
# learn2learn's split names -> metaloop's
MODES = {"train": "train", "validation": "val", "val": "val", "test": "test"}


class SplitImages(NamedTuple):
    """One split of a benchmark: ``images`` (a uint8 array ``(n, H, W, C)``, or one encoded image / file per sample) and each sample's class name.

    ``label_ids`` holds each sample's integer label where the files define one (tiered-ImageNet's
    ``label_specific``, FC100's CIFAR-100 ids), else None; ``boxes`` each image's bounding box
    ``(left, top, right, bottom)`` where the dataset publishes them (CUB-200-2011, FGVC-Aircraft).
    """

    images: np.ndarray | list[bytes | Path]
    class_names: list[str]
    label_ids: list[int] | None = None
    boxes: list[tuple[int, int, int, int]] | None = None


def decode_image(
    image: np.ndarray | bytes | Path, mode: str = "RGB", box: tuple[int, int, int, int] | None = None, name: str | None = None,
) -> Image.Image:
    """Returns ``image`` (an ``(H, W, C)`` uint8 array, encoded PNG/JPEG bytes, or a file) as a PIL image in ``mode``, cropped to ``box`` if given.

    Raises:
        ValueError: the bytes or file are not an image PIL reads, or the image has more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb: refused from its header, before it
            is decoded). The message names ``name`` (default: the file, or "an encoded image").
        FileNotFoundError: the file does not exist.
    """
    if isinstance(image, np.ndarray):
        pil = Image.fromarray(image).convert(mode)
        return pil.crop(box) if box is not None else pil
    what = name or ("an encoded image" if isinstance(image, bytes) else str(image))
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that, and decodes; no benchmark image comes near either
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
                pil = opened.convert(mode)
    except FileNotFoundError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ValueError(
            f"{what} is refused: {err} The file is corrupt or not the published one: delete it and fetch it again "
            "(or raise PIL.Image.MAX_IMAGE_PIXELS for a genuine image that large)"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise _bad_file(what, f"a readable image ({err})") from err
    return pil.crop(box) if box is not None else pil


@dataclass(frozen=True)
class Benchmark:
    """How to read a benchmark: its files per split (relative to ``root``), where to get them, and the reader."""

    title: str
    files: Callable[[str], list[str]]  # split -> the files it needs, relative to root
    source: str  # where to fetch them by hand
    urls: Callable[[str], dict[str, str]]  # split -> {file: url} that download=True fetches
    read: Callable[[Path, str], SplitImages]
    present: Callable[[Path, str], bool]  # (root, split) -> whether the split is there in a layout ``read`` accepts
    channels: int = 3
    extract: bool = False  # downloads are archives to unpack where they land (then deleted)


def _missing(benchmark: Benchmark, root: Path, split: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{benchmark.title} file {path} not found; fetch {', '.join(benchmark.files(split))} from {benchmark.source}"
        f" and put {'it' if len(benchmark.files(split)) == 1 else 'them'} in {root} (or pass download=True where there is network access)"
    )


def _bad_file(path: Path | str, what: str) -> ValueError:
    return ValueError(f"{path} is not {what}; the file is corrupt or not the published one, delete it and fetch it again")


# -- mini-ImageNet: mini-imagenet-cache-<mode>.pkl = {"image_data": (n, 84, 84, 3) uint8, "class_dict": {wnid: [indices]}}
def _read_mini_imagenet(root: Path, split: str) -> SplitImages:
    path = root / _mini_imagenet_files(split)[0]
    if not path.exists():
        raise _missing(BENCHMARKS["mini-imagenet"], root, split, path)
    data = load_pickle(path)
    try:
        images, class_dict = data["image_data"], data["class_dict"]
        names = [""] * len(images)
        for name, indices in class_dict.items():
            for i in indices:
                names[int(i)] = str(name)
    except (KeyError, TypeError, IndexError) as err:
        raise _bad_file(path, "a mini-ImageNet cache pickle ({'image_data': array, 'class_dict': {class: indices}})") from err
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8 or "" in names:
        raise _bad_file(path, "a mini-ImageNet cache pickle: image_data must be (n, H, W, 3) uint8 and every image in class_dict")
    return SplitImages(images, names)


def _mini_imagenet_files(split: str) -> list[str]:
    return [f"mini-imagenet-cache-{ {'val': 'validation'}.get(split, split)}.pkl"]


# -- tiered-ImageNet: tiered-imagenet/<split>_images_png.pkl (PNG bytes per image) + <split>_labels.pkl
def _tiered_files(split: str) -> list[str]:
    return [f"tiered-imagenet/{split}_images_png.pkl", f"tiered-imagenet/{split}_labels.pkl"]


def _read_tiered_imagenet(root: Path, split: str) -> SplitImages:
    images_path, labels_path = (root / f for f in _tiered_files(split))
    for path in (images_path, labels_path):
        if not path.exists():
            raise _missing(BENCHMARKS["tiered-imagenet"], root, split, path)
    images, labels = load_pickle(images_path), load_pickle(labels_path)
    try:
        specific = [int(label) for label in labels["label_specific"]]
        named = labels.get("label_specific_str")
        names = [str(named[label]) if named is not None else str(label) for label in specific]
        encoded = [bytes(image) if isinstance(image, (bytes, bytearray)) else np.asarray(image, dtype=np.uint8).tobytes() for image in images]
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise _bad_file(labels_path, "a tiered-ImageNet labels pickle ({'label_specific': labels, ...})") from err
    if len(encoded) != len(names):
        raise _bad_file(images_path, f"the images of {labels_path.name}: it holds {len(encoded)} images for {len(names)} labels")
    return SplitImages(encoded, names, specific)


# -- CIFAR-FS (Bertinetto et al. 2019): cifar100.zip = cifar100/data/<class>/*.png + cifar100/splits/bertinetto/<split>.txt
def _cifarfs_split(root: Path, split: str) -> tuple[list[str], Callable[[str], list[tuple[str, bytes | Path]]]]:
    """Returns the split's class names and a function listing ``(file name, image)`` of a class, from the zip or a folder."""
    for folder in (root / "cifarfs" / "cifar100", root / "cifar100"):
        split_file = folder / "splits" / "bertinetto" / f"{split}.txt"
        if split_file.exists():
            classes = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
            return classes, lambda c, folder=folder: [(p.name, p) for p in sorted((folder / "data" / c).glob("*.png"))]
    processed = root / "cifarfs" / "processed" / split  # learn2learn's processed layout: processed/<split>/<class>/*.png
    if processed.is_dir():
        classes = sorted(p.name for p in processed.iterdir() if p.is_dir())
        return classes, lambda c: [(p.name, p) for p in sorted((processed / c).glob("*.png"))]
    for archive in (root / "cifarfs.zip", root / "cifar100.zip"):
        if archive.exists():
            try:
                zf = zipfile.ZipFile(archive)
            except zipfile.BadZipFile as err:
                raise _bad_file(archive, "a zip archive") from err
            names = zf.namelist()
            split_name = next((n for n in names if n.endswith(f"splits/bertinetto/{split}.txt")), None)
            if split_name is None:
                raise _bad_file(archive, f"the CIFAR-FS archive (it lacks cifar100/splits/bertinetto/{split}.txt)")
            base = split_name[: -len(f"splits/bertinetto/{split}.txt")] + "data/"
            classes = [line.strip() for line in zf.read(split_name).decode().splitlines() if line.strip()]
            return classes, lambda c: [(n.rsplit("/", 1)[1], zf.read(n)) for n in sorted(names) if n.startswith(f"{base}{c}/") and n.endswith(".png")]
    raise _missing(BENCHMARKS["cifarfs"], root, split, root / "cifarfs.zip")


def _read_cifarfs(root: Path, split: str) -> SplitImages:
    classes, images_of = _cifarfs_split(root, split)
    images: list[bytes | Path] = []
    names: list[str] = []
    for c in classes:
        found = images_of(c)
        if not found:
            raise ValueError(f"CIFAR-FS class {c!r} of split {split!r} has no PNG images under {root}; the data folder is incomplete")
        images += [image for _, image in found]
        names += [c] * len(found)
    return SplitImages(images, names)


# -- FC100 (Oreshkin et al. 2018), as MetaOptNet publishes it: FC100_<split>.pickle = {"data": (n, 32, 32, 3) uint8, "labels": [...]}
def _fc100_files(split: str) -> list[str]:
    return [f"FC100_{split}.pickle"]


def _read_fc100(root: Path, split: str) -> SplitImages:
    name = _fc100_files(split)[0]
    path = root / name
    if path.exists():
        data = load_pickle(path)
    else:
        archive = root / "fc100.zip"
        if not archive.exists():
            raise _missing(BENCHMARKS["fc100"], root, split, path)
        with zipfile.ZipFile(archive) as zf:
            member = next((n for n in zf.namelist() if n.endswith(name)), None)
            if member is None:
                raise _bad_file(archive, f"the FC100 archive (it lacks {name})")
            with zf.open(member) as f:
                data = load_pickle(io.BytesIO(f.read()))
    try:
        images, labels = data["data"], [int(label) for label in data["labels"]]
    except (KeyError, TypeError, ValueError) as err:
        raise _bad_file(path, "an FC100 pickle ({'data': (n, 32, 32, 3) uint8, 'labels': [...]})") from err
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise _bad_file(path, "an FC100 pickle: data must be (n, H, W, 3) uint8 with one label per image")
    return SplitImages(images, [str(label) for label in labels], labels)

# -- the Meta-Dataset fine-grained sets (class splits in metaloop.tasks.benchmark_splits), each a folder of JPEGs
_META_SPLIT = {"train": "train", "val": "validation", "test": "test"}


def _folder_classes(images: Path, classes: list[str], benchmark: str, root: Path, split: str) -> tuple[list[Path], list[str]]:
    """Returns the image files of each class folder ``images/<class>`` (sorted) and their class names."""
    if not images.is_dir():
        raise _missing(BENCHMARKS[benchmark], root, split, images)
    files: list[Path] = []
    names: list[str] = []
    for c in classes:
        found = sorted(p for p in (images / c).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not found:
            raise ValueError(f"{BENCHMARKS[benchmark].title} class folder {images / c} holds no images; the extracted archive is incomplete")
        files += found
        names += [c] * len(found)
    return files, names


def _read_cub(root: Path, split: str) -> SplitImages:
    base = root / "cubirds200" / "CUB_200_2011"
    files, names = _folder_classes(base / "images", CUB_SPLITS[_META_SPLIT[split]], "cub200", root, split)
    boxes = None
    if (base / "bounding_boxes.txt").exists() and (base / "images.txt").exists():
        image_of = dict(line.split(" ", 1) for line in (base / "images.txt").read_text().split("\n") if line.strip())
        by_path: dict[str, tuple[int, int, int, int]] = {}
        for line in (base / "bounding_boxes.txt").read_text().split("\n"):
            if line.strip():
                image_id, x, y, w, h = line.split()
                left, top = int(float(x)), int(float(y))
                by_path[image_of[image_id].strip()] = (left, top, left + int(float(w)), top + int(float(h)))
        boxes = [by_path.get(f"{f.parent.name}/{f.name}", (0, 0, 1 << 30, 1 << 30)) for f in files]
    return SplitImages(list(files), names, None, boxes)


def _read_dtd(root: Path, split: str) -> SplitImages:
    files, names = _folder_classes(root / "describable_textures" / "dtd" / "images", DTD_SPLITS[_META_SPLIT[split]], "dtd", root, split)
    return SplitImages(list(files), names)


def _read_aircraft(root: Path, split: str) -> SplitImages:
    data = root / "fgvc_aircraft" / "fgvc-aircraft-2013b" / "data"
    if not (data / "images").is_dir():
        raise _missing(BENCHMARKS["fgvc-aircraft"], root, split, data / "images")
    variant_of: dict[str, str] = {}
    for family in ("images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt"):
        if not (data / family).exists():
            raise _missing(BENCHMARKS["fgvc-aircraft"], root, split, data / family)
        for line in (data / family).read_text().split("\n"):
            if line.strip():
                image, variant = line.split(" ", 1)
                variant_of[image.strip()] = variant.strip()
    chosen = set(AIRCRAFT_SPLITS[_META_SPLIT[split]])
    images = sorted(image for image, variant in variant_of.items() if variant in chosen)
    boxes = None
    if (data / "images_box.txt").exists():
        box_of = {}
        for line in (data / "images_box.txt").read_text().split("\n"):
            if line.strip():
                image, *corners = line.split()
                box_of[image] = tuple(int(c) for c in corners)
        boxes = [box_of[image] for image in images]  # type: ignore[misc]
    return SplitImages([data / "images" / f"{image}.jpg" for image in images], [variant_of[image] for image in images], None, boxes)


def _read_flowers(root: Path, split: str) -> SplitImages:
    folder = root / "vgg_flower102"
    labels_path = folder / "imagelabels.mat"
    if not labels_path.exists() or not (folder / "jpg").is_dir():
        raise _missing(BENCHMARKS["vgg-flowers"], root, split, labels_path if not labels_path.exists() else folder / "jpg")
    labels = read_mat_array(labels_path, "labels").reshape(-1).astype(int)
    chosen = set(FLOWERS_SPLITS[_META_SPLIT[split]])
    picked = [(i, int(label)) for i, label in enumerate(labels, start=1) if label in chosen]
    return SplitImages([folder / "jpg" / f"image_{i:05d}.jpg" for i, _ in picked], [str(label) for _, label in picked], [label for _, label in picked])


# the most a MAT-file's compressed data may expand to: the benchmarks' label files hold kilobytes
MAT_MAX_BYTES = 16 * 2**20
# MATLAB level-5 MAT-files: the data types a numeric array uses (MATLAB's miINT8 ... miUINT64)
_MAT_TYPES = {1: "i1", 2: "u1", 3: "<i2", 4: "<u2", 5: "<i4", 6: "<u4", 7: "<f4", 9: "<f8", 12: "<i8", 13: "<u8"}


def _mat_elements(buffer: bytes) -> Iterator[tuple[int, bytes]]:
    """Yields ``(data type, payload)`` of the data elements in ``buffer`` (little-endian level-5 MAT-file layout)."""
    offset = 0
    while offset + 8 <= len(buffer):
        kind, size = struct.unpack_from("<II", buffer, offset)
        if kind >> 16:  # small data element: size in the upper half, payload in the next 4 bytes
            yield kind & 0xFFFF, buffer[offset + 4 : offset + 4 + (kind >> 16)]
            offset += 8
        else:
            yield kind, buffer[offset + 8 : offset + 8 + size]
            offset += 8 + size + (-size % 8 if kind != 15 else 0)


def _inflate(payload: bytes, budget: int, path: Path) -> bytes:
    """Returns the zlib stream ``payload`` decompressed; raises ValueError naming ``path`` past ``budget`` bytes, before allocating more."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(payload, budget + 1)
    except zlib.error as err:
        raise _bad_file(path, f"a MAT-file with intact compressed data ({err})") from err
    if len(data) > budget:
        raise ValueError(
            f"{path} expands to more than {MAT_MAX_BYTES // 2**20} MiB when decompressed (a MAT-file of labels holds "
            "kilobytes): the file is corrupt or not the published one, delete it and fetch it again"
        )
    return data


def _mat_variables(raw: bytes, path: Path) -> Iterator[tuple[int, bytes]]:
    """Yields the top-level data elements of a MAT-file's body, compressed ones decompressed (all within :data:`MAT_MAX_BYTES`)."""
    budget = MAT_MAX_BYTES
    for kind, payload in _mat_elements(raw):
        if kind == 15:  # miCOMPRESSED: a zlib stream holding more elements
            inflated = _inflate(payload, budget, path)
            budget -= len(inflated)
            yield from _mat_elements(inflated)
        else:
            yield kind, payload


def read_mat_array(path: Path, name: str) -> np.ndarray:
    """Returns the numeric array ``name`` of a MATLAB level-5 MAT-file (compressed or not), as the MAT-file stores it.

    Raises:
        ValueError: the file is not a little-endian level-5 MAT-file, has no numeric array ``name``, or its
            compressed data expands beyond :data:`MAT_MAX_BYTES` (a decompression bomb).
    """
    raw = path.read_bytes()
    if len(raw) < 128 or raw[126:128] != b"IM":
        raise _bad_file(path, "a MATLAB level-5 MAT-file (little-endian)")
    for kind, payload in _mat_variables(raw[128:], path):
        if kind != 14:  # only miMATRIX elements hold variables
            continue
        parts = list(_mat_elements(payload))
        if len(parts) < 4:
            continue
        dims = np.frombuffer(parts[1][1], dtype="<i4")
        if parts[2][1].decode("latin1") != name or parts[3][0] not in _MAT_TYPES:
            continue
        values = np.frombuffer(parts[3][1], dtype=_MAT_TYPES[parts[3][0]])
        return values.reshape(tuple(dims), order="F")
    raise _bad_file(path, f"a MAT-file with a numeric array {name!r}")


def _all_files(files: Callable[[str], list[str]]) -> Callable[[Path, str], bool]:
    return lambda root, split: all((root / f).exists() for f in files(split))


def _cifarfs_present(root: Path, split: str) -> bool:
    folders = ("cifarfs/cifar100", "cifar100", f"cifarfs/processed/{split}")
    return any((root / f).is_dir() for f in folders) or any((root / f).exists() for f in ("cifarfs.zip", "cifar100.zip"))


def _fc100_present(root: Path, split: str) -> bool:
    return (root / _fc100_files(split)[0]).exists() or (root / "fc100.zip").exists()


def _archive_benchmark(
    title: str, url: str, folder: str, images: str, files: list[str], read: Callable[[Path, str], SplitImages]
) -> Benchmark:
    """Returns a benchmark published as one archive at ``url``, extracted into ``root/<folder>/`` with its images in ``<folder>/<images>``.

    ``files`` says what the reader needs, for the message when they are missing.
    """
    archive = f"{folder}/{url.rsplit('/', 1)[-1]}"
    return Benchmark(
        title,
        lambda split: list(files),
        f"{url} (extract it into root/{folder}/)",
        lambda split: {archive: url},
        read,
        lambda root, split: (root / folder / images).is_dir(),
        extract=True,
    )


BENCHMARKS: dict[str, Benchmark] = {
    "mini-imagenet": Benchmark(
        "mini-ImageNet",
        _mini_imagenet_files,
        "https://zenodo.org/record/7978538 (learn2learn's mirror of Ravi & Larochelle's split)",
        lambda split: {f: f"https://zenodo.org/record/7978538/files/{f}" for f in _mini_imagenet_files(split)},
        _read_mini_imagenet,
        _all_files(_mini_imagenet_files),
    ),
    "tiered-imagenet": Benchmark(
        "tiered-ImageNet",
        _tiered_files,
        "https://zenodo.org/record/7978538 (files tiered-imagenet-<split>_images_png.pkl and tiered-imagenet-<split>_labels.pkl,"
        " saved without the 'tiered-imagenet-' prefix)",
        lambda split: {f: f"https://zenodo.org/record/7978538/files/tiered-imagenet-{f.rsplit('/', 1)[-1]}" for f in _tiered_files(split)},
        _read_tiered_imagenet,
        _all_files(_tiered_files),
    ),
    "cifarfs": Benchmark(
        "CIFAR-FS",
        lambda split: ["cifarfs.zip"],
        "https://zenodo.org/record/7978538/files/cifar100.zip (save it as cifarfs.zip, or unzip it into cifarfs/)",
        lambda split: {"cifarfs.zip": "https://zenodo.org/record/7978538/files/cifar100.zip"},
        _read_cifarfs,
        _cifarfs_present,
    ),
    "fc100": Benchmark(
        "FC100",
        _fc100_files,
        "https://zenodo.org/record/7978538/files/fc100.zip (unzip it into root, or leave it there as fc100.zip)",
        lambda split: {"fc100.zip": "https://zenodo.org/record/7978538/files/fc100.zip"},
        _read_fc100,
        _fc100_present,
    ),
    "cub200": _archive_benchmark(
        "CUB-200-2011", "https://zenodo.org/record/8000562/files/CUB_200_2011.tgz", "cubirds200", "CUB_200_2011/images",
        ["cubirds200/CUB_200_2011/images/<class>/*.jpg"], _read_cub,
    ),
    "dtd": _archive_benchmark(
        "Describable Textures", "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz", "describable_textures", "dtd/images",
        ["describable_textures/dtd/images/<class>/*.jpg"], _read_dtd,
    ),
    "fgvc-aircraft": _archive_benchmark(
        "FGVC-Aircraft", "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz", "fgvc_aircraft",
        "fgvc-aircraft-2013b/data/images",
        ["fgvc_aircraft/fgvc-aircraft-2013b/data/images/*.jpg", "fgvc_aircraft/fgvc-aircraft-2013b/data/images_variant_{train,val,test}.txt"],
        _read_aircraft,
    ),
    "vgg-flowers": Benchmark(
        "VGG Flowers 102",
        lambda split: ["vgg_flower102/jpg/image_NNNNN.jpg", "vgg_flower102/imagelabels.mat"],
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz, extracted into root/vgg_flower102/, and imagelabels.mat beside it)",
        lambda split: {
            "vgg_flower102/102flowers.tgz": "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
            "vgg_flower102/imagelabels.mat": "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat",
        },
        _read_flowers,
        lambda root, split: (root / "vgg_flower102" / "imagelabels.mat").exists() and (root / "vgg_flower102" / "jpg").is_dir(),
        extract=True,
    ),
}


def _check_name(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def _download(benchmark: Benchmark, root: Path, split: str) -> None:
    """Fetches the split's files into ``root``; each appears only once complete. Fails within the timeout offline."""
    root.mkdir(parents=True, exist_ok=True)
    for file, url in benchmark.urls(split).items():
        target = root / file
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as f:
                shutil.copyfileobj(response, f)
            os.replace(partial, target)
            if benchmark.extract and target.name.endswith((".tgz", ".tar.gz")):
                try:
                    with tarfile.open(target) as archive:
                        archive.extractall(target.parent, filter="data")  # "data": no paths outside the folder, no links out, no devices
                except tarfile.TarError as err:
                    raise ValueError(f"{url} is not a safe tar archive ({err}); nothing outside {target.parent} was written") from err
                finally:
                    target.unlink()
        except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
            raise FileNotFoundError(
                f"could not download {url} ({err}); without network access fetch {', '.join(benchmark.files(split))}"
                f" from {benchmark.source} on another machine and put it in {root}"
            ) from err
        finally:
            partial.unlink(missing_ok=True)


def read_split(name: str, root: str | os.PathLike[str], split: str, download: bool = False) -> SplitImages:
    """Returns split ``split`` (``train``, ``val``/``validation`` or ``test``) of benchmark ``name`` (a key of :data:`BENCHMARKS`) read from ``root``.

    Raises:
        ValueError: an unknown benchmark or split, or a file that does not parse as the benchmark's format.
        FileNotFoundError: a file is missing (and ``download`` is off or failed); the message names
            it, where to put it and where to fetch it.
        pickle.UnpicklingError: a pickle that would run code.
    """
    benchmark = _check_name(name)
    if split not in MODES:
        raise ValueError(f"split={split!r} is not one of {sorted(MODES)}")
    split = MODES[split]
    folder = Path(root).expanduser()
    if download and not benchmark.present(folder, split):
        _download(benchmark, folder, split)
    return benchmark.read(folder, split)


def _to_uint8(split: SplitImages, channels: int, image_size: int | None) -> Tensor:
    """Returns the split's images as a uint8 tensor ``(n, channels, S, S)``, resized (Lanczos) when ``image_size`` is set."""
    if isinstance(split.images, np.ndarray) and image_size in (None, split.images.shape[1]) and split.images.shape[1] == split.images.shape[2]:
        return torch.from_numpy(np.ascontiguousarray(split.images)).permute(0, 3, 1, 2).contiguous()
    mode = "RGB" if channels == 3 else "L"
    arrays = []
    for image in split.images:
        pil = decode_image(image, mode)
        if image_size is not None and pil.size != (image_size, image_size):
            pil = pil.resize((image_size, image_size), Image.LANCZOS)
        arrays.append(np.asarray(pil).reshape(pil.size[1], pil.size[0], channels))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)[:3]}...; pass image_size to resize them to one")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class FewShotImages(Dataset[tuple[Tensor, Tensor]]):
    """Returns ``(image, label)``: a float32 ``(C, S, S)`` image in [0, 1] and its class, over the splits of a benchmark.

    All ``splits`` of benchmark ``name`` are read from ``root`` (see :func:`read_split`) and held
    in memory as uint8 (mini-ImageNet: 60,000 images, 1.3 GB; tiered-ImageNet: 779,165 images,
    16.5 GB; CIFAR-FS and FC100: 60,000 images, 184 MB). Classes are numbered split by split,
    in each split's order of first appearance.

    Attributes:
        images, targets, tensors: uint8 ``(n, C, S, S)``, int64 ``(n,)``, and the pair (what
            :class:`~metaloop.tasks.EpisodeSampler` gathers from).
        class_names: ``"<split>/<class>"`` for each class.
        class_groups: ``{"split": split of each class}``, so
            ``EpisodeSampler(dataset, split_by="split", splits={"train": ["train"], "val": ["val"], "test": ["test"]})``
            samples each split from the benchmark's own classes.

    Args:
        image_size: resize every image to ``image_size`` x ``image_size`` (Lanczos); ``None`` keeps
            the published size (84 for the ImageNet subsets, 32 for CIFAR-FS and FC100).
    """

    def __init__(
        self,
        name: str,
        root: str | os.PathLike[str],
        splits: Sequence[str] = SPLITS,
        image_size: int | None = None,
        download: bool = False,
    ) -> None:
        benchmark = _check_name(name)
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size={image_size} must be a positive number of pixels, or None for the published size")
        images: list[Tensor] = []
        targets: list[Tensor] = []
        self.class_names: list[str] = []
        split_of_class: list[str] = []
        for split in splits:
            part = read_split(name, root, split, download)
            short = MODES[split]
            classes = list(dict.fromkeys(part.class_names))
            index = {c: len(self.class_names) + i for i, c in enumerate(classes)}
            self.class_names += [f"{short}/{c}" for c in classes]
            split_of_class += [short] * len(classes)
            images.append(_to_uint8(part, benchmark.channels, image_size))
            targets.append(torch.tensor([index[c] for c in part.class_names], dtype=torch.long))
        shapes = {tuple(x.shape[1:]) for x in images}
        if len(shapes) > 1:
            raise ValueError(f"the splits' images have different shapes {sorted(shapes)}; pass image_size to resize them to one")
        self.images = torch.cat(images)
        self.targets = torch.cat(targets)
        self.class_groups: dict[str, list[str]] = {"split": split_of_class}
        self.tensors = (self.images, self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index].float().div_(255), self.targets[index]
