"""learn2learn's ``MetaDataset``, ``UnionMetaDataset`` and ``FilteredMetaDataset``: label <-> index tables over a dataset."""

from __future__ import annotations

import bisect
import os
import pickle
import warnings
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from metaloop.tasks.pickles import load_pickle

__all__ = ["MetaDataset", "UnionMetaDataset", "FilteredMetaDataset"]


def _scalar(label: Any) -> Hashable:
    """Returns ``label`` as a plain Python value (a tensor or numpy scalar becomes its ``.item()``)."""
    if hasattr(label, "item"):
        try:
            return label.item()
        except (ValueError, RuntimeError) as err:  # a label with several elements (numpy: ValueError, torch: RuntimeError)
            raise ValueError(f"MetaDataset needs one scalar label per sample, got {label!r}; give the dataset scalar labels") from err
    return label


def _known_labels(dataset: Dataset) -> list[Hashable] | None:
    """Returns every sample's label without loading the samples, when the dataset exposes them exactly; else None.

    ``TensorDataset``-like datasets (``tensors == (x, y)``) and datasets with a ``targets`` list and
    no ``target_transform`` (torchvision's MNIST, CIFAR, ImageFolder; metaloop's image datasets) give
    the same labels as ``dataset[i][1]``, at no cost.
    """
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, Sequence) and len(tensors) == 2 and len(tensors[1]) == len(dataset):  # type: ignore[arg-type]
        return [_scalar(label) for label in tensors[1].tolist()] if hasattr(tensors[1], "tolist") else None
    targets = getattr(dataset, "targets", None)
    if targets is not None and getattr(dataset, "target_transform", None) is None and len(targets) == len(dataset):  # type: ignore[arg-type]
        values = targets.tolist() if hasattr(targets, "tolist") else list(targets)
        return [_scalar(label) for label in values]
    return None


class MetaDataset(Dataset):
    """Returns ``dataset[i]``; wraps a classification dataset with tables from labels to sample indices and back.

    Attributes:
        labels_to_indices: ``{label: [indices of its samples]}``.
        indices_to_labels: ``{index: label}``.
        labels: the labels, in order of first appearance.

    Either table may be passed in (the other is derived from it); otherwise both are built by
    reading each sample's label, ``dataset[i][1]`` (tensor labels become Python scalars), or, at no
    cost, from ``dataset.tensors[1]`` or ``dataset.targets`` when those give the same labels.
    When ``dataset`` has a ``_bookkeeping_path``, the tables are cached in that file and read back
    on the next construction, as learn2learn does; the cache is read with a restricted unpickler
    that only builds plain containers, numbers and strings, so a planted file cannot run code.

    Raises:
        TypeError: ``dataset`` is not a ``torch.utils.data.Dataset``.
        ValueError: a sample's label is not a scalar.
    """

    def __init__(
        self,
        dataset: Dataset,
        labels_to_indices: Mapping[Hashable, Sequence[int]] | None = None,
        indices_to_labels: Mapping[int, Hashable] | None = None,
    ) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"MetaDataset wraps a torch.utils.data.Dataset, got {type(dataset).__name__}; wrap arrays in a TensorDataset"
            )
        self.dataset = dataset
        path = getattr(dataset, "_bookkeeping_path", None)
        if path is not None and labels_to_indices is None and indices_to_labels is None:
            self.load_bookkeeping(path)
        else:
            self.create_bookkeeping(labels_to_indices, indices_to_labels)

    def __getitem__(self, item: int) -> Any:
        return self.dataset[item]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def create_bookkeeping(
        self,
        labels_to_indices: Mapping[Hashable, Sequence[int]] | None = None,
        indices_to_labels: Mapping[int, Hashable] | None = None,
    ) -> None:
        """Builds ``labels_to_indices``, ``indices_to_labels`` and ``labels`` (from either table, or from the data)."""
        if labels_to_indices is not None:
            pairs: Iterable[tuple[int, Hashable]] = (
                (index, label) for label, indices in labels_to_indices.items() for index in indices
            )
        elif indices_to_labels is not None:
            pairs = indices_to_labels.items()
        else:
            known = _known_labels(self.dataset)
            if known is None:
                known = [_scalar(self.dataset[i][1]) for i in range(len(self))]
            pairs = enumerate(known)
        self._set_tables(pairs)

    def _set_tables(self, pairs: Iterable[tuple[int, Hashable]]) -> None:
        to_indices: defaultdict[Hashable, list[int]] = defaultdict(list)
        to_labels: dict[int, Hashable] = {}
        for index, label in pairs:
            to_indices[label].append(index)
            to_labels[index] = label
        self.labels_to_indices: dict[Hashable, list[int]] = dict(to_indices)
        self.indices_to_labels: dict[int, Hashable] = to_labels
        self.labels: list[Hashable] = list(to_indices)
        self._bookkeeping = {
            "labels_to_indices": self.labels_to_indices,
            "indices_to_labels": self.indices_to_labels,
            "labels": self.labels,
        }

    def load_bookkeeping(self, path: str | os.PathLike[str]) -> None:
        """Reads the tables cached at ``path``; builds and writes them there when the file is absent (warns if it cannot)."""
        if not os.path.exists(path):
            self.create_bookkeeping()
            try:
                self.serialize_bookkeeping(path)
            except OSError as err:  # the cache only saves time: a read-only data folder must not stop training
                warnings.warn(f"could not cache MetaDataset's label tables at {path} ({err}); they are rebuilt on every load")
            return
        cached = load_pickle(path, allow_numpy=False)
        if not isinstance(cached, dict) or not {"labels_to_indices", "indices_to_labels", "labels"} <= set(cached):
            raise ValueError(f"{path} is not a MetaDataset bookkeeping file; delete it so that it is rebuilt")
        self.labels_to_indices = dict(cached["labels_to_indices"])
        self.indices_to_labels = dict(cached["indices_to_labels"])
        self.labels = list(cached["labels"])
        self._bookkeeping = cached

    def serialize_bookkeeping(self, path: str | os.PathLike[str]) -> None:
        """Writes the tables to ``path``, for :meth:`load_bookkeeping`."""
        with open(path, "wb") as f:
            pickle.dump(self._bookkeeping, f, protocol=pickle.HIGHEST_PROTOCOL)


class UnionMetaDataset(MetaDataset):
    """Returns sample ``i`` of the concatenation of ``datasets``, with labels renumbered so datasets never share one.

    The labels of dataset ``d`` become ``offset_d + position of the label in d.labels``, where
    ``offset_d`` counts the labels of the datasets before it: the same label in two datasets is two
    classes of the union. Items are returned as lists, with the renumbered label in position 1.
    """

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self.datasets = [ds if isinstance(ds, MetaDataset) else MetaDataset(ds) for ds in datasets]
        self._starts: list[int] = []
        pairs: list[tuple[int, Hashable]] = []
        first_index = first_label = 0
        for ds in self.datasets:
            position = {label: i for i, label in enumerate(ds.labels)}
            pairs += [(first_index + index, first_label + position[label]) for index, label in ds.indices_to_labels.items()]
            self._starts.append(first_index)
            first_index += len(ds.indices_to_labels)
            first_label += len(ds.labels)
        self._set_tables(pairs)

    def __getitem__(self, item: int) -> list[Any]:
        if not 0 <= item < len(self):
            raise IndexError(f"index {item} is out of range for a UnionMetaDataset of {len(self)} samples")
        d = bisect.bisect_right(self._starts, item) - 1
        data = list(self.datasets[d][item - self._starts[d]])
        data[1] = self.indices_to_labels[item]
        return data

    def __len__(self) -> int:
        return len(self.indices_to_labels)


class FilteredMetaDataset(MetaDataset):
    """Returns sample ``i`` of the samples of ``dataset`` whose label is in ``labels``; labels keep their values.

    Samples are ordered label by label, in the order of ``labels``.
    """

    def __init__(self, dataset: Dataset, labels: Sequence[Hashable]) -> None:
        self.dataset = dataset if isinstance(dataset, MetaDataset) else MetaDataset(dataset)
        missing = [label for label in labels if label not in self.dataset.labels_to_indices]
        if missing:
            raise ValueError(
                f"labels {missing[:10]} are not in the dataset, whose labels are {self.dataset.labels[:10]}"
                f"{'...' if len(self.dataset.labels) > 10 else ''}; keep only labels it has"
            )
        self.to_true_indices = [index for label in labels for index in self.dataset.labels_to_indices[label]]
        self._set_tables(enumerate(self.dataset.indices_to_labels[index] for index in self.to_true_indices))

    def __getitem__(self, item: int) -> Any:
        return self.dataset[self.to_true_indices[item]]

    def __len__(self) -> int:
        return len(self.indices_to_labels)
