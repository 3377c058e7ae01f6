"""``l2l.vision``: models, datasets (on generated files of the published formats), RandomClassRotation, get_tasksets."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import random
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metaloop
import metaloop.nn.vision
from metaloop.compat.learn2learn import data as l2ldata
from metaloop.compat.learn2learn import vision
from metaloop.compat.learn2learn.data import DataDescription, MetaDataset, Taskset
from metaloop.compat.learn2learn.data.transforms import LoadData
from metaloop.tasks.image_transforms import ToTensor

_spec = importlib.util.spec_from_file_location(
    "fewshot_data", Path(metaloop.__file__).resolve().parents[1] / "scripts" / "fewshot_data.py"
)
fewshot_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fewshot_data)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("l2l-data")
    for write in fewshot_data.WRITERS.values():
        write(folder, (6, 5, 5), 12)
    return folder


@pytest.mark.parametrize("module", ["vision.models", "vision.datasets", "vision.transforms", "vision.benchmarks"])
def test_submodules_import(module):
    assert importlib.import_module(f"metaloop.compat.learn2learn.{module}") is getattr(vision, module.split(".")[1])


@pytest.mark.parametrize("name", [
    "OmniglotFC", "OmniglotCNN", "MiniImagenetCNN", "CNN4", "CNN4Backbone", "ConvBase", "ResNet12", "ResNet12Backbone",
    "WRN28", "WRN28Backbone", "maml_init_", "fc_init_",
])
def test_models_are_metaloops(name):
    assert getattr(vision.models, name) is getattr(metaloop.nn.vision, name)


def test_pretrained_backbone_loads_local_weights_and_names_the_url(tmp_path):
    weights = tmp_path / "pretrained_models" / "fc100" / "cnn4.pth"
    weights.parent.mkdir(parents=True)
    reference = vision.models.CNN4Backbone(channels=3, max_pool=True)
    torch.save(reference.state_dict(), weights)
    loaded = vision.models.get_pretrained_backbone("cnn4", "fc100", root=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="zenodo.org/record/5651278/files/25u1gtp5.pth"):
        vision.models.get_pretrained_backbone("resnet12", "mini-imagenet", root=tmp_path)
    with pytest.raises(ValueError, match="model='cnn4', dataset='mini-imagenet'"):
        vision.models.get_pretrained_backbone("cnn4", "mini-imagenet", root=tmp_path)


# -- datasets --------------------------------------------------------------------------------
def test_mini_imagenet_items_are_float_0_255_with_class_dict_order(root):
    ds = vision.datasets.MiniImagenet(root, mode="validation")
    raw = pickle.loads((root / "mini-imagenet-cache-validation.pkl").read_bytes())
    x, y = ds[13]
    assert x.shape == (3, 84, 84) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(raw["image_data"][13]).permute(2, 0, 1).float())
    classes = list(raw["class_dict"])
    assert classes[y] == next(c for c, idx in raw["class_dict"].items() if 13 in idx)
    assert len(ds) == 60 and MetaDataset(ds).labels == [0, 1, 2, 3, 4]


def test_pil_datasets_and_their_labels(root):
    fc = vision.datasets.FC100(root, mode="test", transform=ToTensor(), target_transform=lambda y: y + 1000)
    raw = pickle.loads((root / "FC100_test.pickle").read_bytes())
    x, y = fc[5]
    assert torch.equal(x, torch.from_numpy(raw["data"][5]).permute(2, 0, 1).float() / 255) and y == raw["labels"][5] + 1000
    image, label = vision.datasets.FC100(root, mode="train")[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and label == 0
    cifar = vision.datasets.CIFARFS(root, mode="train")
    assert cifar.classes == sorted(cifar.classes) and len(cifar) == 72 and isinstance(cifar[0][0], Image.Image)
    assert cifar.class_to_idx[cifar.classes[2]] == 2
    tiered = vision.datasets.TieredImagenet(root, mode="test")
    assert tiered[0][0].size == (84, 84) and sorted(set(tiered.targets)) == [0, 1, 2, 3, 4]


def test_metadataset_indexes_datasets_without_decoding_images(root, monkeypatch):
    ds = vision.datasets.CIFARFS(root, mode="test")
    monkeypatch.setattr(type(ds), "load", lambda self, i: pytest.fail("decoded an image"))
    assert sorted(MetaDataset(ds).labels) == [0, 1, 2, 3, 4]


def test_bad_mode_and_missing_files(root, tmp_path):
    with pytest.raises(ValueError, match="mode='valid'"):
        vision.datasets.FC100(root, mode="valid")
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-train.pkl.*zenodo"):
        vision.datasets.MiniImagenet(tmp_path)


def test_full_omniglot_reads_torchvisions_layout(tmp_path, monkeypatch):
    """Two tiny 'official' zips in root/omniglot-py: 964 + 659 characters become 2 + 1 here."""
    import io
    import zipfile

    from metaloop.tasks import omniglot as omniglot_module

    folder = tmp_path / "omniglot-py"
    folder.mkdir()
    for part, characters in (("images_background", 2), ("images_evaluation", 1)):
        with zipfile.ZipFile(folder / f"{part}.zip", "w") as zf:
            for c in range(characters):
                for drawer in range(2):
                    buffer = io.BytesIO()
                    pixels = np.full((105, 105), 255, np.uint8)
                    pixels[10 + c, 10 + drawer] = 0
                    Image.fromarray(pixels).save(buffer, format="PNG")
                    zf.writestr(f"{part}/Alpha{part[-3:]}/character{c + 1:02d}/{c}_{drawer}.png", buffer.getvalue())
    monkeypatch.setattr(omniglot_module, "_verify", lambda *args: None)  # the stand-in zips are not the official bytes
    ds = vision.datasets.FullOmniglot(tmp_path, transform=ToTensor())
    assert len(ds) == 6 and ds.targets == [0, 0, 1, 1, 2, 2]
    x, y = ds[1]
    assert x.shape == (1, 105, 105) and float(x[0, 10, 11]) == 0.0 and float(x[0, 0, 0]) == 1.0 and y == 0


# -- RandomClassRotation --------------------------------------------------------------------
def test_random_class_rotation_turns_each_class_by_its_own_angle():
    random.seed(0)
    images = torch.zeros(8, 1, 5, 5)
    images[:, 0, 0, 4] = 1  # a dot top-right: a quarter turn moves it top-left
    meta = MetaDataset(torch.utils.data.TensorDataset(images, torch.arange(8) // 2))
    rotation = vision.transforms.RandomClassRotation(meta, [0.0, 90.0, 180.0, 270.0])
    corner = {(0, 4): 0, (0, 0): 90, (4, 0): 180, (4, 4): 270}
    seen = set()
    for _ in range(10):
        task = Taskset(meta, [LoadData(meta), rotation], num_tasks=1)[0]
        angles = [corner[tuple(x[0].nonzero()[0].tolist())] for x in task[0]]
        for c in range(4):
            assert angles[2 * c] == angles[2 * c + 1]  # one angle per class
        seen |= set(angles)
    assert seen == {0, 90, 180, 270}


def test_random_class_rotation_of_pil_images_and_arbitrary_angles():
    image = Image.fromarray(np.eye(5, dtype=np.uint8) * 255)
    meta = MetaDataset(torch.utils.data.TensorDataset(torch.zeros(1), torch.zeros(1, dtype=torch.long)))
    description = vision.transforms.RandomClassRotation(meta, [90.0])([DataDescription(0)])
    rotated, label = description[0].transforms[0]((image, 7))
    assert np.array_equal(np.asarray(rotated), np.asarray(image.rotate(90))) and label == 7
    with pytest.raises(ValueError, match="degrees"):
        vision.transforms.RandomClassRotation(meta, [])


# -- benchmarks -----------------------------------------------------------------------------
def test_list_tasksets():
    assert set(vision.benchmarks.list_tasksets()) == {"omniglot", "mini-imagenet", "tiered-imagenet", "fc100", "cifarfs"}


def test_omniglot_tasksets_fall_back_to_the_bundled_splits_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    random.seed(0)
    with pytest.warns(UserWarning, match="bundled"):
        tasksets = vision.benchmarks.get_tasksets("omniglot", train_ways=5, train_samples=2, test_ways=3, test_samples=4, root=tmp_path)
    splits = [set(t.dataset.labels) for t in tasksets]
    assert [len(s) for s in splits] == [164, 15, 63]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])
    x, y = tasksets.train.sample()
    assert x.shape == (10, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    x, y = tasksets.test.sample()
    assert x.shape == (12, 1, 28, 28) and sorted(set(y.tolist())) == [0, 1, 2]
    # every task of a split draws from that split's characters only
    for taskset, labels in zip(tasksets, splits):
        description = taskset.sample_task_description()
        assert {taskset.dataset.indices_to_labels[dd.index] for dd in description} <= labels


_SPLIT = """
import json, random, sys, warnings
random.seed(int(sys.argv[2]))  # whatever the global random state, the split is the seed's
from metaloop.compat.learn2learn import vision
warnings.simplefilter("ignore")
kwargs = {} if sys.argv[3] == "default" else {"seed": int(sys.argv[3])}
tasksets = vision.benchmarks.get_tasksets("omniglot", root=sys.argv[1], download=False, **kwargs)
print(json.dumps([sorted(t.dataset.labels) for t in tasksets]))
"""


def test_omniglot_tasksets_split_characters_by_a_seed_the_same_in_every_process(tmp_path):
    """learn2learn's split used the unseeded global random: a second process tested on the first one's training characters."""
    import json
    import subprocess
    import sys

    def split(global_seed: int, seed: str) -> list[list[int]]:
        done = subprocess.run([sys.executable, "-c", _SPLIT, str(tmp_path), str(global_seed), seed],
                              capture_output=True, text=True, timeout=120, check=True)
        return json.loads(done.stdout)

    first, second = split(1, "default"), split(2, "default")
    assert first == second
    assert [len(s) for s in first] == [164, 15, 63] and not set(first[0]) & set(first[2])
    assert split(3, "0") == first  # seed=0 is the default
    other = split(1, "1")
    assert sorted(sum(other, [])) == sorted(sum(first, [])) and other[2] != first[2]


@pytest.mark.parametrize("name, shape, top", [
    ("mini-imagenet", (3, 84, 84), 255.0), ("tiered-imagenet", (3, 84, 84), 1.0), ("cifarfs", (3, 32, 32), 1.0), ("fc100", (3, 32, 32), 1.0),
])
def test_image_tasksets_from_root(name, shape, top, root):
    tasksets = vision.benchmarks.get_tasksets(name, train_ways=3, train_samples=4, test_ways=2, test_samples=5, num_tasks=7, root=root)
    assert len(tasksets.train) == 7
    x, y = tasksets.train[0]
    assert x.shape == (12, *shape) and sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert 1 < float(x.max()) <= 255 if top == 255.0 else float(x.max()) <= 1
    assert torch.equal(tasksets.train[0][0], x)  # num_tasks caches descriptions
    x, y = tasksets.validation.sample()
    assert x.shape == (10, *shape)


@pytest.mark.parametrize("augmentation", ["normalize", "lee2019"])
def test_mini_imagenet_augmentations(augmentation, root):
    torch.manual_seed(0)
    tasksets = vision.benchmarks.get_tasksets("mini-imagenet", train_samples=2, root=root, data_augmentation=augmentation)
    x, _ = tasksets.train.sample()
    assert x.shape == (10, 3, 84, 84)
    if augmentation == "normalize":
        assert float(x.max()) <= 1.0
    else:
        assert float(x.min()) < -1.0  # normalised by the ImageNet statistics Lee et al. use


def test_on_device_tasksets(root):
    tasksets = vision.benchmarks.get_tasksets("fc100", train_samples=2, root=root, device="cpu")
    assert isinstance(tasksets.train.dataset.dataset, l2ldata.OnDeviceDataset)
    assert tasksets.train.sample()[0].shape == (10, 3, 32, 32)


def test_unknown_taskset_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown taskset 'imagenet'"):
        vision.benchmarks.get_tasksets("imagenet")
    with pytest.raises(FileNotFoundError, match="FC100_train.pickle"):
        vision.benchmarks.get_tasksets("fc100", root=tmp_path, download=False)
    with pytest.raises(ValueError, match="data_augmentation='jitter'"):
        vision.benchmarks.get_tasksets("mini-imagenet", root=tmp_path, data_augmentation="jitter")


# -- the fine-grained datasets --------------------------------------------------------------
@pytest.fixture(scope="module")
def fine_root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fine")
    for write in fewshot_data.FINE_GRAINED.values():
        write(folder, 2)
    return folder


@pytest.mark.parametrize("cls, sizes", [
    ("CUBirds200", {"train": 140, "validation": 30, "test": 30, "all": 200}),
    ("DescribableTextures", {"train": 33, "validation": 7, "test": 7, "all": 47}),
    ("FGVCAircraft", {"train": 70, "validation": 15, "test": 15, "all": 100}),
    ("VGGFlower102", {"train": 71, "validation": 15, "test": 16, "all": 102}),
])
def test_fine_grained_modes_and_labels(cls, sizes, fine_root):
    for mode, classes in sizes.items():
        ds = getattr(vision.datasets, cls)(fine_root, mode=mode, transform=ToTensor())
        assert sorted(set(ds.targets)) == list(range(classes))
        x, y = ds[0]
        assert x.shape == (3, 30, 40) and isinstance(y, int)
    with pytest.raises(ValueError, match="mode='val'"):
        getattr(vision.datasets, cls)(fine_root, mode="val")


def test_cub_duplicates_and_crops(fine_root):
    without = vision.datasets.CUBirds200(fine_root, mode="train")
    with_duplicates = vision.datasets.CUBirds200(fine_root, mode="train", include_imagenet_duplicates=True)
    assert len(with_duplicates) == len(without) + 1 == 280
    cropped = vision.datasets.CUBirds200(fine_root, mode="test", bounding_box_crop=True)
    assert cropped[0][0].size == (20, 10)
    assert vision.datasets.FGVCAircraft(fine_root, mode="test", bounding_box_crop=True)[0][0].size == (29, 18)


def test_flower_labels_follow_meta_datasets_category_order(fine_root):
    from metaloop.tasks.benchmark_splits import FLOWERS_SPLITS
    from metaloop.tasks.image_benchmarks import read_mat_array

    labels = read_mat_array(fine_root / "vgg_flower102" / "imagelabels.mat", "labels").reshape(-1).astype(int)
    ds = vision.datasets.VGGFlower102(fine_root, mode="test")
    test_images = [i for i, label in enumerate(labels) if label in FLOWERS_SPLITS["test"]]
    assert ds.targets == [FLOWERS_SPLITS["test"].index(labels[i]) for i in test_images]
    everything = vision.datasets.VGGFlower102(fine_root, mode="all")
    assert everything.targets == [int(label) - 1 for label in labels]
