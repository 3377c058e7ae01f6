"""Omniglot (Lake et al., 2015): 1,623 handwritten characters of 50 alphabets, 20 drawings each."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from metaloop.tasks.image_benchmarks import decode_image

__all__ = ["OMNIGLOT_SHA256", "OMNIGLOT_URL", "Omniglot"]

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python"

# sha256 of the official zips, as listed by tensorflow/datasets (url_checksums/omniglot.txt), which
# gives the two small splits' values that match the bundled copies byte for byte. torchvision's
# Omniglot lists md5 68d2efa1b9178cc56df9314c21c6e718 (background) and
# 6b91aef0f799c5bb55b94e3f2daec811 (evaluation) for the same URLs.
OMNIGLOT_SHA256 = {
    "images_background": "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
    "images_evaluation": "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
    "images_background_small1": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "images_background_small2": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
}
BUNDLED_ROOT = Path(__file__).parent / "data" / "omniglot"
DOWNLOAD_TIMEOUT_S = 15.0
# bump when decoding changes, so caches written by older code are not reused
_CACHE_VERSION = 1
_IMAGE = re.compile(r"([^/]+)/(character\d+)/([^/]+\.png)")


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metaloop"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Omniglot(Dataset[tuple[Tensor, Tensor]]):
    """Returns ``(image, label)``: a float32 ``(1, S, S)`` character image in [0, 1] (stroke = 1) and its class.

    Without arguments it reads the copy bundled with metaloop, the two official "minimal" background
    splits (``images_background_small1/2.zip``, MIT licence): 8 alphabets, 242 characters, 4,840
    images, so it works offline. Greek and Latin appear in both zips as the same files (same names,
    same bytes): the same alphabet, character and drawer in both zips is one image, read once.
    With ``full=True`` it reads the whole set, ``images_background.zip`` (30 alphabets, 964
    characters) and ``images_evaluation.zip`` (20 alphabets, 659 characters), from ``root``.

    Each part is read from ``root/<part>.zip`` directly, or else from the unzipped
    ``root/<part>/<Alphabet>/characterNN/<id>_<drawer>.png``. A zip must match its official sha256
    (:data:`OMNIGLOT_SHA256`; for the full zips these are the values tensorflow/datasets lists; the
    md5 values torchvision lists are noted beside them). Images are resized to ``image_size`` with
    Lanczos filtering (antialiased) and inverted, so strokes are 1 and background 0.

    Decoding takes seconds (about 2 s for the bundled set, 10-20 s for the full one), so the decoded
    uint8 images are cached in ``cache_dir`` (default ``$XDG_CACHE_HOME/metaloop``, else
    ``~/.cache/metaloop``), keyed by the sources' sha256 (or, for unzipped folders, their file
    listing), ``image_size`` and a format version; later loads read one file.

    Attributes:
        images: uint8 ``(n, 1, S, S)``, all images in memory, strokes 255.
        targets: int64 ``(n,)`` class of each image; classes are sorted by alphabet, then character.
        tensors: ``(images, targets)``, which :class:`~metaloop.tasks.EpisodeSampler` gathers from directly.
        class_names: ``"<Alphabet>/characterNN"`` of each class.
        class_groups: ``{"alphabet": alphabet of each class}``, for ``EpisodeSampler(split_by="alphabet")``.

    Args:
        root: folder holding the zips or unzipped folders; ``None`` reads the bundled copy
            (``full=False`` only).
        full: read the full background + evaluation sets instead of the two minimal splits.
        download: fetch missing zips from the official repository (:data:`OMNIGLOT_URL`) into
            ``root``, verified by sha256. Fails within :data:`DOWNLOAD_TIMEOUT_S` without a network.

    Raises:
        FileNotFoundError: a part is neither zipped nor unzipped in ``root`` (and ``download`` is off
            or the download failed); the message says where to put the files.
        ValueError: a zip whose sha256 differs (corrupt or incomplete), a folder without images in
            the official layout, or ``full=True`` without ``root``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        full: bool = False,
        download: bool = False,
        image_size: int = 28,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be at least 1 pixel; the usual value is 28")
        parts = ("images_background", "images_evaluation") if full else ("images_background_small1", "images_background_small2")
        if root is None and full:
            raise ValueError(
                "full=True needs root=<folder> for images_background.zip and images_evaluation.zip"
                " (they are not bundled); pass root, with download=True to fetch them"
            )
        folder = BUNDLED_ROOT if root is None else Path(root).expanduser()
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(
                f"Omniglot root={folder} is a file; root must be the folder that holds {parts[0]}.zip and {parts[1]}.zip"
                " (or their unzipped folders)"
            )
        sources = [_locate(folder, part, download) for part in parts]
        key = hashlib.sha256(
            f"{_CACHE_VERSION}:{image_size}:".encode() + b":".join(_fingerprint(path).encode() for path in sources)
        ).hexdigest()[:20]
        cached = Path(cache_dir if cache_dir is not None else _default_cache_dir()).expanduser() / f"omniglot-{key}.pt"
        data = _read_cache(cached)
        if data is None:
            data = _decode_all(sources, image_size)
            _write_cache(cached, data)
        self.images: Tensor = data["images"]
        self.targets: Tensor = data["targets"]
        self.class_names: list[str] = data["class_names"]
        self.class_groups: dict[str, list[str]] = {"alphabet": [name.split("/")[0] for name in self.class_names]}
        self.tensors = (self.images, self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index].float().div_(255), self.targets[index]


def _read_cache(cached: Path) -> dict[str, object] | None:
    """Returns the decoded images cached at ``cached``, or None if absent or unreadable (then it is rebuilt)."""
    if not cached.is_file():
        return None
    try:
        data = torch.load(cached, weights_only=True)
    except Exception as err:  # a damaged cache is rebuilt, whatever torch.load makes of it
        warnings.warn(f"the Omniglot cache {cached} is unreadable ({type(err).__name__}); decoding the images again", stacklevel=3)
        return None
    if not isinstance(data, dict) or not {"images", "targets", "class_names"} <= set(data):
        warnings.warn(f"the Omniglot cache {cached} is not a cache of images; decoding the images again", stacklevel=3)
        return None
    return data


def _write_cache(cached: Path, data: dict[str, object]) -> None:
    """Saves ``data`` at ``cached`` atomically; a folder that cannot be written leaves the images in memory only."""
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.part")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, partial)
        os.replace(partial, cached)  # atomic: concurrent loaders (DDP ranks, test workers) never see half a file
    except OSError as err:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        warnings.warn(
            f"cannot write the Omniglot cache {cached} ({err.strerror or err}); the images stay decoded in memory "
            "only (set cache_dir to a writable folder to reuse them)",
            stacklevel=3,
        )


def _locate(folder: Path, part: str, download: bool) -> Path:
    """Returns the verified zip, or else the unzipped folder, of ``part`` in ``folder``; downloads if allowed."""
    archive = folder / f"{part}.zip"
    unzipped = folder / part
    if archive.exists():
        _verify(archive, part, str(archive))
    elif unzipped.is_dir():
        return unzipped
    elif download:
        _download(part, archive)
    else:
        raise FileNotFoundError(
            f"Omniglot file {archive} not found (nor the unzipped folder {unzipped}); pass download=True,"
            f" or fetch {OMNIGLOT_URL}/{part}.zip and put it there"
        )
    return archive


def _verify(path: Path, part: str, origin: str) -> None:
    """Raises ValueError unless ``path`` (read from ``origin``) has the official sha256 of ``part``."""
    actual = _sha256(path)
    if actual != OMNIGLOT_SHA256[part]:
        raise ValueError(
            f"{origin} has sha256 {actual}, expected {OMNIGLOT_SHA256[part]} for {part}.zip: the file is corrupt or"
            f" incomplete; delete it and download it again (download=True, or {OMNIGLOT_URL}/{part}.zip)"
        )


def _download(part: str, archive: Path) -> None:
    """Fetches ``part``'s zip to ``archive``, which appears only once its sha256 is verified."""
    url = f"{OMNIGLOT_URL}/{part}.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f"{archive.name}.{os.getpid()}.part")
    try:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
            raise FileNotFoundError(
                f"could not download {url} ({err}); without network access, fetch it on another machine and put it"
                f" at {archive} (or unzip it into {archive.with_suffix('')})"
            ) from err
        _verify(partial, part, url)
        os.replace(partial, archive)
    finally:
        partial.unlink(missing_ok=True)


def _fingerprint(source: Path) -> str:
    """Returns what identifies a source's content: a zip's sha256, or a digest of a folder's file listing."""
    if source.suffix == ".zip":
        return _sha256(source)
    listing = hashlib.sha256()
    for path in sorted(source.rglob("*.png")):
        stat = path.stat()
        listing.update(f"{path.relative_to(source)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return listing.hexdigest()


def _read_pngs(source: Path) -> Iterator[tuple[tuple[str, str, str], bytes, str]]:
    """Yields ``((alphabet, character, file name), png bytes, where it was read)`` of every image in a zip or folder."""
    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as archive:
            for name in archive.namelist():
                match = _IMAGE.fullmatch(name.split("/", 1)[-1])
                if match:
                    yield match.groups(), archive.read(name), f"{source}:{name}"  # type: ignore[misc]
    else:
        for path in source.glob("*/character*/*.png"):
            yield (path.parent.parent.name, path.parent.name, path.name), path.read_bytes(), str(path)


def _decode_all(sources: list[Path], image_size: int) -> dict[str, object]:
    """Returns the decoded images of all ``sources`` (duplicates across sources read once), their labels and class names."""
    pngs: dict[tuple[str, str, str], bytes] = {}
    origins: dict[tuple[str, str, str], str] = {}
    for source in sources:
        count = 0
        for key, png, origin in _read_pngs(source):
            origins.setdefault(key, origin)
            if pngs.setdefault(key, png) != png:
                raise ValueError(f"{'/'.join(key)} differs between Omniglot sources {sources}; use one copy of each part")
            count += 1
        if count == 0:
            raise ValueError(
                f"{source} holds no images in the layout <Alphabet>/characterNN/<id>_<drawer>.png;"
                " use the official Omniglot zips or their unzipped folders"
            )
    keys = sorted(pngs)
    class_names = sorted({f"{alphabet}/{character}" for alphabet, character, _ in keys})
    class_of = {name: c for c, name in enumerate(class_names)}
    images = np.empty((len(keys), 1, image_size, image_size), dtype=np.uint8)
    for i, key in enumerate(keys):
        gray = decode_image(pngs[key], "L", name=origins[key]).resize((image_size, image_size), Image.LANCZOS)
        images[i, 0] = 255 - np.asarray(gray)
    targets = torch.tensor([class_of[f"{alphabet}/{character}"] for alphabet, character, _ in keys])
    return {"images": torch.from_numpy(images), "targets": targets, "class_names": class_names}
