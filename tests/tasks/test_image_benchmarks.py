"""metaloop.tasks.image_benchmarks: readers of mini-ImageNet, tiered-ImageNet, CIFAR-FS and FC100 files, on generated files of the same formats."""

from __future__ import annotations

import importlib.util
import os
import pickle
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import metaloop
from metaloop.tasks import BENCHMARKS, EpisodeSampler, FewShotImages, read_split
from metaloop.tasks import image_benchmarks

SCRIPT = Path(metaloop.__file__).resolve().parents[1] / "scripts" / "fewshot_data.py"
_spec = importlib.util.spec_from_file_location("fewshot_data", SCRIPT)
fewshot_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fewshot_data)

SIZES = {"mini-imagenet": 84, "tiered-imagenet": 84, "cifarfs": 32, "fc100": 32}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fewshot")
    for write in fewshot_data.WRITERS.values():
        write(root, (6, 5, 5), 4)
    return root


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("split, classes", [("train", 6), ("validation", 5), ("val", 5), ("test", 5)])
def test_each_split_reads_its_classes_and_images(name, split, classes, files):
    part = read_split(name, files, split)
    assert len(part.images) == len(part.class_names) == classes * 4
    assert len(set(part.class_names)) == classes
    first = image_benchmarks.decode_image(part.images[0])
    assert first.size == (SIZES[name], SIZES[name]) and first.mode == "RGB"


def test_pixels_survive_reading_exactly(files):
    raw = pickle.loads((files / "mini-imagenet-cache-test.pkl").read_bytes())
    part = read_split("mini-imagenet", files, "test")
    assert np.array_equal(part.images, raw["image_data"])
    (wnid, indices), = [next(iter(raw["class_dict"].items()))]
    assert all(part.class_names[i] == wnid for i in indices)
    fc = pickle.loads((files / "FC100_val.pickle").read_bytes())
    data = FewShotImages("fc100", files, splits=["val"])
    assert torch.equal(data.images, torch.from_numpy(fc["data"]).permute(0, 3, 1, 2))
    tiered = FewShotImages("tiered-imagenet", files, splits=["test"])
    images = pickle.loads((files / "tiered-imagenet" / "test_images_png.pkl").read_bytes())
    decoded = np.array(image_benchmarks.decode_image(images[3].tobytes()))
    assert torch.equal(tiered.images[3], torch.from_numpy(decoded).permute(2, 0, 1))


def test_cifarfs_reads_the_zip_the_unzipped_folder_and_learn2learns_processed_layout(files, tmp_path):
    from_zip = FewShotImages("cifarfs", files)
    with zipfile.ZipFile(files / "cifarfs.zip") as zf:
        zf.extractall(tmp_path / "unzipped" / "cifarfs")
    unzipped = FewShotImages("cifarfs", tmp_path / "unzipped")
    assert torch.equal(from_zip.images, unzipped.images) and from_zip.class_names == unzipped.class_names
    processed = tmp_path / "processed"
    for split in ("train", "val", "test"):
        for c in (tmp_path / "unzipped/cifarfs/cifar100/splits/bertinetto" / f"{split}.txt").read_text().split():
            (processed / "cifarfs/processed" / split).mkdir(parents=True, exist_ok=True)
            os.symlink(tmp_path / "unzipped/cifarfs/cifar100/data" / c, processed / "cifarfs/processed" / split / c)
    assert torch.equal(FewShotImages("cifarfs", processed).images, from_zip.images)


def test_fc100_reads_from_its_zip(files, tmp_path):
    with zipfile.ZipFile(tmp_path / "fc100.zip", "w") as zf:
        for split in ("train", "val", "test"):
            zf.write(files / f"FC100_{split}.pickle", f"FC100/FC100_{split}.pickle")
    assert torch.equal(FewShotImages("fc100", tmp_path).images, FewShotImages("fc100", files).images)


def test_few_shot_images_number_classes_by_split_and_feed_the_episode_sampler(files):
    data = FewShotImages("mini-imagenet", files)
    assert data.images.shape == (64, 3, 84, 84) and data.images.dtype == torch.uint8
    assert data.class_groups["split"] == ["train"] * 6 + ["val"] * 5 + ["test"] * 5
    assert data.class_names[6].startswith("val/")
    x, y = data[0]
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1 and int(y) == 0
    sampler = EpisodeSampler(data, n_ways=5, k_shots=1, k_queries=3, split_by="split",
                             splits={"train": ["train"], "val": ["val"], "test": ["test"]})
    assert {split: sampler.class_splits[split].tolist() for split in ("train", "val", "test")} == {
        "train": list(range(6)), "val": list(range(6, 11)), "test": list(range(11, 16))}
    task = sampler("val", torch.Generator().manual_seed(0))
    assert task.support_x.shape == (5, 3, 84, 84) and task.query_x.shape == (15, 3, 84, 84)


def test_image_size_resizes(files):
    data = FewShotImages("cifarfs", files, splits=["test"], image_size=16)
    assert data.images.shape == (20, 3, 16, 16)
    with pytest.raises(ValueError, match="image_size=0"):
        FewShotImages("cifarfs", files, image_size=0)


@pytest.mark.parametrize("name, missing", [
    ("mini-imagenet", "mini-imagenet-cache-validation.pkl"),
    ("tiered-imagenet", "val_images_png.pkl"),
    ("cifarfs", "cifarfs.zip"),
    ("fc100", "FC100_val.pickle"),
])
def test_a_missing_file_is_named_with_where_to_get_it(name, missing, tmp_path):
    with pytest.raises(FileNotFoundError, match=missing) as err:
        read_split(name, tmp_path, "validation")
    assert "zenodo.org" in str(err.value) and str(tmp_path) in str(err.value)


def test_download_fails_fast_offline_with_the_same_advice(tmp_path, monkeypatch):
    calls = []

    def offline(url, timeout):
        calls.append((url, timeout))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="could not download .*mini-imagenet-cache-train.pkl.*put it in"):
        read_split("mini-imagenet", tmp_path, "train", download=True)
    assert calls == [("https://zenodo.org/record/7978538/files/mini-imagenet-cache-train.pkl", image_benchmarks.DOWNLOAD_TIMEOUT_S)]
    assert not list(tmp_path.iterdir())  # no partial file is left behind


def test_download_is_skipped_when_the_files_are_there(files, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded although present"))
    assert len(read_split("cifarfs", files, "test", download=True).images) == 20


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_malicious_mini_imagenet_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"image_data": RunsCode(), "class_dict": {}}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_split("mini-imagenet", tmp_path, "train")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name, file, content, message", [
    ("mini-imagenet", "mini-imagenet-cache-train.pkl", {"images": 1}, "mini-ImageNet cache pickle"),
    ("mini-imagenet", "mini-imagenet-cache-train.pkl", {"image_data": np.zeros((2, 4, 4, 3)), "class_dict": {"a": [0, 1]}}, "uint8"),
    ("fc100", "FC100_train.pickle", {"data": np.zeros((2, 4, 4, 3), np.uint8), "labels": [1]}, "one label per image"),
    ("tiered-imagenet", "tiered-imagenet/train_labels.pkl", {"general": []}, "tiered-ImageNet labels pickle"),
])
def test_files_of_the_wrong_layout_are_named(name, file, content, message, tmp_path):
    (tmp_path / "tiered-imagenet").mkdir()
    (tmp_path / "tiered-imagenet/train_images_png.pkl").write_bytes(pickle.dumps([]))
    (tmp_path / file).write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_split(name, tmp_path, "train")


def test_unknown_benchmark_and_split():
    with pytest.raises(ValueError, match="unknown benchmark 'imagenet'.*mini-imagenet"):
        read_split("imagenet", "/tmp", "train")
    with pytest.raises(ValueError, match="split='dev'"):
        read_split("fc100", "/tmp", "dev")


# -- the fine-grained sets: fixed Meta-Dataset class lists ----------------------------------------
FINE = {"cub200": (140, 30, 30), "dtd": (33, 7, 7), "fgvc-aircraft": (70, 15, 15), "vgg-flowers": (71, 15, 16)}


@pytest.fixture(scope="module")
def fine_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fine")
    for write in fewshot_data.FINE_GRAINED.values():
        write(root, 2)
    return root


@pytest.mark.parametrize("name", sorted(FINE))
def test_fine_grained_splits_have_meta_datasets_classes(name, fine_files):
    counts = [len(set(read_split(name, fine_files, split).class_names)) for split in ("train", "validation", "test")]
    assert tuple(counts) == FINE[name]
    part = read_split(name, fine_files, "test")
    assert image_benchmarks.decode_image(part.images[0]).size == (40, 30)


def test_fine_grained_images_need_an_image_size_in_memory(fine_files):
    with pytest.raises(ValueError, match="pass image_size"):
        from PIL import Image
        first = read_split("dtd", fine_files, "test").images[0]
        Image.open(first).resize((41, 30)).save(first)  # one image of another size
        FewShotImages("dtd", fine_files, splits=["test"])
    data = FewShotImages("dtd", fine_files, splits=["test"], image_size=24)
    assert data.images.shape == (14, 3, 24, 24)


def test_boxes_come_with_cub_and_aircraft(fine_files):
    cub = read_split("cub200", fine_files, "validation")
    assert cub.boxes is not None and cub.boxes[0] == (2, 3, 22, 13)
    aircraft = read_split("fgvc-aircraft", fine_files, "train")
    assert aircraft.boxes is not None and aircraft.boxes[0] == (1, 2, 30, 20)
    assert image_benchmarks.decode_image(aircraft.images[0], box=aircraft.boxes[0]).size == (29, 18)


@pytest.mark.parametrize("compress", [False, True])
def test_mat_files_read_as_matlab_stores_them(compress, tmp_path):
    values = np.arange(12, dtype=float).reshape(3, 4)
    fewshot_data.write_mat(tmp_path / "a.mat", "labels", values, compress=compress)
    assert np.array_equal(image_benchmarks.read_mat_array(tmp_path / "a.mat", "labels"), values)
    with pytest.raises(ValueError, match="numeric array 'other'"):
        image_benchmarks.read_mat_array(tmp_path / "a.mat", "other")
    (tmp_path / "b.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match="level-5 MAT-file"):
        image_benchmarks.read_mat_array(tmp_path / "b.mat", "labels")


@pytest.mark.parametrize("name, missing", [
    ("cub200", "CUB_200_2011.tgz"), ("dtd", "dtd-r1.0.1.tar.gz"), ("fgvc-aircraft", "fgvc-aircraft-2013b.tar.gz"), ("vgg-flowers", "102flowers.tgz"),
])
def test_fine_grained_missing_files_name_the_archive(name, missing, tmp_path):
    with pytest.raises(FileNotFoundError, match=missing):
        read_split(name, tmp_path, "train")


def test_downloaded_archives_are_unpacked_safely(tmp_path, monkeypatch):
    import io
    import tarfile

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for c in ("a", "b"):
            data = b"x"
            info = tarfile.TarInfo(f"dtd/images/{c}/1.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo("../../escaped.txt")
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b"!"))

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(archive.getvalue()))
    with pytest.raises(ValueError, match="not a safe tar archive"):
        read_split("dtd", tmp_path / "root", "train", download=True)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "root" / "describable_textures" / "dtd-r1.0.1.tar.gz").exists()
