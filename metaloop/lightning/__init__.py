"""Lightning integration: the data module that serves meta-batches of tasks, and the module that meta-learns on them.

- :mod:`~metaloop.lightning.module`: :class:`MetaLightningModule`.
- :mod:`~metaloop.lightning.mamlpp`: :class:`MAMLPlusPlus` (Antoniou et al. 2019), a subclass with per-step parts.
- :mod:`~metaloop.lightning.objectives`: what a task is scored by (:class:`Classification`, :class:`Regression`).
- :mod:`~metaloop.lightning.learned`: how inner hyperparameters are learned (:class:`Shared` ... :class:`PerElement`).
- :mod:`~metaloop.lightning.adapted_model`: :class:`AdaptedModel`, a model run with a task's adapted weights.
- :mod:`~metaloop.lightning.metrics`: :class:`MeanWithConfidence`.
- :mod:`~metaloop.lightning.reptile`: :class:`ReptileModule` (Reptile: no query backward, interpolation step).
- :mod:`~metaloop.lightning.cavia`: :class:`CaviaModule` (CAVIA: per-task context parameters; its models are in :mod:`metaloop.nn`).
- :mod:`~metaloop.lightning.distributed`: :class:`DDPStrategy` (``trainer=ddp``): ranks that stop together on SIGTERM,
  a short collective timeout, and a failed or stuck rank named in one line.
"""

from __future__ import annotations

from metaloop.lightning.adapted_model import AdaptedModel
from metaloop.lightning.datamodule import MetaDataModule
from metaloop.lightning.learned import Learned, PerElement, PerLayer, PerTensor, Shared
from metaloop.lightning.metrics import MeanWithConfidence
from metaloop.lightning.module import MetaLightningModule
from metaloop.lightning.mamlpp import MAMLPlusPlus, PerStep, msl_weights
from metaloop.lightning.objectives import Classification, Objective, Regression
from metaloop.lightning.runs import checkpoint_config, load_run, load_tasks

FunctionalModel = AdaptedModel  # the name before 0.2, kept for code that imports it

# Networks that lived here and live in metaloop.nn; stored configurations name them by these paths.
MOVED_TO_NN = ("Conv4", "MLP", "ContextMLP", "FiLMConv4", "conv4_backbone")


def __getattr__(name: str) -> object:
    """Returns ``metaloop.nn``'s network ``name`` for the names in :data:`MOVED_TO_NN` (``metaloop.lightning.Conv4``)."""
    if name in MOVED_TO_NN:
        import metaloop.nn

        return getattr(metaloop.nn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Last: metric_learning builds on the names above.
from metaloop.lightning.metric_learning import FewShotHead, PrototypicalModule, head_logits  # noqa: E402
from metaloop.lightning.reptile import ReptileModule  # noqa: E402
from metaloop.lightning.cavia import CaviaModule  # noqa: E402

__all__ = [
    "MetaDataModule",
    "MetaLightningModule",
    "MAMLPlusPlus",
    "PerStep",
    "msl_weights",
    "AdaptedModel",
    "FunctionalModel",
    "Objective",
    "Classification",
    "Regression",
    "Learned",
    "Shared",
    "PerLayer",
    "PerTensor",
    "PerElement",
    "MeanWithConfidence",
    "load_run",
    "load_tasks",
    "checkpoint_config",
    "PrototypicalModule",
    "FewShotHead",
    "head_logits",
    "ReptileModule",
    "CaviaModule",
]
