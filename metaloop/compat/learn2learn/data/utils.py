"""learn2learn's ``learn2learn.data.utils``: ``partition_task``, ``InfiniteIterator``, ``OnDeviceDataset``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

__all__ = ["partition_task", "InfiniteIterator", "OnDeviceDataset"]

T = TypeVar("T")


def partition_task(data: Tensor, labels: Tensor, shots: int = 1) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Returns ``((support_x, support_y), (query_x, query_y))``: the first ``shots`` samples of each class, and the rest.

    Classes come in increasing label order, each class's samples in their order in ``data``; every
    class must have the same number of samples, so the query set holds the same number per class.

    Raises:
        ValueError: ``data`` and ``labels`` differ in length, ``shots`` is negative or exceeds a
            class's samples, or classes have different numbers of samples.
    """
    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"data has {data.shape[0]} samples but labels has {labels.shape[0]}; pass one label per sample")
    classes, counts = labels.unique(return_counts=True)
    if len(classes) and not bool((counts == counts[0]).all()):
        raise ValueError(
            f"classes {classes.tolist()} have {counts.tolist()} samples; partition_task needs the same number in each"
        )
    per_class = int(counts[0]) if len(classes) else 0
    if not 0 <= shots <= per_class:
        raise ValueError(f"shots={shots} must be between 0 and the {per_class} samples of each class")
    order = torch.sort(labels, stable=True).indices.view(len(classes), per_class)
    support, query = order[:, :shots].reshape(-1), order[:, shots:].reshape(-1)
    return (data[support], labels[support]), (data[query], labels[query])


class InfiniteIterator(Iterator[T]):
    """Yields the items of ``dataloader`` forever, starting a new pass whenever one ends.

    Raises:
        ValueError: on ``next`` when a fresh pass yields nothing (an empty iterable would loop forever).
    """

    def __init__(self, dataloader: Iterable[T]) -> None:
        self.dataloader = dataloader
        self.iterator = iter(dataloader)

    def __iter__(self) -> InfiniteIterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.dataloader)
        try:
            return next(self.iterator)
        except StopIteration:
            raise ValueError(f"{type(self.dataloader).__name__} yields no items; InfiniteIterator needs a non-empty iterable") from None


class OnDeviceDataset(TensorDataset):
    """Returns ``(transform(x_i), y_i)`` from all of ``dataset`` held as two tensors on ``device``.

    Reads every ``(x, y)`` of ``dataset`` once and stacks them (``x`` must be tensors of one shape),
    so tasks are then gathered from memory on the device. On the CPU with CUDA available, the
    tensors are pinned for fast transfers. A ``_bookkeeping_path`` of ``dataset`` is kept, so a
    :class:`~metaloop.compat.learn2learn.data.MetaDataset` over it reuses the cached label tables.
    """

    def __init__(
        self,
        dataset: Dataset,
        device: torch.device | str | None = None,
        transform: Callable[[Tensor], Any] | None = None,
    ) -> None:
        if type(dataset).__getitem__ is TensorDataset.__getitem__ and len(dataset.tensors) == 2:  # type: ignore[attr-defined]
            data, labels = dataset.tensors  # type: ignore[attr-defined]  # items are exactly these rows: no need to read them
        else:
            pairs = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
            data = torch.stack([torch.as_tensor(x) for x, _ in pairs])
            labels = torch.as_tensor([int(y) for _, y in pairs])
        if device is not None:
            data, labels = data.to(device), labels.to(device)
        if data.device.type == "cpu" and torch.cuda.is_available():
            data, labels = data.pin_memory(), labels.pin_memory()
        super().__init__(data, labels)
        self.transform = transform
        if hasattr(dataset, "_bookkeeping_path"):
            self._bookkeeping_path = dataset._bookkeeping_path

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:  # type: ignore[override]
        x, y = super().__getitem__(index)
        return (self.transform(x) if self.transform is not None else x), y
