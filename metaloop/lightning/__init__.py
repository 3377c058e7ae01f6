"""Lightning integration: the data module that serves meta-batches of tasks, and the module that meta-learns on them."""

from __future__ import annotations

from metaloop.lightning.datamodule import MetaDataModule
from metaloop.lightning.models import MLP, Conv4
from metaloop.lightning.module import (
    Classification,
    FunctionalModel,
    Learned,
    MeanWithConfidence,
    MetaLightningModule,
    Objective,
    PerElement,
    PerLayer,
    PerTensor,
    Regression,
    Shared,
)

# Last: metric_learning builds on the names above.
from metaloop.lightning.metric_learning import FewShotHead, PrototypicalModule, conv4_backbone, head_logits  # noqa: E402

__all__ = [
    "MetaDataModule",
    "MetaLightningModule",
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
    "Conv4",
    "MLP",
    "PrototypicalModule",
    "FewShotHead",
    "head_logits",
    "conv4_backbone",
]
