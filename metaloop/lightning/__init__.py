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
from metaloop.lightning.runs import checkpoint_config, load_run

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
    "load_run",
    "checkpoint_config",
]
