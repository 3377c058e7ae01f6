"""Decompression bombs in data files are refused in one line naming the file, before they are inflated.

A few-KB ``imagelabels.mat`` (VGG Flowers' labels) whose zlib stream inflates to gigabytes, and a PNG whose
header claims 200 megapixels. The files are generated small: the bomb's size is scaled down, and the
readers run with a memory cap just above what their imports take, so the old readers fail the test
(MemoryError) instead of exhausting the machine.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
from test_image_benchmarks import fewshot_data
from test_omniglot import drawing

from metaloop.tasks import FewShotImages, Omniglot, read_split
from metaloop.tasks.image_benchmarks import MAT_MAX_BYTES, decode_image, read_mat_array


def _mat_bomb(path: Path, inflated: int) -> None:
    """Writes a MAT-file whose one compressed element inflates to ``inflated`` zero bytes."""
    packer, chunk = zlib.compressobj(9), bytes(16 * 2**20)
    packed = b"".join(packer.compress(chunk) for _ in range(inflated // len(chunk))) + packer.flush()
    header = b"MATLAB 5.0 MAT-file".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + struct.pack("<II", 15, len(packed)) + packed)


def _png_header(path: Path, width: int, height: int) -> None:
    """Writes a PNG whose header claims ``width`` x ``height`` 8-bit grey pixels (its pixel data is a stub)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_a_mat_file_that_inflates_beyond_the_limit_is_refused_naming_it(tmp_path):
    root = tmp_path / "flowers"
    fewshot_data.write_vgg_flowers(root, per_class=1)
    labels = root / "vgg_flower102" / "imagelabels.mat"
    _mat_bomb(labels, 256 * 2**20)  # 256 MiB in ~250 KB (the issue's: 2 GiB in 2 MB)
    assert labels.stat().st_size < 2**20 < MAT_MAX_BYTES < 256 * 2**20
    capped = textwrap.dedent(f"""
        import resource
        from metaloop.tasks import read_split  # the imports, before the cap
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 160 * 2**20, resource.RLIM_INFINITY))
        try:
            read_split("vgg-flowers", {str(root)!r}, "train")
        except ValueError as err:
            print(err)
    """)
    done = subprocess.run([sys.executable, "-c", capped], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == (
        f"{labels} expands to more than 16 MiB when decompressed (a MAT-file of labels holds kilobytes): the file is "
        "corrupt or not the published one, delete it and fetch it again"
    )


def test_a_mat_file_with_a_corrupt_compressed_stream_is_named(tmp_path):
    path = tmp_path / "imagelabels.mat"
    header = b"MATLAB 5.0 MAT-file".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    path.write_bytes(header + struct.pack("<II", 15, 8) + b"notzlib!")
    with pytest.raises(ValueError, match=f"{path} is not a MAT-file with intact compressed data"):
        read_mat_array(path, "labels")


def test_a_200_megapixel_image_is_refused_from_its_header_naming_the_file(tmp_path):
    root = tmp_path / "flowers"
    fewshot_data.write_vgg_flowers(root, per_class=1)
    bomb = read_split("vgg-flowers", root, "train").images[3]
    _png_header(bomb, 20_000, 10_000)
    with pytest.raises(ValueError) as refused:
        FewShotImages("vgg-flowers", root, splits=["train"], image_size=8)
    message = str(refused.value)
    assert message.startswith(f"{bomb} is refused: Image size (200000000 pixels) exceeds limit")
    assert message.endswith("delete it and fetch it again (or raise PIL.Image.MAX_IMAGE_PIXELS for a genuine image that large)")
    assert len(message.splitlines()) == 1


def test_an_image_above_pils_warning_limit_is_refused_too(tmp_path):
    """Between PIL's limit (89 megapixels) and twice that, PIL only warns, then decodes: 300 MB for 100 megapixels."""
    bomb = tmp_path / "big.png"
    _png_header(bomb, 10_000, 10_000)
    with pytest.raises(ValueError, match=f"{bomb} is refused: Image size \\(100000000 pixels\\) exceeds limit"):
        decode_image(bomb)


def test_a_200_megapixel_png_in_omniglot_names_the_file(tmp_path):
    root = tmp_path / "unzipped"
    for part, alphabet in (("images_background", "Alpha"), ("images_evaluation", "Gamma")):
        folder = root / part / alphabet / "character01"
        folder.mkdir(parents=True)
        (folder / "0001_01.png").write_bytes(drawing(10))
    bomb = root / "images_background" / "Alpha" / "character01" / "0001_02.png"
    _png_header(bomb, 20_000, 10_000)
    with pytest.raises(ValueError, match=f"{bomb} is refused: Image size \\(200000000 pixels\\)"):
        Omniglot(root, full=True, cache_dir=tmp_path / "cache")

