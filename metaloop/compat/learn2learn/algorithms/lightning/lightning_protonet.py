"""learn2learn's ``LightningPrototypicalNetworks`` (Snell et al. 2017), on :func:`metaloop.lightning.head_logits`."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any, Callable

from torch import Tensor, nn

from metaloop.compat.learn2learn.algorithms.lightning.lightning_episodic_module import (
    LightningEpisodicModule,
    add_option_args,
    split_episode,
)
from metaloop.compat.learn2learn.utils import accuracy
from metaloop.algorithms.metric import FewShotHead, head_logits
from metaloop.nn.prototypical import PrototypicalClassifier

__all__ = ["LightningPrototypicalNetworks"]


class LightningPrototypicalNetworks(LightningEpisodicModule):
    """Prototypical Networks: ``features`` embed the episode, a nearest-prototype head scores the queries.

    Options: those of :class:`LightningEpisodicModule` and ``distance_metric``
    (``"euclidean"`` or ``"cosine"``). The step is the native
    :class:`metaloop.lightning.PrototypicalModule`'s (:func:`~metaloop.lightning.head_logits`).
    """

    distance_metric = "euclidean"

    def __init__(self, features: nn.Module, loss: Callable[[Tensor, Tensor], Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.loss = nn.CrossEntropyLoss() if loss is None else loss
        self._read_episode_options(kwargs, self._head_options())
        self.features = nn.DataParallel(features) if self.data_parallel else features
        self.classifier: FewShotHead = self._make_head()

    @staticmethod
    def _head_options() -> dict[str, Any]:
        return {"distance_metric": LightningPrototypicalNetworks.distance_metric}

    def _make_head(self) -> FewShotHead:
        return PrototypicalClassifier(distance=self.distance_metric)

    @staticmethod
    def add_model_specific_args(parent_parser: ArgumentParser) -> ArgumentParser:
        """Returns a parser with the episode options plus ``--distance_metric``."""
        return add_option_args(parent_parser, LightningPrototypicalNetworks._head_options())

    def meta_learn(self, batch: Any, batch_idx: int, ways: int, shots: int, queries: int) -> tuple[Tensor, Tensor]:
        """Returns the query loss and accuracy of the head fitted on the episode's support embeddings."""
        self.features.train()
        support, support_labels, query, query_labels = split_episode(*batch, ways, shots, queries)
        logits = head_logits(self.features, self.classifier, support, support_labels, query)
        return self.loss(logits, query_labels), accuracy(logits, query_labels)
