"""learn2learn's ``LightningANIL``: ANIL (Raghu et al. 2020), MAML on the classifier of a fixed-in-the-inner-loop trunk."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any, Callable

import torch
from torch import Tensor, nn

from metaloop.compat.learn2learn.algorithms.lightning.lightning_episodic_module import (
    LightningEpisodicModule,
    split_episode,
)
from metaloop.compat.learn2learn.algorithms.lightning.lightning_maml import LightningMAML
from metaloop.compat.learn2learn.algorithms.maml import MAML
from metaloop.compat.learn2learn.utils import accuracy

__all__ = ["LightningANIL"]


class LightningANIL(LightningEpisodicModule):
    """ANIL: ``features`` embed the episode once; only ``classifier`` adapts (MAML steps) on the support embeddings.

    Options as :class:`LightningMAML`'s. ``train_ways`` must equal ``test_ways`` (one classifier).

    Raises:
        ValueError: if ``train_ways != test_ways``.
    """

    def __init__(
        self,
        features: nn.Module,
        classifier: nn.Module,
        loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.loss = nn.CrossEntropyLoss() if loss is None else loss
        self._read_episode_options(kwargs, LightningMAML._adaptation_options())
        if self.train_ways != self.test_ways:
            raise ValueError(
                f"LightningANIL has one classifier, so train_ways={self.train_ways} must equal test_ways={self.test_ways}"
            )
        self.features = nn.DataParallel(features) if self.data_parallel else features
        self.classifier = MAML(classifier, lr=self.adaptation_lr)

    @staticmethod
    def add_model_specific_args(parent_parser: ArgumentParser) -> ArgumentParser:
        """Returns a parser with the episode options plus ``--adaptation_steps`` and ``--adaptation_lr``."""
        return LightningMAML.add_model_specific_args(parent_parser)

    @torch.enable_grad()
    def meta_learn(self, batch: Any, batch_idx: int, ways: int, shots: int, queries: int) -> tuple[Tensor, Tensor]:
        """Returns the query loss and accuracy after adapting a clone of the classifier on the support embeddings."""
        self.features.train()
        learner = self.classifier.clone()
        learner.train()
        data, labels = batch
        support, support_labels, query, query_labels = split_episode(self.features(data), labels, ways, shots, queries)
        for _ in range(self.adaptation_steps):
            learner.adapt(self.loss(learner(support), support_labels))
        predictions = learner(query)
        return self.loss(predictions, query_labels), accuracy(predictions, query_labels)
