"""learn2learn's names on metaloop: ``l2l.algorithms``, ``l2l.nn``, ``l2l.optim``, ``l2l.utils`` and the module utilities.

``from metaloop.compat import learn2learn as l2l`` then ``l2l.algorithms.MAML(model, lr=0.5)``,
``l2l.nn.PrototypicalClassifier``, ``l2l.optim.LearnableOptimizer``, ``l2l.clone_module(model)``,
``l2l.magic_box(x)``. To run unchanged ``import learn2learn`` code, put the shim
``tests/compat/shims`` on ``PYTHONPATH`` or call
``metaloop.compat.aliases.alias_package("learn2learn", "metaloop.compat.learn2learn")``.
The implementations live in :mod:`metaloop.transforms`, :mod:`metaloop.nn`, :mod:`metaloop.lightning`
and, for learn2learn's edits of modules (``utils.module_updates``, ``optim.learnable_optimizer``), here; ``data`` and ``vision`` are provided by their own subpackages
where present.
"""

from __future__ import annotations

import importlib
import importlib.util

from metaloop.compat.learn2learn import algorithms, nn, optim, utils
from metaloop.compat.learn2learn.utils import (
    accuracy,
    clone_distribution,
    clone_module,
    clone_named_parameters,
    clone_parameters,
    detach_distribution,
    detach_module,
    flatten_config,
    magic_box,
    update_module,
)

# l2l.data and l2l.vision are written beside this package (issue 13's second half); each is imported
# here when present, so `import learn2learn as l2l; l2l.data.MetaDataset` works as in learn2learn.
for _name in ("data", "vision"):
    if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
        importlib.import_module(f"{__name__}.{_name}")

# The learn2learn release whose API this package provides.
__version__ = "0.2.0"

__all__ = [
    "algorithms",
    "nn",
    "optim",
    "utils",
    "clone_module",
    "update_module",
    "detach_module",
    "clone_parameters",
    "clone_named_parameters",
    "clone_distribution",
    "detach_distribution",
    "magic_box",
    "accuracy",
    "flatten_config",
]
