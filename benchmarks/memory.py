"""Peak bytes held by autograd graphs, counted exactly with saved-tensor hooks.

On CPU PyTorch has no allocator statistics, and process RSS is noisy; the bytes of the
tensors an autograd graph saves for backward are what grows with unrolled steps, so that is
what we count: every distinct storage saved and still alive, at its peak.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class GraphMemory:
    """Tracks the peak number of bytes held by saved tensors (distinct storages)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._refs: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> "_Held":
        return _Held(self, tensor)

    @staticmethod
    def _unpack(held: "_Held") -> torch.Tensor:
        return held.tensor

    @contextlib.contextmanager
    def track(self) -> Iterator["GraphMemory"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class _Held:
    __slots__ = ("owner", "tensor", "key")

    def __init__(self, owner: GraphMemory, tensor: torch.Tensor) -> None:
        self.owner, self.tensor = owner, tensor
        storage = tensor.untyped_storage()
        self.key = storage.data_ptr()
        count = owner._refs.get(self.key, 0)
        if count == 0:
            owner.current += storage.nbytes()
            owner.peak = max(owner.peak, owner.current)
        owner._refs[self.key] = count + 1

    def __del__(self) -> None:
        owner = self.owner
        count = owner._refs[self.key] - 1
        if count == 0:
            del owner._refs[self.key]
            owner.current -= self.tensor.untyped_storage().nbytes()
        else:
            owner._refs[self.key] = count
