"""``l2l.data``: meta-datasets, tasksets, task transforms and utilities, against learn2learn's documented behaviour."""

from __future__ import annotations

import pickle
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from metaloop.compat.learn2learn import data as l2ldata
from metaloop.compat.learn2learn.data import (
    DataDescription,
    FilteredMetaDataset,
    InfiniteIterator,
    MetaDataset,
    OnDeviceDataset,
    TaskDataset,
    Taskset,
    UnionMetaDataset,
    partition_task,
)
from metaloop.compat.learn2learn.data.transforms import (
    ConsecutiveLabels,
    FilterLabels,
    FusedNWaysKShots,
    KShots,
    LoadData,
    NWays,
    RemapLabels,
    TaskTransform,
)


class Pairs(Dataset):
    """A dataset of ``(x, label)`` with no ``tensors``/``targets``: MetaDataset must read each label."""

    def __init__(self, labels: list) -> None:
        self.labels = labels
        self.reads = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        self.reads += 1
        return torch.full((2,), float(i)), self.labels[i]


def classes(num_classes: int = 10, per_class: int = 8) -> MetaDataset:
    """A MetaDataset of ``num_classes * per_class`` samples; x = [index, label], labels 100 + c (so remapping shows)."""
    labels = torch.arange(num_classes).repeat_interleave(per_class) + 100
    x = torch.stack([torch.arange(len(labels)).float(), labels.float()], dim=1)
    return MetaDataset(TensorDataset(x, labels))


def test_module_paths_resolve():
    import metaloop.compat.learn2learn.data.transforms as transforms
    import metaloop.compat.learn2learn.data.utils as utils

    assert l2ldata.transforms is transforms and l2ldata.utils is utils
    assert l2ldata.partition_task is utils.partition_task


# -- MetaDataset and friends ----------------------------------------------------------------
def test_metadataset_tables_from_reading_labels_tensor_labels_become_scalars():
    ds = Pairs([torch.tensor(3), torch.tensor(1), torch.tensor(3), torch.tensor(2)])
    meta = MetaDataset(ds)
    assert meta.labels == [3, 1, 2]
    assert meta.labels_to_indices == {3: [0, 2], 1: [1], 2: [3]}
    assert meta.indices_to_labels == {0: 3, 1: 1, 2: 3, 3: 2}
    assert len(meta) == 4 and torch.equal(meta[2][0], torch.full((2,), 2.0))


def test_metadataset_reads_tensordataset_labels_without_loading_samples():
    ds = Pairs(["a", "b", "a"])
    ds.tensors = (torch.zeros(3, 2), torch.tensor([5, 6, 5]))
    meta = MetaDataset(ds)
    assert ds.reads == 0 and meta.labels_to_indices == {5: [0, 2], 6: [1]}


def test_metadataset_from_either_table():
    ds = Pairs(["x", "y", "x"])
    a = MetaDataset(ds, labels_to_indices={"x": [0, 2], "y": [1]})
    b = MetaDataset(ds, indices_to_labels={0: "x", 1: "y", 2: "x"})
    assert a.indices_to_labels == {0: "x", 2: "x", 1: "y"} and b.labels_to_indices == {"x": [0, 2], "y": [1]}
    assert ds.reads == 0


def test_metadataset_refuses_non_datasets_and_vector_labels():
    with pytest.raises(TypeError, match="TensorDataset"):
        MetaDataset([1, 2, 3])
    with pytest.raises(ValueError, match="scalar"):
        MetaDataset(Pairs([torch.tensor([1, 2])]))


def test_bookkeeping_is_cached_and_a_planted_pickle_is_refused(tmp_path):
    ds = Pairs([0, 1, 0])
    ds._bookkeeping_path = str(tmp_path / "bk.pkl")
    first = MetaDataset(ds)
    reads = ds.reads
    second = MetaDataset(ds)
    assert ds.reads == reads and second.labels_to_indices == first.labels_to_indices == {0: [0, 2], 1: [1]}

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "bk.pkl").write_bytes(pickle.dumps({"labels_to_indices": Boom(), "indices_to_labels": {}, "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        MetaDataset(ds)


def test_union_renumbers_labels_and_reads_the_right_dataset():
    a = MetaDataset(TensorDataset(torch.arange(4.0), torch.tensor([7, 7, 9, 9])))
    b = MetaDataset(TensorDataset(torch.arange(10.0, 13.0), torch.tensor([7, 8, 7])))
    union = UnionMetaDataset([a, b])
    assert len(union) == 7 and union.labels == [0, 1, 2, 3]
    assert union.labels_to_indices == {0: [0, 1], 1: [2, 3], 2: [4, 6], 3: [5]}
    x, y = union[5]
    assert float(x) == 11.0 and y == 3
    with pytest.raises(IndexError, match="7 samples"):
        union[7]


def test_filtered_keeps_chosen_labels_with_their_values():
    meta = classes(6, 3)
    evens = FilteredMetaDataset(meta, [104, 100, 102])
    assert evens.labels == [104, 100, 102] and len(evens) == 9
    assert evens.labels_to_indices[104] == [0, 1, 2]
    for i in range(len(evens)):
        x, y = evens[i]
        assert int(y) == evens.indices_to_labels[i] == int(x[1])
    union = UnionMetaDataset([evens, FilteredMetaDataset(meta, [101, 103, 105])])
    assert len(union.labels) == 6
    with pytest.raises(ValueError, match=r"labels \[42\]"):
        FilteredMetaDataset(meta, [42])


# -- Taskset --------------------------------------------------------------------------------
def test_taskset_caches_descriptions_and_endless_mode_resamples():
    random.seed(0)
    meta = classes()
    transforms = [NWays(meta, 3), KShots(meta, 2), LoadData(meta)]
    fixed = Taskset(meta, transforms, num_tasks=4)
    assert len(fixed) == 4
    first = [task[0].clone() for task in fixed]
    assert len(first) == 4
    assert all(torch.equal(a, fixed[i][0]) for i, a in enumerate(first))
    assert torch.equal(fixed[-1][0], first[3])
    with pytest.raises(IndexError, match="num_tasks=4"):
        fixed[4]
    endless = Taskset(meta, transforms, num_tasks=-1)
    assert len(endless) == 1
    draws = {tuple(endless.sample()[0][:, 0].tolist()) for _ in range(10)}
    assert len(draws) > 1


def test_taskset_rejects_bad_num_tasks_and_addition():
    with pytest.raises(ValueError, match="num_tasks=0"):
        Taskset(classes(), num_tasks=0)
    with pytest.raises(TypeError, match="UnionMetaDataset"):
        Taskset(classes(), num_tasks=2) + Taskset(classes(), num_tasks=2)


def test_taskset_custom_collate_callable_transforms_and_no_transforms():
    meta = classes(3, 2)
    whole = Taskset(meta, num_tasks=1, task_collate=len)
    assert whole[0] == 6
    picked = Taskset(meta, task_transforms=lambda _: [DataDescription(4)], task_collate=list, num_tasks=1)
    assert picked[0] == [4]


def test_task_dataset_is_the_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="Taskset"):
        TaskDataset._warned = False
        ts = TaskDataset(classes(), [LoadData(classes())], num_tasks=1)
    assert isinstance(ts, Taskset)


def test_taskset_in_a_dataloader_with_workers():
    meta = classes()
    ts = Taskset(meta, [FusedNWaysKShots(meta, n=2, k=3), LoadData(meta)], num_tasks=8)
    batches = list(DataLoader(ts, batch_size=4, num_workers=2))
    assert len(batches) == 2 and batches[0][0].shape == (4, 6, 2)


# -- transforms -----------------------------------------------------------------------------
@pytest.mark.parametrize("replacement", [False, True])
def test_nways_kshots_remap_consecutive_make_an_n_way_k_shot_task(replacement):
    random.seed(1)
    meta = classes()
    ts = Taskset(
        meta,
        [NWays(meta, 4), KShots(meta, 3, replacement=replacement), LoadData(meta), RemapLabels(meta), ConsecutiveLabels(meta)],
        num_tasks=-1,
    )
    for _ in range(20):
        x, y = ts.sample()
        assert x.shape == (12, 2)
        assert sorted(Counter(y.tolist()).values()) == [3, 3, 3, 3] and set(y.tolist()) == {0, 1, 2, 3}
        originals = x[:, 1].long()
        # consecutive: samples of one original label are adjacent, in increasing original-label order
        assert torch.equal(originals, originals.sort().values)
        # one remapped label per original label
        assert len(set(zip(originals.tolist(), y.tolist()))) == 4
        if not replacement:
            assert len(set(x[:, 0].tolist())) == 12


def test_remap_without_shuffle_follows_first_appearance():
    meta = classes(3, 2)
    ts = Taskset(meta, [LoadData(meta), RemapLabels(meta, shuffle=False)], num_tasks=1)
    assert ts[0][1].tolist() == [0, 0, 1, 1, 2, 2]


def test_filter_labels_and_fused_equal_their_parts():
    random.seed(2)
    meta = classes()
    keep = [101, 104, 108]
    ts = Taskset(meta, [FilterLabels(meta, keep), LoadData(meta)], num_tasks=1)
    assert set(ts[0][1].tolist()) == set(keep) and len(ts[0][1]) == 24
    fused = FusedNWaysKShots(meta, n=2, k=5, filter_labels=keep)
    for description in (None, [DataDescription(i) for i in range(len(meta))]):
        task = fused(description)
        labels = Counter(meta.indices_to_labels[dd.index] for dd in task)
        assert set(labels) <= set(keep) and sorted(labels.values()) == [5, 5]
    with_replacement = FusedNWaysKShots(meta, n=2, k=20, replacement=True)(None)
    assert len(with_replacement) == 40


def test_kshots_with_replacement_copies_descriptions():
    meta = classes(1, 2)
    task = KShots(meta, k=5, replacement=True)([DataDescription(0), DataDescription(1)])
    task[0].transforms.append(abs)
    assert sum(len(dd.transforms) for dd in task) == 1


def test_transforms_name_the_bad_value():
    meta = classes(3, 2)
    with pytest.raises(ValueError, match="n=4 exceeds the 3 labels"):
        NWays(meta, 4)
    with pytest.raises(ValueError, match="k=3 exceeds the 2 samples"):
        KShots(meta, 3)(None)
    with pytest.raises(ValueError, match="k=3 exceeds the 2 samples"):
        FusedNWaysKShots(meta, n=1, k=3)(None)
    with pytest.raises(ValueError, match="n=0"):
        FusedNWaysKShots(meta, n=0)
    with pytest.raises(ValueError, match="n=2 exceeds the 1 labels left"):
        NWays(meta, 2)(FilterLabels(meta, [100])(None))


def test_a_user_transform_subclasses_task_transform():
    class FirstTwo(TaskTransform):
        def __call__(self, description):
            return (description or self.new_task())[:2]

    meta = classes(2, 3)
    assert Taskset(meta, [FirstTwo(meta), LoadData(meta)], num_tasks=1)[0][0][:, 0].tolist() == [0.0, 1.0]


# -- utils ----------------------------------------------------------------------------------
def test_partition_task_splits_each_class_in_order():
    data = torch.arange(12.0)[:, None]
    labels = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    (sx, sy), (qx, qy) = partition_task(data, labels, shots=1)
    assert sy.tolist() == [0, 1, 2] and sx[:, 0].tolist() == [1.0, 2.0, 0.0]
    assert qy.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and qx[:, 0].tolist() == [4.0, 7.0, 10.0, 5.0, 8.0, 11.0, 3.0, 6.0, 9.0]
    with pytest.raises(ValueError, match="same number"):
        partition_task(data[:5], labels[:5])
    with pytest.raises(ValueError, match="shots=5"):
        partition_task(data, labels, shots=5)


def test_infinite_iterator_cycles_and_refuses_empty():
    it = InfiniteIterator([1, 2, 3])
    assert [next(it) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    with pytest.raises(ValueError, match="no items"):
        next(InfiniteIterator([]))


def test_on_device_dataset_stacks_and_transforms():
    ds = Pairs([3, 1, 3])
    ds._bookkeeping_path = "/nowhere/bk.pkl"  # an unwritable cache only warns
    on_device = OnDeviceDataset(ds, device="cpu", transform=lambda x: x * 2)
    assert on_device.tensors[0].shape == (3, 2) and on_device.tensors[1].tolist() == [3, 1, 3]
    x, y = on_device[2]
    assert x.tolist() == [4.0, 4.0] and int(y) == 3
    assert on_device._bookkeeping_path == "/nowhere/bk.pkl"
    with pytest.warns(UserWarning, match="could not cache"):
        assert MetaDataset(OnDeviceDataset(ds)).labels_to_indices == {3: [0, 2], 1: [1]}
