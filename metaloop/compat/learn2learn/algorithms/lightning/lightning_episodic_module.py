"""learn2learn's ``LightningEpisodicModule``: the Lightning loop shared by its few-shot algorithms, and the episode split."""

from __future__ import annotations

import abc
import warnings
from argparse import ArgumentParser
from typing import Any

import lightning
import torch
from torch import Tensor

__all__ = ["LightningEpisodicModule", "split_episode"]


def split_episode(
    data: Tensor, labels: Tensor, ways: int, shots: int, queries: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(support, support_labels, query, query_labels)`` of a learn2learn episode.

    An episode holds ``shots + queries`` examples of each of ``ways`` classes, as a
    learn2learn ``Taskset`` samples it (``KShots(shots + queries)``); a leading batch dimension
    of 1 is dropped. Examples are grouped by label (stable sort), and the first ``shots`` of
    each class form the support set.

    Raises:
        ValueError: if the episode does not hold ``ways * (shots + queries)`` examples.
    """
    if data.dim() > 1 and data.size(0) == 1 and labels.dim() == 2:
        data, labels = data.squeeze(0), labels.squeeze(0)
    expected = ways * (shots + queries)
    if data.size(0) != expected or labels.numel() != expected:
        raise ValueError(
            f"the episode has {data.size(0)} examples and {labels.numel()} labels, but ways={ways}, shots={shots}, "
            f"queries={queries} need {expected}; sample tasks with NWays({ways}) and KShots({shots + queries})"
        )
    order = torch.sort(labels, stable=True).indices
    data, labels = data[order], labels[order]
    is_support = (torch.arange(expected, device=labels.device) % (shots + queries)) < shots
    return data[is_support], labels[is_support], data[~is_support], labels[~is_support]


class LightningEpisodicModule(lightning.LightningModule, abc.ABC):
    """learn2learn's base LightningModule: subclasses implement ``meta_learn(batch, batch_idx, ways, shots, queries)``.

    ``meta_learn`` returns ``(loss, accuracy)`` of one episode; training, validation and test
    log them as ``train_loss`` / ``train_accuracy``, ``valid_loss`` / ``valid_accuracy``,
    ``test_loss`` / ``test_accuracy``. The optimizer is Adam (``lr``) with a ``StepLR``
    schedule (``scheduler_step``, ``scheduler_decay``). ``data_parallel=True`` splits each
    episode over the visible GPUs with ``nn.DataParallel`` (a warning says when fewer than two).
    """

    train_shots = 1
    train_queries = 1
    train_ways = 5
    test_shots = 1
    test_queries = 1
    test_ways = 5
    lr = 0.001
    scheduler_step = 20
    scheduler_decay = 1.0

    def _read_episode_options(self, kwargs: dict[str, Any], extra: dict[str, Any]) -> None:
        """Sets the episode and optimiser options from ``kwargs`` (default: the class attributes) as hyperparameters.

        Raises:
            TypeError: for a keyword that is not an option of this module.
        """
        names = [
            "train_ways", "train_shots", "train_queries", "test_ways", "test_shots", "test_queries",
            "lr", "scheduler_step", "scheduler_decay",
        ]
        allowed = set(names) | set(extra) | {"data_parallel"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown options {unknown}; it accepts {sorted(allowed)}")
        values = {name: kwargs.get(name, getattr(LightningEpisodicModule, name)) for name in names}
        values.update({name: kwargs.get(name, default) for name, default in extra.items()})
        for name, value in values.items():
            setattr(self, name, value)
        self.data_parallel = bool(kwargs.get("data_parallel", False))
        if self.data_parallel and torch.cuda.device_count() < 2:
            warnings.warn(
                f"data_parallel=True needs 2 or more CUDA devices, found {torch.cuda.device_count()}; running on one",
                stacklevel=3,
            )
            self.data_parallel = False
        self.save_hyperparameters(values)

    @staticmethod
    def add_model_specific_args(parent_parser: ArgumentParser) -> ArgumentParser:
        """Returns a parser extending ``parent_parser`` with the episode and optimiser options."""
        parser = ArgumentParser(parents=[parent_parser], add_help=True, conflict_handler="resolve")
        for name in ("train_ways", "train_shots", "train_queries", "test_ways", "test_shots", "test_queries"):
            parser.add_argument(f"--{name}", type=int, default=getattr(LightningEpisodicModule, name))
        parser.add_argument("--lr", type=float, default=LightningEpisodicModule.lr)
        parser.add_argument("--scheduler_step", type=int, default=LightningEpisodicModule.scheduler_step)
        parser.add_argument("--scheduler_decay", type=float, default=LightningEpisodicModule.scheduler_decay)
        return parser

    @abc.abstractmethod
    def meta_learn(self, batch: Any, batch_idx: int, ways: int, shots: int, queries: int) -> tuple[Tensor, Tensor]:
        """Returns ``(query loss, query accuracy)`` of one episode; subclasses define it."""

    def _step(self, batch: Any, batch_idx: int, prefix: str, train: bool) -> Tensor:
        if train:
            ways, shots, queries = self.train_ways, self.train_shots, self.train_queries
        else:
            ways, shots, queries = self.test_ways, self.test_shots, self.test_queries
        if train:
            loss, acc = self.meta_learn(batch, batch_idx, ways, shots, queries)
        else:
            # Lightning evaluates under inference mode, where no adaptation step could take a gradient;
            # copies of the batch made outside it can enter autograd.
            with torch.inference_mode(False), torch.enable_grad():
                batch = [x.clone() if isinstance(x, Tensor) else x for x in batch]
                loss, acc = self.meta_learn(batch, batch_idx, ways, shots, queries)
            loss, acc = loss.detach(), acc.detach()
        self.log(f"{prefix}_loss", loss.item(), on_step=False, on_epoch=True, prog_bar=False, logger=True)
        self.log(f"{prefix}_accuracy", acc.item(), on_step=False, on_epoch=True, prog_bar=True, logger=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, batch_idx, "train", train=True)

    def validation_step(self, batch: Any, batch_idx: int) -> float:
        return self._step(batch, batch_idx, "valid", train=False).item()

    def test_step(self, batch: Any, batch_idx: int) -> float:
        return self._step(batch, batch_idx, "test", train=False).item()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.scheduler_step, gamma=self.scheduler_decay)
        return [optimizer], [scheduler]


def add_option_args(parent_parser: ArgumentParser, options: dict[str, Any]) -> ArgumentParser:
    """Returns a parser with the episode and optimiser options, ``--<name>`` for each of an algorithm's ``options``, and ``--data_parallel``.

    ``options`` maps each name to its default, whose type the argument takes.
    """
    parser = LightningEpisodicModule.add_model_specific_args(parent_parser)
    for name, default in options.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--data_parallel", action="store_true")
    return parser
