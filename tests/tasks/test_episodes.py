from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from metaloop.tasks import (
    SPLITS,
    EpisodeSampler,
    Task,
    TaskList,
    TaskStream,
    sample_meta_batch,
    sample_task,
    split_groups,
    stack_tasks,
    task_seed,
)


def identify(dataset: TensorDataset, x: torch.Tensor) -> list[tuple[int, int, int]]:
    """Returns (class, item, quarter turns) of each float image in ``x``, found among all rotations of the dataset."""
    images, labels = dataset.tensors
    lookup = {}
    for turn in range(4):
        for item, image in enumerate(torch.rot90(images, turn, (-2, -1))):
            lookup[image.numpy().tobytes()] = (int(labels[item]) // 10, item, turn)
    return [lookup[(image * 255).round().to(torch.uint8).numpy().tobytes()] for image in x]


def test_task_unpacks_as_four_tuple() -> None:
    task = Task(torch.zeros(2, 3), torch.zeros(2), torch.ones(4, 3), torch.ones(4))
    support_x, support_y, query_x, query_y = task
    assert support_x.shape == (2, 3) and query_y.shape == (4,)
    batch = stack_tasks([task, task, task])
    assert isinstance(batch, Task)
    assert batch.support_x.shape == (3, 2, 3) and batch.query_y.shape == (3, 4)


def test_split_fractions_are_disjoint_and_cover_every_class(toy: TensorDataset) -> None:
    sampler = EpisodeSampler(toy, n_ways=3, k_shots=1, k_queries=2, splits=(0.5, 0.25, 0.25))
    sizes = {split: len(sampler.class_splits[split]) for split in SPLITS}
    assert sizes == {"train": 12, "val": 6, "test": 6}
    everything = torch.cat([sampler.class_splits[split] for split in SPLITS])
    assert sorted(everything.tolist()) == list(range(24))


def test_split_counts_and_seed() -> None:
    names = [f"c{i}" for i in range(50)]
    first = split_groups(names, (30, 12, 8), seed=3)
    assert [len(first[split]) for split in SPLITS] == [30, 12, 8]
    assert first == split_groups(names, (30, 12, 8), seed=3)
    assert first["test"] != split_groups(names, (30, 12, 8), seed=4)["test"]
    # fractions round the held-out splits down and give the rest to train
    assert [len(v) for v in split_groups(names, (0.7, 0.15, 0.15), seed=0).values()] == [36, 7, 7]
    assert [len(v) for v in split_groups(names[:3], (0.0, 0.5, 0.5), seed=0).values()] == [1, 1, 1]


def test_given_splits_by_name(toy: TensorDataset) -> None:
    splits = {"train": [f"char{c:02d}" for c in range(20)], "val": ["char20", "char21"], "test": ["char22", "char23"]}
    sampler = EpisodeSampler(toy, n_ways=2, k_shots=1, k_queries=1, splits=splits)
    assert sampler.class_splits["val"].tolist() == [20, 21]
    assert sampler.class_splits["test"].tolist() == [22, 23]
    assert len(sampler.class_splits["train"]) == 20


def test_split_by_group_keeps_each_group_in_one_split(toy: TensorDataset) -> None:
    sampler = EpisodeSampler(toy, n_ways=3, k_shots=1, k_queries=1, splits=(4, 1, 1), split_by="family", split_seed=5)
    families = {split: {c // 4 for c in sampler.class_splits[split].tolist()} for split in SPLITS}
    assert [len(sampler.class_splits[split]) for split in SPLITS] == [16, 4, 4]
    assert [len(families[split]) for split in SPLITS] == [4, 1, 1]
    assert not (families["train"] & families["val"]) and not (families["val"] & families["test"])


def test_labels_are_remapped_and_support_query_disjoint(toy: TensorDataset) -> None:
    sampler = EpisodeSampler(toy, n_ways=4, k_shots=2, k_queries=3, splits=(0.5, 0.25, 0.25))
    train_classes = set(sampler.class_splits["train"].tolist())
    for index in range(20):
        task = sample_task(sampler, "train", seed=0, index=index)
        assert task.support_x.shape == (8, 1, 5, 5) and task.query_x.shape == (12, 1, 5, 5)
        assert task.support_x.dtype == torch.float32
        assert 0.0 <= float(task.support_x.min()) and float(task.query_x.max()) <= 1.0
        assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert task.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        support = identify(toy, task.support_x)
        query = identify(toy, task.query_x)
        class_of_label = {}
        for (cls, _, _), label in zip(support + query, torch.cat([task.support_y, task.query_y]).tolist()):
            assert class_of_label.setdefault(label, cls) == cls  # one class per label
        assert len(set(class_of_label.values())) == 4  # distinct classes per label
        assert set(class_of_label.values()) <= train_classes
        items = [item for _, item, _ in support + query]
        assert len(set(items)) == 20  # no example twice, so support and query never overlap


def test_within_a_group_every_task_draws_its_classes_from_one_group(toy: TensorDataset) -> None:
    # 24 classes in 6 families of 4; with 2 rotations a family holds 8 classes, so 6-way tasks fit in any family
    sampler = EpisodeSampler(toy, n_ways=6, k_shots=1, k_queries=1, splits=(1.0, 0.0, 0.0), rotations=(0, 180), within="family")
    families = set()
    for index in range(60):
        task = sample_task(sampler, "train", seed=0, index=index)
        classes = [cls for cls, _, _ in identify(toy, task.support_x)]
        assert len({c // 4 for c in classes}) == 1, classes  # one family per task
        assert len(set(zip(classes, [turn for _, _, turn in identify(toy, task.support_x)]))) == 6  # six distinct classes
        families.add(classes[0] // 4)
    assert families == set(range(6))  # every family is drawn


def test_within_draws_only_groups_with_enough_classes(make_toy: type[TensorDataset]) -> None:
    # family 0 keeps its 4 classes, family 1 only 2 (classes 6 and 7 are absent): 3-way tasks all come from family 0
    toy = make_toy(counts=[3] * 6)
    sampler = EpisodeSampler(toy, n_ways=3, k_shots=1, k_queries=1, splits=(1.0, 0.0, 0.0), within="family")
    for index in range(20):
        classes = {cls for cls, _, _ in identify(toy, sample_task(sampler, "train", seed=1, index=index).support_x)}
        assert classes <= {0, 1, 2, 3} and len(classes) == 3
    with pytest.raises(ValueError, match=re.escape("n_ways=5 exceeds the classes of every family in split 'train' (within='family'; the largest has 4 classes")):
        EpisodeSampler(toy, n_ways=5, k_shots=1, k_queries=1, splits=(1.0, 0.0, 0.0), within="family")


def test_without_within_tasks_are_drawn_as_before(toy: TensorDataset) -> None:
    # the option adds a draw only when set: the default stream is unchanged (reproducible runs across versions)
    sampler = EpisodeSampler(toy, n_ways=3, k_shots=1, k_queries=2)
    generator = torch.Generator().manual_seed(3)
    uniform = torch.rand(18 + 3 * 6, generator=torch.Generator().manual_seed(3))
    task = sampler("train", generator)
    picked = uniform[:18].topk(3, largest=False).indices
    assert [cls for cls, _, _ in identify(toy, task.support_x)] == sampler.class_splits["train"][picked].tolist()


def test_eval_rotations_keep_test_classes_unrotated(toy: TensorDataset) -> None:
    sampler = EpisodeSampler(toy, n_ways=4, k_shots=1, k_queries=1, splits=(12, 6, 6), rotations=(0, 90, 180, 270), eval_rotations=(0,))
    assert (sampler.num_classes("train"), sampler.num_classes("test")) == (48, 6)
    turns = {split: {turn for i in range(20) for _, _, turn in identify(toy, sample_task(sampler, split, 0, i).support_x)} for split in ("train", "test")}
    assert turns == {"train": {0, 1, 2, 3}, "test": {0}}
    with pytest.raises(ValueError, match=re.escape("eval_rotations=[180] must be among rotations=[0, 90]")):
        EpisodeSampler(toy, n_ways=2, k_shots=1, k_queries=1, rotations=(0, 90), eval_rotations=(180,))


def test_eval_n_ways_sizes_validation_and_test_tasks(toy: TensorDataset) -> None:
    sampler = EpisodeSampler(toy, n_ways=6, k_shots=1, k_queries=1, splits=(12, 6, 6), eval_n_ways=4)
    assert sample_task(sampler, "train", 0, 0).support_y.tolist() == list(range(6))
    for split in ("val", "test"):
        assert sample_task(sampler, split, 0, 0).support_y.tolist() == list(range(4))
    with pytest.raises(ValueError, match=re.escape("eval_n_ways=8 exceeds the 6 classes in split 'val'")):
        EpisodeSampler(toy, n_ways=6, k_shots=1, k_queries=1, splits=(12, 6, 6), eval_n_ways=8)


def test_tasks_are_reproducible_and_distinct(toy: TensorDataset) -> None:
    sampler = EpisodeSampler(toy, n_ways=3, k_shots=1, k_queries=2)
    torch.manual_seed(1)
    first = sample_meta_batch(sampler, "val", seed=9, indices=range(8))
    torch.manual_seed(2)  # the global generator plays no part
    again = sample_meta_batch(EpisodeSampler(toy, n_ways=3, k_shots=1, k_queries=2), "val", seed=9, indices=range(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # the batched path equals stacking single tasks, and a task does not depend on its batch
    single = stack_tasks([sample_task(sampler, "val", 9, index) for index in range(8)])
    assert all(torch.equal(a, b) for a, b in zip(first, single))
    assert torch.equal(sample_meta_batch(sampler, "val", 9, [5]).query_x[0], first.query_x[5])
    # other seeds, splits and streams give other tasks
    for other in [
        sample_meta_batch(sampler, "val", seed=10, indices=range(8)),
        sample_meta_batch(sampler, "val", seed=9, indices=range(8), stream=1),
    ]:
        assert not torch.equal(other.query_x, first.query_x)
    assert len({task_seed(0, split, stream, i) for split in SPLITS for stream in range(3) for i in range(100)}) == 900


def test_rotations_are_new_classes(toy: TensorDataset) -> None:
    sampler = EpisodeSampler(toy, n_ways=12, k_shots=1, k_queries=1, splits=(0.5, 0.25, 0.25), rotations=(0, 90, 180, 270))
    assert sampler.num_classes("train") == 48 and sampler.num_classes("val") == 24
    same_character_twice = 0
    turns_seen = set()
    for index in range(10):
        task = sample_task(sampler, "train", 0, index)
        found = identify(toy, torch.cat([task.support_x, task.query_x]))
        labels = torch.cat([task.support_y, task.query_y]).tolist()
        pair_of_label = {}
        for (cls, _, turn), label in zip(found, labels):
            assert pair_of_label.setdefault(label, (cls, turn)) == (cls, turn)
        pairs = list(pair_of_label.values())
        assert len(set(pairs)) == 12
        same_character_twice += len(pairs) - len({cls for cls, _ in pairs})
        turns_seen |= {turn for _, turn in pairs}
    assert turns_seen == {0, 1, 2, 3}
    assert same_character_twice > 0  # one character at two rotations: two labels in one task


def test_ragged_classes_never_draw_padding(make_toy: type[TensorDataset]) -> None:
    dataset = make_toy(counts=[3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8])
    sampler = EpisodeSampler(dataset, n_ways=5, k_shots=1, k_queries=2, splits=(1.0, 0.0, 0.0))
    for index in range(30):
        task = sample_task(sampler, "train", 0, index)
        found = identify(dataset, torch.cat([task.support_x, task.query_x]))
        assert len({item for _, item, _ in found}) == 15


def test_any_map_style_dataset_plugs_in(toy: TensorDataset) -> None:
    class Pairs(Dataset):
        class_names = toy.class_names  # same names, so the same seeded class split

        def __len__(self) -> int:
            return len(toy)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return toy.tensors[0][i].float() / 255, int(toy.tensors[1][i])

    from_pairs = sample_task(EpisodeSampler(Pairs(), n_ways=3, k_shots=2, k_queries=1), "test", 0, 4)
    from_tensors = sample_task(EpisodeSampler(toy, n_ways=3, k_shots=2, k_queries=1), "test", 0, 4)
    assert all(torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in zip(from_pairs, from_tensors))


def test_custom_task_function_plugs_in() -> None:
    def linear_tasks(split: str, generator: torch.Generator) -> Task:
        w = torch.randn(3, 1, generator=generator)
        x = torch.randn(20, 3, generator=generator)
        return Task(x[:10], x[:10] @ w, x[10:], x[10:] @ w)

    batch = next(iter(TaskStream(linear_tasks, meta_batch_size=4)))
    assert batch.support_x.shape == (4, 10, 3) and batch.query_y.shape == (4, 10, 1)
    assert torch.equal(batch.query_x, sample_meta_batch(linear_tasks, "train", 0, range(4)).query_x)


def test_stream_and_list_are_worker_count_independent(toy: TensorDataset) -> None:
    sampler = EpisodeSampler(toy, n_ways=3, k_shots=1, k_queries=2)
    outputs = []
    for workers in (0, 2):
        stream = DataLoader(TaskStream(sampler, meta_batch_size=4, seed=3, start=2), batch_size=None, num_workers=workers)
        fixed = DataLoader(TaskList(sampler, "test", 30, meta_batch_size=8, seed=3), batch_size=None, num_workers=workers)
        streamed = [batch for batch, _ in zip(stream, range(5))]
        outputs.append((streamed, list(fixed)))
    (stream0, fixed0), (stream2, fixed2) = outputs
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(stream0, stream2))
    assert [len(b.query_y) for b in fixed0] == [8, 8, 8, 6] == [len(b.query_y) for b in fixed2]
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(fixed0, fixed2))
    # the stream from start=2 is meta-batches 2, 3, ... of the stream
    assert torch.equal(stream0[0].support_x, sample_meta_batch(sampler, "train", 3, range(8, 12)).support_x)


def test_task_list_splits_ranks_without_duplicates(toy: TensorDataset) -> None:
    sampler = EpisodeSampler(toy, n_ways=3, k_shots=1, k_queries=1)
    whole = torch.cat([b.support_x for b in TaskList(sampler, "val", 30, meta_batch_size=4)])
    shards = [list(TaskList(sampler, "val", 30, meta_batch_size=4, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 2]
    assert len(TaskList(sampler, "val", 30, meta_batch_size=4, rank=2, world_size=3)) == 2
    # rank r holds meta-batches r, r+3, ...: together every task once
    merged = [shards[b % 3][b // 3].support_x for b in range(8)]
    assert torch.equal(torch.cat(merged), whole) and len(whole) == 30


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_ways": 20}, "n_ways=20 exceeds the 18 classes in split 'train'"),
        ({"n_ways": 5, "k_shots": 4, "k_queries": 3}, "k_shots + k_queries = 4 + 3 = 7 exceeds the 6 examples"),
        ({"k_shots": 0}, "k_shots=0 must be at least 1"),
        ({"rotations": (0, 45)}, "rotations=[0, 45] must be distinct multiples of 90"),
        ({"splits": (0.5, 0.2, 0.2)}, "split fractions [0.5, 0.2, 0.2] sum to 0.9; make them sum to 1"),
        ({"splits": (10, 5, 5)}, "sum to 20 but there are 24 class names"),
        ({"splits": {"train": ["char01"], "test": ["char99"]}}, "unknown class 'char99' in splits['test']"),
        ({"splits": {"train": ["char01"], "val": ["char01"]}}, "'char01' is in both splits['train'] and splits['val']"),
        ({"splits": {"training": ["char01"]}}, "unknown split names ['training']"),
        ({"split_by": "alphabet"}, "split_by='alphabet' is not a grouping of ToyImages; use 'class' or 'family'"),
    ],
)
def test_bad_arguments_name_the_value_and_the_fix(toy: TensorDataset, kwargs: dict, message: str) -> None:
    arguments = {"n_ways": 3, "k_shots": 1, "k_queries": 1, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        EpisodeSampler(toy, **arguments)


def test_rotating_non_square_inputs_is_refused() -> None:
    wide = TensorDataset(torch.zeros(12, 1, 4, 6), torch.arange(12) // 3)
    with pytest.raises(ValueError, match=r"needs square images, got inputs of shape \(1, 4, 6\)"):
        EpisodeSampler(wide, n_ways=2, k_shots=1, k_queries=1, rotations=(0, 90))
    assert EpisodeSampler(wide, n_ways=2, k_shots=1, k_queries=1, splits=(1.0, 0.0, 0.0), rotations=(0, 180)).num_classes("train") == 8


def test_sampling_an_empty_split_is_refused(toy: TensorDataset) -> None:
    sampler = EpisodeSampler(toy, n_ways=3, k_shots=1, k_queries=1, splits={"train": ["char01", "char02", "char03"]})
    with pytest.raises(ValueError, match="split 'val' has no classes"):
        sample_task(sampler, "val", 0, 0)
