"""Tasks, task sources and the episodic N-way K-shot sampler.

A *task* is a small dataset: a labelled support set to adapt on and a query set to score the
adapted model. A *task source* is any callable ``source(split, generator) -> Task`` that draws one
task of ``split`` ("train", "val" or "test") using only ``generator`` for randomness. Seeding that
generator from ``(seed, split, stream, index)`` (:func:`task_seed`) makes every task a pure function
of those four numbers, which is what makes evaluation sets fixed, training streams resumable and
results independent of the number of data-loading workers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

__all__ = [
    "SPLITS",
    "EpisodeSampler",
    "Task",
    "TaskList",
    "TaskSource",
    "TaskStream",
    "labelled_tensors",
    "sample_meta_batch",
    "sample_task",
    "split_groups",
    "stack_tasks",
    "task_seed",
]

SPLITS = ("train", "val", "test")


class Task(NamedTuple):
    """One task, or a meta-batch of tasks when every field has a leading task dimension.

    For an N-way K-shot task with Q queries per class: ``support_x`` is ``(N*K, *x_shape)``,
    ``support_y`` is ``(N*K,)``, ``query_x`` is ``(N*Q, *x_shape)`` and ``query_y`` is ``(N*Q,)``; a
    meta-batch of T tasks prepends ``T`` to each. It unpacks as a 4-tuple, and Lightning's default
    ``transfer_batch_to_device`` moves it to the device field by field, keeping the type.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


class TaskSource(Protocol):
    """What :func:`sample_task`, :class:`TaskStream`, :class:`TaskList` and ``MetaDataModule`` draw from.

    Any callable ``source(split, generator)`` that returns ``(support_x, support_y, query_x, query_y)``
    (a :class:`Task` or a plain 4-tuple) qualifies: :class:`EpisodeSampler`,
    :class:`~metaloop.tasks.SinusoidTasks`, a class with ``__call__``, or a plain function. It must take
    all its randomness from ``generator`` (never from torch's global generator) so that a task is a
    function of its seed. ``split`` is one of :data:`SPLITS`; a source whose tasks have no split (a
    regression family) may ignore it, since the seeds of different splits already differ. Every task
    of a split must have the same shapes, so tasks stack into meta-batches.

    A source may also define ``batch(split, generators) -> Task``, returning the meta-batch of one
    task per generator, equal to stacking its single calls; :func:`sample_meta_batch` then uses it
    (:class:`EpisodeSampler` does, to gather a meta-batch's images in one indexing operation).

    Example, a linear-regression task family plugged in as a function::

        def linear_tasks(split: str, generator: torch.Generator) -> Task:
            w = torch.randn(3, 1, generator=generator)
            x = torch.randn(20, 3, generator=generator)
            return Task(x[:10], x[:10] @ w, x[10:], x[10:] @ w)
    """

    def __call__(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


def task_seed(seed: int, split: str, stream: int, index: int) -> int:
    """Returns the 63-bit seed of task ``index`` of ``stream`` in ``split``: a hash of all four.

    Hashing (rather than adding offsets) keeps the seeds of different splits, streams (DDP ranks) and
    indices unrelated, so no two tasks share a random stream by accident.

    Examples:
        >>> task_seed(0, "train", 0, 1) == task_seed(0, "train", 0, 1)
        True
        >>> len({task_seed(0, split, 0, 1) for split in SPLITS})  # each split its own stream
        3
    """
    key = f"{seed}:{split}:{stream}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _task_generator(seed: int, split: str, stream: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(task_seed(seed, split, stream, index))


def sample_task(source: TaskSource, split: str, seed: int, index: int, stream: int = 0) -> Task:
    """Returns task ``index`` of ``split``: ``source(split, generator)`` with the generator seeded by :func:`task_seed`."""
    return Task(*source(split, _task_generator(seed, split, stream, index)))


def stack_tasks(tasks: Sequence[Task]) -> Task:
    """Returns the meta-batch of ``tasks``: each field stacked along a new leading task dimension."""
    return Task(*(torch.stack(field) for field in zip(*tasks)))


def sample_meta_batch(source: TaskSource, split: str, seed: int, indices: Iterable[int], stream: int = 0) -> Task:
    """Returns the meta-batch of tasks ``indices`` of ``split`` (see :func:`sample_task`), stacked.

    A task depends on its own index only, so the same index gives the same task in any meta-batch.
    Sources with a ``batch(split, generators)`` method (see :class:`TaskSource`) draw it in one call.
    """
    generators = [_task_generator(seed, split, stream, index) for index in indices]
    batch = getattr(source, "batch", None)
    if batch is not None:
        return Task(*batch(split, generators))
    return stack_tasks([Task(*source(split, generator)) for generator in generators])


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1; pass a positive count")


def _worker_shard() -> tuple[int, int]:
    """Returns (this DataLoader worker's id, the number of workers); (0, 1) outside workers."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TaskStream(IterableDataset[Task]):
    """Yields the endless stream of meta-batches ``start, start + 1, ...`` of ``split``.

    Meta-batch ``i`` holds tasks ``i*meta_batch_size ... (i+1)*meta_batch_size - 1`` of ``stream``
    (one stream per DDP rank), so it is a pure function of ``(seed, stream, i)``: resuming only needs
    ``start``. DataLoader worker ``w`` of ``W`` yields meta-batches ``start + w, start + w + W, ...``,
    which the DataLoader interleaves back into order, so the stream is the same for any worker count.
    Use it with ``DataLoader(stream, batch_size=None)``: items are already meta-batches.
    """

    def __init__(
        self,
        source: TaskSource,
        split: str = "train",
        meta_batch_size: int = 32,
        seed: int = 0,
        stream: int = 0,
        start: int = 0,
    ) -> None:
        _check_positive(meta_batch_size=meta_batch_size)
        self.source, self.split, self.seed = source, split, seed
        self.meta_batch_size = meta_batch_size
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[Task]:
        worker, workers = _worker_shard()
        index = self.start + worker
        while True:
            first = index * self.meta_batch_size
            yield sample_meta_batch(
                self.source, self.split, self.seed, range(first, first + self.meta_batch_size), self.stream
            )
            index += workers


class TaskList(IterableDataset[Task]):
    """Yields this rank's share of the fixed list of ``num_tasks`` tasks of ``split``, in meta-batches.

    The list is tasks ``0 .. num_tasks - 1`` of stream 0, cut into meta-batches of
    ``meta_batch_size`` (the last may be smaller); rank ``r`` of ``world_size`` gets meta-batches
    ``r, r + world_size, ...``, so ranks never score a task twice and together score each once. Every
    pass yields the same tasks, for any number of DataLoader workers.
    """

    def __init__(
        self,
        source: TaskSource,
        split: str,
        num_tasks: int,
        meta_batch_size: int = 32,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive(num_tasks=num_tasks, meta_batch_size=meta_batch_size, world_size=world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside 0..{world_size - 1} for world_size={world_size}; pass a rank below it")
        self.source, self.split, self.seed = source, split, seed
        self.num_tasks, self.meta_batch_size = num_tasks, meta_batch_size
        self.batches = range(rank, math.ceil(num_tasks / meta_batch_size), world_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Task]:
        worker, workers = _worker_shard()
        for batch in self.batches[worker::workers]:
            first = batch * self.meta_batch_size
            tasks = range(first, min(first + self.meta_batch_size, self.num_tasks))
            yield sample_meta_batch(self.source, self.split, self.seed, tasks)


def labelled_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """Returns ``(x, y)``: all inputs stacked into one tensor and their integer labels.

    A dataset with a ``tensors`` attribute holding exactly ``(x, y)`` (``TensorDataset``,
    :class:`~metaloop.tasks.Omniglot`) is used as is, without a copy; any other map-style dataset of
    ``(x, y)`` pairs is read once, item by item.
    """
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        if len(tensors) != 2:
            raise ValueError(f"dataset.tensors holds {len(tensors)} tensors; an episode sampler needs exactly (x, y)")
        x, y = tensors
    else:
        pairs = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
        x = torch.stack([torch.as_tensor(pair[0]) for pair in pairs])
        y = torch.as_tensor([int(pair[1]) for pair in pairs])
    if y.ndim != 1 or len(y) != len(x) or y.is_floating_point():
        raise ValueError(
            f"labels must be one integer per example, got shape {tuple(y.shape)} and dtype {y.dtype} for {len(x)} "
            "examples; give the dataset integer class labels"
        )
    return x, y.long()


def split_groups(
    groups: Sequence[str], splits: Sequence[float] | Mapping[str, Sequence[str]], seed: int, kind: str = "group"
) -> dict[str, list[str]]:
    """Returns the names of ``groups`` that go to each of :data:`SPLITS`; the three lists are disjoint.

    ``splits`` is either three sizes for (train, val, test), each a fraction of the groups (floats
    summing to 1; val and test get the fraction rounded down, train the rest) or a count (ints
    summing to the number of groups), dealt from a permutation of the sorted names seeded by ``seed``; or a mapping from split name to the group names it holds
    (splits left out are empty). ``kind`` names the groups in error messages ("class", "alphabet").
    """
    names = sorted(set(groups))
    if isinstance(splits, Mapping):
        unknown_splits = set(splits) - set(SPLITS)
        if unknown_splits:
            raise ValueError(f"unknown split names {sorted(unknown_splits)}; use keys among {list(SPLITS)}")
        known = set(names)
        chosen = {split: [str(name) for name in splits.get(split, ())] for split in SPLITS}
        seen: dict[str, str] = {}
        for split, members in chosen.items():
            for name in members:
                if name not in known:
                    raise ValueError(
                        f"unknown {kind} {name!r} in splits[{split!r}]; the dataset's {kind} names are {names}; fix the name"
                    )
                if name in seen:
                    raise ValueError(
                        f"{kind} {name!r} is in both splits[{seen[name]!r}] and splits[{split!r}]; splits must be disjoint"
                    )
                seen[name] = split
        return chosen
    sizes = list(splits)
    if len(sizes) != len(SPLITS) or any(size < 0 for size in sizes):
        raise ValueError(f"splits={sizes} must be three non-negative sizes for {list(SPLITS)}, e.g. [0.7, 0.15, 0.15]")
    if all(isinstance(size, int) for size in sizes):
        if sum(sizes) != len(names):
            raise ValueError(
                f"split counts {sizes} sum to {sum(sizes)} but there are {len(names)} {kind} names;"
                f" make them sum to {len(names)}"
            )
        counts = sizes
    else:
        if not math.isclose(sum(sizes), 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions {sizes} sum to {sum(sizes):.6g}; make them sum to 1")
        held_out = [math.floor(fraction * len(names)) for fraction in sizes[1:]]
        counts = [len(names) - sum(held_out), *held_out]
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = [0, counts[0], counts[0] + counts[1], len(names)]
    return {
        split: sorted(names[i] for i in order[bounds[s] : bounds[s + 1]]) for s, split in enumerate(SPLITS)
    }


class EpisodeSampler:
    """Returns N-way K-shot tasks of a labelled dataset when called as ``sampler(split, generator)``.

    A task picks ``n_ways`` distinct classes of ``split``, relabels them ``0 .. n_ways - 1`` in the
    order drawn, and draws ``k_shots + k_queries`` distinct examples of each without replacement: the
    first ``k_shots`` form the support set, the rest the query set, so the two never share an example.
    Both sets are ordered class by class (labels ``0,..,0,1,..,1,...``). ``uint8`` inputs (images) come
    out as float32 in [0, 1]; other inputs keep their dtype.

    The dataset is indexed once (a class -> example-index table, every rotation of every input
    precomputed) and a meta-batch's inputs are one gather from the in-memory input tensor.
    ``dataset`` is any map-style dataset of ``(x, y)`` (see :func:`labelled_tensors`).

    Args:
        splits: how classes are divided among train/val/test (see :func:`split_groups`): three
            fractions or counts of the groups dealt with ``split_seed`` (default: 70/15/15 percent),
            or a mapping from split name to group names.
        split_by: the unit that ``splits`` divides: ``"class"`` (each class on its own; names come
            from ``dataset.class_names`` when present, else the label value as a string), or a
            grouping the dataset lists in ``dataset.class_groups`` (Omniglot: ``"alphabet"``), which
            keeps all classes of a group in one split.
        rotations: class-level augmentation, in degrees counter-clockwise, multiples of 90: each
            (class, rotation) pair is its own class, in every split; the split of a rotated class is
            the split of its original. ``(0, 90, 180, 270)`` quadruples Omniglot's classes (and
            holds four rotated copies of the inputs in memory: 100 MB for the full set at 28x28).
        eval_rotations: the rotations of validation and test classes, a subset of ``rotations`` (default:
            ``rotations``); ``[0]`` tests on the characters as drawn, as Lake et al.'s one-shot task does.
        eval_n_ways: the ways of validation and test tasks (default: ``n_ways``), so a learner can
            train on more ways than it is tested on (Snell et al. train ProtoNets 60-way, test 5- and 20-way).
        within: a grouping the dataset lists in ``dataset.class_groups`` (Omniglot: ``"alphabet"``): every
            task draws all its classes from one group, chosen uniformly among the split's groups with enough
            classes (Lake et al.'s one-shot task draws its 20 characters from one alphabet); ``None``
            (default) draws classes from the whole split.

    Raises:
        ValueError: at construction, when ``n_ways`` (``eval_n_ways``) exceeds the classes of a non-empty split
            (with ``within``: of every group of the split) or
            ``k_shots + k_queries`` exceeds the examples of a class; when sampling a split with no classes.
    """

    def __init__(
        self,
        dataset: Dataset,
        n_ways: int = 5,
        k_shots: int = 1,
        k_queries: int = 15,
        splits: Sequence[float] | Mapping[str, Sequence[str]] = (0.7, 0.15, 0.15),
        split_by: str = "class",
        split_seed: int = 0,
        rotations: Sequence[int] = (0,),
        eval_n_ways: int | None = None,
        within: str | None = None,
        eval_rotations: Sequence[int] | None = None,
    ) -> None:
        eval_n_ways = n_ways if eval_n_ways is None else eval_n_ways
        _check_positive(n_ways=n_ways, k_shots=k_shots, k_queries=k_queries, eval_n_ways=eval_n_ways)
        self.n_ways, self.k_shots, self.k_queries = n_ways, k_shots, k_queries
        self.eval_n_ways, self.within = eval_n_ways, within
        x, y = labelled_tensors(dataset)
        labels, y = torch.unique(y, return_inverse=True)
        dataset_names = getattr(dataset, "class_names", None)
        self.class_names: list[str] = [
            str(dataset_names[label] if dataset_names is not None else label) for label in labels.tolist()
        ]
        self._turns = _quarter_turns(rotations, x.shape)
        eval_turns = self._turns if eval_rotations is None else _quarter_turns(eval_rotations, x.shape)
        if not set(eval_turns) <= set(self._turns):
            raise ValueError(
                f"eval_rotations={list(eval_rotations or [])} must be among rotations={[90 * t for t in self._turns]}; add them to rotations"
            )
        #: per split, the indexes into the precomputed rotations its classes take
        self._split_turns = {
            split: torch.tensor([self._turns.index(t) for t in (self._turns if split == "train" else eval_turns)]) for split in SPLITS
        }

        # class -> example index table, padded to the largest class; counts mark the real entries
        self._counts = torch.bincount(y, minlength=len(labels))
        order = torch.argsort(y, stable=True)
        offsets = torch.cumsum(self._counts, 0) - self._counts
        self._members = torch.zeros(len(labels), int(self._counts.max()), dtype=torch.long)
        self._members[y[order], torch.arange(len(y)) - offsets[y[order]]] = order
        # every rotation of every input, precomputed, rotation-major: a task's inputs are then one index_select
        self._num_examples = len(x)
        self._x = x if self._turns == [0] else torch.cat([torch.rot90(x, turn, (-2, -1)) for turn in self._turns])

        groups = self.class_names if split_by == "class" else _class_groups(dataset, split_by, labels)
        chosen = split_groups(groups, splits, split_seed, kind=split_by)
        split_of = {group: split for split, names in chosen.items() for group in names}
        self.class_splits: dict[str, Tensor] = {
            split: torch.tensor([c for c, group in enumerate(groups) if split_of.get(group) == split], dtype=torch.long)
            for split in SPLITS
        }
        # with `within`: the group of each draw (class x rotation) of a split, and the groups with enough classes
        self._draw_groups: dict[str, Tensor] = {}
        self._eligible: dict[str, Tensor] = {}
        if within is not None:
            names = _class_groups(dataset, within, labels)
            index = {name: i for i, name in enumerate(sorted(set(names)))}
            of_class = torch.tensor([index[name] for name in names], dtype=torch.long)
            for split, classes in self.class_splits.items():
                draws = of_class[classes].repeat_interleave(len(self._split_turns[split]))
                sizes = torch.bincount(draws, minlength=len(index))
                self._draw_groups[split] = draws
                self._eligible[split] = torch.nonzero(sizes >= self.ways(split)).flatten()
        for split, classes in self.class_splits.items():
            self._check_split(split, classes)

    def ways(self, split: str) -> int:
        """Returns the number of classes of a task of ``split``: ``n_ways`` in training, else ``eval_n_ways``."""
        return self.n_ways if split == "train" else self.eval_n_ways

    def num_classes(self, split: str) -> int:
        """Returns the number of classes in ``split``, counting each rotation of a class as a class."""
        return len(self.class_splits[split]) * len(self._split_turns[split])

    def _check_split(self, split: str, classes: Tensor) -> None:
        if len(classes) == 0:
            return
        ways, name = self.ways(split), "n_ways" if split == "train" else "eval_n_ways"
        if ways > self.num_classes(split):
            raise ValueError(
                f"{name}={ways} exceeds the {self.num_classes(split)} classes in split {split!r}"
                f" ({len(classes)} classes x {len(self._split_turns[split])} rotations); lower {name} or give {split!r} more classes"
            )
        if self.within is not None and len(self._eligible[split]) == 0:
            largest = int(torch.bincount(self._draw_groups[split]).max())
            raise ValueError(
                f"{name}={ways} exceeds the classes of every {self.within} in split {split!r} (within={self.within!r};"
                f" the largest has {largest} classes, rotations counted); lower {name} or set within=null"
            )
        needed = self.k_shots + self.k_queries
        smallest = int(classes[self._counts[classes].argmin()])
        if needed > self._counts[smallest]:
            raise ValueError(
                f"k_shots + k_queries = {self.k_shots} + {self.k_queries} = {needed} exceeds the"
                f" {int(self._counts[smallest])} examples of class {self.class_names[smallest]!r} in split {split!r};"
                " lower k_shots or k_queries, or leave out classes with fewer examples"
            )

    def __call__(self, split: str, generator: torch.Generator) -> Task:
        return Task(*(field[0] for field in self.batch(split, [generator])))

    def batch(self, split: str, generators: Sequence[torch.Generator]) -> Task:
        """Returns the meta-batch of one task per generator, equal to stacking ``self(split, g)`` for each ``g``.

        Each task takes one uniform draw from its own generator; everything after that (choosing
        examples, gathering and rotating images) runs once for the whole meta-batch.
        """
        classes = self.class_splits.get(split)
        if classes is None or len(classes) == 0:
            raise ValueError(
                f"split {split!r} has no classes (splits are {list(self.class_splits)}, with"
                f" {[len(c) for c in self.class_splits.values()]} classes); give it classes or do not sample it"
            )
        ways, slots = self.ways(split), self._members.shape[1]
        turns = self._split_turns[split]
        choices = len(classes) * len(turns)
        extra = 0 if self.within is None else 1  # `within`: one more uniform picks each task's group
        uniform = torch.stack([torch.rand(choices + ways * slots + extra, generator=g) for g in generators])
        keys = uniform[:, :choices]
        if self.within is not None:
            eligible = self._eligible[split]
            group = eligible[(uniform[:, -1] * len(eligible)).long().clamp_(max=len(eligible) - 1)]
            keys = keys.masked_fill(self._draw_groups[split] != group[:, None], 2.0)  # other groups' classes sort last
        # the n_ways smallest of `choices` uniforms index n_ways distinct classes, in random order
        picked = keys.topk(ways, dim=1, largest=False).indices
        base = classes[picked // len(turns)]
        rotation = turns[picked % len(turns)]
        # a random order of each class's examples: padding slots sort last, so they are never drawn
        keys = uniform[:, choices : choices + ways * slots].view(len(generators), ways, slots)
        keys.masked_fill_(torch.arange(slots) >= self._counts[base, None], 2.0)
        items = self._members[base[..., None], keys.argsort(dim=-1)[..., : self.k_shots + self.k_queries]]
        return Task(
            self._gather(items[..., : self.k_shots], rotation),
            torch.arange(ways).repeat_interleave(self.k_shots).repeat(len(generators), 1),
            self._gather(items[..., self.k_shots :], rotation),
            torch.arange(ways).repeat_interleave(self.k_queries).repeat(len(generators), 1),
        )

    def _gather(self, items: Tensor, rotation: Tensor) -> Tensor:
        """Returns inputs ``items`` (tasks, ways, k) under each class's ``rotation`` (tasks, ways), as (tasks, ways*k, ...)."""
        rows = rotation[..., None] * self._num_examples + items
        x = self._x.index_select(0, rows.flatten())
        if x.dtype == torch.uint8:
            x = torch.div(x, 255)  # true division: float32 in [0, 1], in one pass
        return x.view(items.shape[0], -1, *x.shape[1:])


def _quarter_turns(rotations: Sequence[int], x_shape: torch.Size) -> list[int]:
    """Returns ``rotations`` (degrees) as counter-clockwise quarter turns, checked against the input shape."""
    degrees = [int(r) for r in rotations]
    if not degrees or len(set(degrees)) != len(degrees) or any(r % 90 or not 0 <= r < 360 for r in degrees):
        raise ValueError(
            f"rotations={degrees} must be distinct multiples of 90 in [0, 360), e.g. [0] or [0, 90, 180, 270]"
        )
    if any(r % 180 for r in degrees) and (len(x_shape) < 3 or x_shape[-1] != x_shape[-2]):
        raise ValueError(
            f"rotations={degrees} turn inputs by 90 degrees, which needs square images, got inputs of shape"
            f" {tuple(x_shape[1:])}; use rotations [0] or [0, 180], or square images"
        )
    if degrees != [0] and len(x_shape) < 3:
        raise ValueError(f"rotations={degrees} need image inputs (..., H, W), got shape {tuple(x_shape[1:])}; use [0]")
    return [r // 90 for r in degrees]


def _class_groups(dataset: Dataset, split_by: str, labels: Tensor) -> list[str]:
    """Returns the ``split_by`` group name of each class (in ``labels`` order) from ``dataset.class_groups``."""
    groupings: Mapping[str, Sequence[str]] = getattr(dataset, "class_groups", {})
    if split_by not in groupings:
        raise ValueError(
            f"split_by={split_by!r} is not a grouping of {type(dataset).__name__}; use 'class'"
            + "".join(f" or {name!r}" for name in groupings)
        )
    return [str(groupings[split_by][label]) for label in labels.tolist()]
