"""learn2learn's ``learn2learn.algorithms``: ``MAML``, ``MetaSGD``, ``GBML``, ``BaseLearner`` and the Lightning modules.

The algorithms wrap an ordinary module and adapt it with
:mod:`metaloop.compat.learn2learn.utils.module_updates` (``clone_module`` / ``update_module``), so the
graph of every inner step is kept for the meta-gradient. The Lightning modules
(``algorithms.lightning``) share their heads with :mod:`metaloop.nn`.
"""

from __future__ import annotations

from metaloop.compat.learn2learn.algorithms import base_learner, gbml, lightning, maml, meta_sgd
from metaloop.compat.learn2learn.algorithms.base_learner import BaseLearner
from metaloop.compat.learn2learn.algorithms.gbml import GBML
from metaloop.compat.learn2learn.algorithms.lightning import (
    LightningANIL,
    LightningEpisodicModule,
    LightningMAML,
    LightningMetaOptNet,
    LightningPrototypicalNetworks,
)
from metaloop.compat.learn2learn.algorithms.maml import MAML, maml_update
from metaloop.compat.learn2learn.algorithms.meta_sgd import MetaSGD, meta_sgd_update

__all__ = [
    "BaseLearner",
    "MAML",
    "maml_update",
    "MetaSGD",
    "meta_sgd_update",
    "GBML",
    "LightningEpisodicModule",
    "LightningMAML",
    "LightningANIL",
    "LightningPrototypicalNetworks",
    "LightningMetaOptNet",
    "base_learner",
    "maml",
    "meta_sgd",
    "gbml",
    "lightning",
]
