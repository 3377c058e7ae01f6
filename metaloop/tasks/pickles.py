"""Reading dataset pickles without running code: a restricted unpickler for numpy arrays and plain containers.

Published few-shot datasets (mini-ImageNet's ``mini-imagenet-cache-*.pkl``, tiered-ImageNet's
``*_images_png.pkl``, FC100's ``FC100_*.pickle``) are pickles, and ``pickle.load`` on a file from
the internet runs whatever the file names. :func:`load_pickle` instead builds only what a dataset
holds: numbers, strings, bytes, lists, tuples, dicts, sets and (when allowed) numpy arrays,
dtypes and scalars. Any other global in the file (``os.system``, ``builtins.eval``, a class) is
refused with :class:`pickle.UnpicklingError` before it is looked up.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, BinaryIO

__all__ = ["SAFE_GLOBALS", "NUMPY_GLOBALS", "load_pickle"]

# (module, name) pairs a dataset pickle may name; Python 2 pickles spell builtins "__builtin__"
SAFE_GLOBALS = frozenset(
    (module, name)
    for module in ("builtins", "__builtin__")
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray", "bool", "unicode", "long")
) | {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("_codecs", "encode"),  # how Python 3 writes bytes (and numpy buffers) at protocols 0-2; it only encodes a string
}

# what numpy's own pickling of arrays, dtypes and scalars names (numpy 1.x spells the module numpy.core, 2.x numpy._core)
NUMPY_GLOBALS = frozenset(
    (f"numpy.{core}.{module}", name)
    for core in ("core", "_core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
) | {("numpy", "ndarray"), ("numpy", "dtype")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: frozenset[tuple[str, str]], origin: str) -> None:
        super().__init__(file, encoding="latin1")  # latin1 reads Python 2 pickles' str and numpy buffers byte for byte
        self.allowed = allowed
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(
                f"{self.origin} names {module}.{name}, which a dataset pickle has no use for; refusing to load it"
                " (only numpy arrays and plain containers are read). Fetch the file again from its official source"
            )
        if module == "__builtin__":
            module = "builtins"
            name = {"unicode": "str", "long": "int"}.get(name, name)
        return super().find_class(module, name)


def load_pickle(source: str | os.PathLike[str] | BinaryIO, allow_numpy: bool = True) -> Any:
    """Returns the object pickled in ``source`` (a path or a binary file), built from safe types only.

    Args:
        allow_numpy: also allow numpy arrays, dtypes and scalars (:data:`NUMPY_GLOBALS`).

    Raises:
        pickle.UnpicklingError: the pickle names any other global (a function or class), which
            could run code; the message names it.
    """
    allowed = SAFE_GLOBALS | NUMPY_GLOBALS if allow_numpy else SAFE_GLOBALS
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _RestrictedUnpickler(f, allowed, str(source)).load()
    return _RestrictedUnpickler(source, allowed, getattr(source, "name", "the pickle")).load()
