"""Lightning integration: the data module that serves meta-batches of tasks."""

from __future__ import annotations

from metaloop.lightning.datamodule import MetaDataModule

__all__ = ["MetaDataModule"]
