"""learn2learn's ``LightningMAML``: MAML (Finn et al. 2017) on episodes, as a LightningModule."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any, Callable

import torch
from torch import Tensor, nn

from metaloop.compat.learn2learn.algorithms.lightning.lightning_episodic_module import (
    LightningEpisodicModule,
    add_option_args,
    split_episode,
)
from metaloop.compat.learn2learn.algorithms.maml import MAML
from metaloop.compat.learn2learn.utils import accuracy

__all__ = ["LightningMAML"]


class LightningMAML(LightningEpisodicModule):
    """MAML on a learn2learn episode stream: ``adaptation_steps`` SGD steps (``adaptation_lr``) on the support set.

    Options (keywords): those of :class:`LightningEpisodicModule` and ``adaptation_steps``
    (default 1), ``adaptation_lr`` (0.1). ``loss`` defaults to cross-entropy.
    """

    adaptation_steps = 1
    adaptation_lr = 0.1

    def __init__(self, model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.loss = nn.CrossEntropyLoss() if loss is None else loss
        self._read_episode_options(kwargs, LightningMAML._adaptation_options())
        self.model = MAML(model, lr=self.adaptation_lr, first_order=False, allow_nograd=True)

    @staticmethod
    def _adaptation_options() -> dict[str, Any]:
        return {"adaptation_steps": LightningMAML.adaptation_steps, "adaptation_lr": LightningMAML.adaptation_lr}

    @staticmethod
    def add_model_specific_args(parent_parser: ArgumentParser) -> ArgumentParser:
        """Returns a parser with the episode options plus ``--adaptation_steps`` and ``--adaptation_lr``."""
        return add_option_args(parent_parser, LightningMAML._adaptation_options())

    @torch.enable_grad()
    def meta_learn(self, batch: Any, batch_idx: int, ways: int, shots: int, queries: int) -> tuple[Tensor, Tensor]:
        """Returns the query loss and accuracy after adapting a clone of the model on the support set."""
        learner = self.model.clone()
        learner.train()
        if self.data_parallel:
            learner.module = nn.DataParallel(learner.module)
        support, support_labels, query, query_labels = split_episode(*batch, ways, shots, queries)
        for _ in range(self.adaptation_steps):
            learner.adapt(self.loss(learner(support), support_labels))
        predictions = learner(query)
        return self.loss(predictions, query_labels), accuracy(predictions, query_labels)
