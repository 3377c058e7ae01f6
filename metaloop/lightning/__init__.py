"""Lightning infrastructure: the data module that serves meta-batches of tasks, callbacks, checkpoints, precision.

- :mod:`~metaloop.lightning.datamodule`: :class:`MetaDataModule`.
- :mod:`~metaloop.lightning.callbacks`: checkpoints at the last step and on SIGTERM, the meta-step timer,
  stopping before a non-finite meta-gradient is applied.
- :mod:`~metaloop.lightning.checkpoint`, :mod:`~metaloop.lightning.runs`, :mod:`~metaloop.lightning.targets`:
  checkpoints that load without running code, a trained run in one line, what a stored configuration may build.
- :mod:`~metaloop.lightning.precision`: bfloat16 and memory formats; :mod:`~metaloop.lightning.metrics`:
  :class:`MeanWithConfidence`.
- :mod:`~metaloop.lightning.distributed`: :class:`DDPStrategy` (``trainer=ddp``): ranks that stop together on
  SIGTERM, a short collective timeout, and a failed or stuck rank named in one line.

The learners are in :mod:`metaloop.algorithms` and the networks in :mod:`metaloop.nn`; their names are also
reachable here, as before 0.4 (stored configurations name ``metaloop.lightning.MetaLightningModule``).
"""

from __future__ import annotations

import importlib
from typing import Any

from metaloop.lightning.datamodule import MetaDataModule
from metaloop.lightning.metrics import MeanWithConfidence
from metaloop.lightning.runs import checkpoint_config, load_run, load_tasks

# names that moved in 0.4, by the package that holds them now
_MOVED = {
    "metaloop.algorithms": (
        "MetaLightningModule", "MAMLPlusPlus", "PerStep", "msl_weights", "AdaptedModel", "Objective", "Classification",
        "Regression", "Learned", "Shared", "PerLayer", "PerTensor", "PerElement", "PrototypicalModule", "FewShotHead",
        "head_logits", "ReptileModule", "CaviaModule",
    ),
    "metaloop.nn": ("Conv4", "MLP", "conv4_backbone", "ContextMLP", "FiLMConv4"),
}
_WHERE = {name: package for package, names in _MOVED.items() for name in names}
#: the networks that moved to :mod:`metaloop.nn`, by former name (stored configurations may still name them here)
MOVED_TO_NN = _MOVED["metaloop.nn"]


def __getattr__(name: str) -> Any:
    if name == "FunctionalModel":  # the name of AdaptedModel before 0.2
        name = "AdaptedModel"
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'metaloop.lightning' has no attribute {name!r}")


__all__ = ["MetaDataModule", "MeanWithConfidence", "load_run", "load_tasks", "checkpoint_config", *_WHERE]
