"""Omniglot data errors name the file: read-only and damaged caches, corrupt images, a root that is a file, downloads."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest
import torch
from test_omniglot import drawing, write_part

from metaloop.tasks import Omniglot
from metaloop.tasks import omniglot as omniglot_module


@pytest.fixture
def fake_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "omniglot"
    monkeypatch.setitem(omniglot_module.OMNIGLOT_SHA256, "images_background", write_part(root, "images_background", {"Alpha": 2}))
    monkeypatch.setitem(omniglot_module.OMNIGLOT_SHA256, "images_evaluation", write_part(root, "images_evaluation", {"Gamma": 1}))
    return root


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_decodes_in_memory_as_non_root(fake_full: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.warns(UserWarning, match="cannot write the Omniglot cache .* stay decoded in memory"):
        data = Omniglot(fake_full, full=True, cache_dir=cache)
    assert len(data) == 9


def test_a_cache_that_cannot_be_written_decodes_in_memory(fake_full: Path, tmp_path: Path) -> None:
    # a file where the cache folder should be: no process can create files below it, root included
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    with pytest.warns(UserWarning, match=f"cannot write the Omniglot cache {blocked}/omniglot-.* stay decoded in memory"):
        data = Omniglot(fake_full, full=True, cache_dir=blocked)
    reference = Omniglot(fake_full, full=True, cache_dir=tmp_path / "cache")
    assert torch.equal(data.images, reference.images) and data.class_names == reference.class_names


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"PK\x03\x04 truncated zip"])
def test_a_damaged_cache_file_is_rebuilt(fake_full: Path, tmp_path: Path, content: bytes) -> None:
    cache = tmp_path / "cache"
    first = Omniglot(fake_full, full=True, cache_dir=cache)
    (cached,) = cache.glob("omniglot-*.pt")
    cached.write_bytes(content)
    with pytest.warns(UserWarning, match=f"the Omniglot cache {cached} is unreadable"):
        again = Omniglot(fake_full, full=True, cache_dir=cache)
    assert torch.equal(again.images, first.images)
    assert torch.load(cached, weights_only=True)["class_names"] == first.class_names  # rewritten whole


def test_a_cache_file_of_something_else_is_rebuilt(fake_full: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    Omniglot(fake_full, full=True, cache_dir=cache)
    (cached,) = cache.glob("omniglot-*.pt")
    torch.save({"state_dict": {}}, cached)
    with pytest.warns(UserWarning, match="is not a cache of images"):
        assert len(Omniglot(fake_full, full=True, cache_dir=cache)) == 9


def test_a_corrupt_png_names_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "unzipped"
    for alphabet in ("Alpha", "Beta"):
        folder = root / "images_background" / alphabet / "character01"
        folder.mkdir(parents=True)
        (folder / "0001_01.png").write_bytes(drawing(10))
    broken = root / "images_background" / "Beta" / "character01" / "0001_01.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "images_evaluation" / "Gamma" / "character01").mkdir(parents=True)
    (root / "images_evaluation" / "Gamma" / "character01" / "0001_01.png").write_bytes(drawing(5))
    with pytest.raises(ValueError, match=f"{broken} is not a readable image"):
        Omniglot(root, full=True, cache_dir=tmp_path / "cache")


def test_a_corrupt_png_inside_a_zip_names_the_zip_and_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "omniglot"
    root.mkdir()
    archive = root / "images_background.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("images_background/Alpha/character01/0001_01.png", b"not a png")
    import hashlib

    monkeypatch.setitem(omniglot_module.OMNIGLOT_SHA256, "images_background", hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(omniglot_module.OMNIGLOT_SHA256, "images_evaluation", write_part(root, "images_evaluation", {"Gamma": 1}))
    with pytest.raises(ValueError, match=f"{archive}:images_background/Alpha/character01/0001_01.png is not a readable image"):
        Omniglot(root, full=True, cache_dir=tmp_path / "cache")


def test_a_root_that_is_a_file_says_so(tmp_path: Path) -> None:
    root = tmp_path / "omniglot.zip"
    root.write_bytes(b"PK")
    with pytest.raises(NotADirectoryError, match=f"Omniglot root={root} is a file; root must be the folder that holds images_background.zip"):
        Omniglot(root, full=True, cache_dir=tmp_path / "cache")
