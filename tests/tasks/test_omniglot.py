from __future__ import annotations

import collections
import hashlib
import io
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from metaloop.tasks import EpisodeSampler, Omniglot, sample_meta_batch
from metaloop.tasks import omniglot as omniglot_module


def drawing(column: int) -> bytes:
    """Returns a 105x105 1-bit PNG like Omniglot's: white, with a black 30x30 square whose left edge is ``column``."""
    image = Image.new("1", (105, 105), 1)
    ImageDraw.Draw(image).rectangle([column, 0, column + 29, 29], fill=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_part(folder: Path, part: str, alphabets: dict[str, int], drawers: int = 3, column: int = 0) -> str:
    """Writes ``folder/<part>.zip`` in the official layout and returns its sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / f"{part}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for alphabet, characters in alphabets.items():
            for c in range(1, characters + 1):
                for d in range(1, drawers + 1):
                    z.writestr(f"{part}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png", drawing(column + 15 * d))
    return hashlib.sha256(archive.read_bytes()).hexdigest()


@pytest.fixture
def fake_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A root with fake images_background.zip (2 alphabets, 3 characters) and images_evaluation.zip (1 alphabet, 2),
    registered as the official sha256s."""
    root = tmp_path / "omniglot"
    monkeypatch.setitem(omniglot_module.OMNIGLOT_SHA256, "images_background", write_part(root, "images_background", {"Alpha": 2, "Beta": 1}))
    monkeypatch.setitem(omniglot_module.OMNIGLOT_SHA256, "images_evaluation", write_part(root, "images_evaluation", {"Gamma": 2}))
    return root


def test_bundled_set_dedupes_the_shared_alphabets(omniglot: Omniglot) -> None:
    assert len(omniglot) == 4840 and omniglot.images.shape == (4840, 1, 28, 28)
    assert omniglot.images.dtype == torch.uint8
    assert len(omniglot.class_names) == 242
    characters = collections.Counter(omniglot.class_groups["alphabet"])
    assert characters == {
        "Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Korean": 40,
        "Latin": 26, "Japanese_(katakana)": 47, "Sanskrit": 42, "Tagalog": 17,
    }
    # Greek and Latin, in both zips, still have 20 drawings per character: one per drawer
    assert torch.bincount(omniglot.targets).tolist() == [20] * 242
    image, label = omniglot[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and int(label) == 0
    assert omniglot.class_names[0] == "Balinese/character01"


def test_bundled_images_are_inverted(omniglot: Omniglot) -> None:
    images = omniglot.images.float() / 255
    assert abs(float(images.mean()) - 0.0843) < 5e-4  # strokes cover about 8% of a character's box
    assert float(images.max()) == 1.0
    assert int(omniglot.images[:, 0, 0, 0].count_nonzero()) == 0  # the corner is background, 0, in every image


def test_second_load_reads_the_cache(omniglot: Omniglot, omniglot_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(source: Path):
        raise AssertionError(f"the second load decoded {source} instead of reading the cache")

    monkeypatch.setattr(omniglot_module, "_read_pngs", no_decoding)
    again = Omniglot(cache_dir=omniglot_cache)
    assert torch.equal(again.images, omniglot.images) and torch.equal(again.targets, omniglot.targets)
    assert len(list(omniglot_cache.glob("omniglot-*.pt"))) == 1


def test_sampler_serves_omniglot_meta_batches(omniglot: Omniglot) -> None:
    sampler = EpisodeSampler(omniglot, n_ways=5, k_shots=1, k_queries=15, rotations=(0, 90, 180, 270))
    assert [sampler.num_classes(split) for split in ("train", "val", "test")] == [680, 144, 144]
    batch = sample_meta_batch(sampler, "train", seed=0, indices=range(32))
    assert [tuple(field.shape) for field in batch] == [(32, 5, 1, 28, 28), (32, 5), (32, 75, 1, 28, 28), (32, 75)]
    assert batch.query_x.dtype == torch.float32
    assert 0.0 == float(batch.query_x.min()) and float(batch.query_x.max()) == 1.0


def test_alphabet_splits_by_name(omniglot: Omniglot) -> None:
    splits = {
        "train": ["Balinese", "Early_Aramaic", "Korean", "Japanese_(katakana)", "Sanskrit", "Tagalog"],
        "val": ["Greek"],
        "test": ["Latin"],
    }
    sampler = EpisodeSampler(omniglot, n_ways=20, k_shots=5, k_queries=5, splits=splits, split_by="alphabet")
    assert [len(sampler.class_splits[split]) for split in ("train", "val", "test")] == [192, 24, 26]
    assert {omniglot.class_names[c].split("/")[0] for c in sampler.class_splits["test"].tolist()} == {"Latin"}
    seeded = EpisodeSampler(omniglot, n_ways=5, splits=(6, 1, 1), split_by="alphabet", split_seed=1)
    assert sum(len(seeded.class_splits[split]) for split in ("train", "val", "test")) == 242
    with pytest.raises(ValueError, match="unknown alphabet 'Klingon' in splits\\['test'\\]; the dataset's alphabet names are"):
        EpisodeSampler(omniglot, splits={"train": ["Greek"], "test": ["Klingon"]}, split_by="alphabet")
    with pytest.raises(ValueError, match="n_ways=30 exceeds the 24 classes in split 'val'"):
        EpisodeSampler(omniglot, n_ways=30, splits=splits, split_by="alphabet")
    with pytest.raises(ValueError, match="k_shots \\+ k_queries = 5 \\+ 16 = 21 exceeds the 20 examples"):
        EpisodeSampler(omniglot, k_shots=5, k_queries=16)


def test_reads_zips_and_unzipped_folders_alike(fake_full: Path, tmp_path: Path) -> None:
    zipped = Omniglot(fake_full, full=True, cache_dir=tmp_path / "cache")
    assert zipped.class_names == [
        "Alpha/character01", "Alpha/character02", "Beta/character01", "Gamma/character01", "Gamma/character02",
    ]
    assert zipped.class_groups["alphabet"] == ["Alpha", "Alpha", "Beta", "Gamma", "Gamma"]
    assert zipped.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    unzipped_root = tmp_path / "unzipped"
    for part in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(fake_full / f"{part}.zip") as z:
            z.extractall(unzipped_root)
    unzipped = Omniglot(unzipped_root, full=True, cache_dir=tmp_path / "cache")
    assert torch.equal(unzipped.images, zipped.images) and torch.equal(unzipped.targets, zipped.targets)
    assert len(list((tmp_path / "cache").glob("omniglot-*.pt"))) == 2  # keyed by source: zip sha256 or folder listing


def test_images_are_resized_antialiased_and_inverted(fake_full: Path, tmp_path: Path) -> None:
    big = Omniglot(fake_full, full=True, image_size=105, cache_dir=tmp_path / "cache")
    # drawer 1's square spans columns 15..44 and rows 0..29: strokes 255, background 0
    assert big.images[0, 0, :30, 15:45].float().mean() == 255 and int(big.images[0, 0, 30:, :].count_nonzero()) == 0
    small = Omniglot(fake_full, full=True, image_size=28, cache_dir=tmp_path / "cache")
    assert small.images.shape == (15, 1, 28, 28)
    # the square covers (30/105)^2 of the image; antialiased resizing keeps that ink within 2%
    assert abs(float(small.images[0].float().mean() / 255) - (30 / 105) ** 2) < 0.02


def test_missing_zip_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images_background.zip not found .* pass download=True, or fetch https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip"):
        Omniglot(tmp_path, full=True, cache_dir=tmp_path / "cache")


def test_corrupt_zip_is_refused(fake_full: Path, tmp_path: Path) -> None:
    (fake_full / "images_evaluation.zip").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="images_evaluation.zip has sha256 .* the file is corrupt or incomplete; delete it"):
        Omniglot(fake_full, full=True, cache_dir=tmp_path / "cache")
    bundled_copy = tmp_path / "small"
    bundled_copy.mkdir()
    (bundled_copy / "images_background_small1.zip").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="expected f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"):
        Omniglot(bundled_copy, cache_dir=tmp_path / "cache")


def test_download_fails_fast_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(omniglot_module, "OMNIGLOT_URL", "http://127.0.0.1:9/python")  # nothing listens on port 9
    with pytest.raises(FileNotFoundError, match="could not download http://127.0.0.1:9/python/images_background.zip .* put it at"):
        Omniglot(tmp_path / "root", full=True, download=True, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "root").iterdir()) == []  # no partial file left behind


def test_download_verifies_sha256(fake_full: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(omniglot_module, "OMNIGLOT_URL", fake_full.as_uri())
    downloaded = Omniglot(tmp_path / "root", full=True, download=True, cache_dir=tmp_path / "cache")
    assert len(downloaded) == 15 and sorted(p.name for p in (tmp_path / "root").iterdir()) == [
        "images_background.zip", "images_evaluation.zip",
    ]
    monkeypatch.setitem(omniglot_module.OMNIGLOT_SHA256, "images_evaluation", "0" * 64)
    with pytest.raises(ValueError, match="images_evaluation.zip has sha256 .*, expected 0000"):
        Omniglot(tmp_path / "other", full=True, download=True, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["images_background.zip"]


def test_conflicting_copies_of_an_image_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for part, column in (("images_background_small1", 0), ("images_background_small2", 5)):
        monkeypatch.setitem(omniglot_module.OMNIGLOT_SHA256, part, write_part(tmp_path, part, {"Greek": 1}, column=column))
    with pytest.raises(ValueError, match="Greek/character01/0001_01.png differs between Omniglot sources"):
        Omniglot(tmp_path, cache_dir=tmp_path / "cache")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="full=True needs root=<folder>"):
        Omniglot(full=True, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size=0 must be at least 1 pixel"):
        Omniglot(image_size=0, cache_dir=tmp_path)
