"""learn2learn's ``LightningMetaOptNet`` (Lee et al. 2019): Prototypical Networks' loop with MetaOptNet's SVM head."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any, Callable

from torch import Tensor, nn

from metaloop.compat.learn2learn.algorithms.lightning.lightning_episodic_module import add_option_args
from metaloop.compat.learn2learn.algorithms.lightning.lightning_protonet import LightningPrototypicalNetworks
from metaloop.algorithms.metric import FewShotHead
from metaloop.nn.svm import SVClassifier

__all__ = ["LightningMetaOptNet"]


class LightningMetaOptNet(LightningPrototypicalNetworks):
    """MetaOptNet: ``features`` embed the episode, a differentiable multi-class SVM fitted on the support scores the queries.

    Options: those of :class:`LightningEpisodicModule` and ``svm_C_reg`` (default 0.1),
    ``svm_max_iters`` (15).
    """

    svm_C_reg = 0.1
    svm_max_iters = 15

    def __init__(self, features: nn.Module, loss: Callable[[Tensor, Tensor], Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(features, loss=loss, **kwargs)

    @staticmethod
    def _head_options() -> dict[str, Any]:
        return {"svm_C_reg": LightningMetaOptNet.svm_C_reg, "svm_max_iters": LightningMetaOptNet.svm_max_iters}

    def _make_head(self) -> FewShotHead:
        return SVClassifier(C_reg=self.svm_C_reg, max_iters=self.svm_max_iters, normalize=False)

    @staticmethod
    def add_model_specific_args(parent_parser: ArgumentParser) -> ArgumentParser:
        """Returns a parser with the episode options plus ``--svm_C_reg`` and ``--svm_max_iters``."""
        return add_option_args(parent_parser, LightningMetaOptNet._head_options())
