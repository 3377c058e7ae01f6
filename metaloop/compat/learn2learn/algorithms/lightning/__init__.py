"""learn2learn's ``learn2learn.algorithms.lightning``: few-shot algorithms as LightningModules over episode streams."""

from __future__ import annotations

from metaloop.compat.learn2learn.algorithms.lightning import (
    lightning_anil,
    lightning_episodic_module,
    lightning_maml,
    lightning_metaoptnet,
    lightning_protonet,
)
from metaloop.compat.learn2learn.algorithms.lightning.lightning_anil import LightningANIL
from metaloop.compat.learn2learn.algorithms.lightning.lightning_episodic_module import LightningEpisodicModule
from metaloop.compat.learn2learn.algorithms.lightning.lightning_maml import LightningMAML
from metaloop.compat.learn2learn.algorithms.lightning.lightning_metaoptnet import LightningMetaOptNet
from metaloop.compat.learn2learn.algorithms.lightning.lightning_protonet import LightningPrototypicalNetworks

__all__ = [
    "LightningEpisodicModule",
    "LightningMAML",
    "LightningANIL",
    "LightningPrototypicalNetworks",
    "LightningMetaOptNet",
    "lightning_episodic_module",
    "lightning_maml",
    "lightning_anil",
    "lightning_protonet",
    "lightning_metaoptnet",
]
