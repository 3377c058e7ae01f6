"""learn2learn's Lightning modules and EpisodicBatcher train on an episode stream as in learn2learn's examples."""

from __future__ import annotations

import math

import lightning
import pytest
import torch
from torch import nn

from metaloop.compat import learn2learn as l2l
from metaloop.compat.learn2learn.algorithms.lightning.lightning_episodic_module import split_episode
from metaloop.compat.learn2learn.utils.lightning import EpisodicBatcher

WAYS, SHOTS, QUERIES = 3, 1, 2


class Episodes:
    """A learn2learn-style Taskset: ``sample()`` gives ``(data, labels)`` of WAYS classes, SHOTS + QUERIES each, shuffled."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.prototypes = torch.rand(10, 1, 8, 8, generator=self.generator)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        classes = torch.randperm(10, generator=self.generator)[:WAYS]
        labels = torch.arange(WAYS).repeat_interleave(SHOTS + QUERIES)
        data = self.prototypes[classes[labels]] + 0.1 * torch.rand(len(labels), 1, 8, 8, generator=self.generator)
        order = torch.randperm(len(labels), generator=self.generator)
        return data[order], labels[order]


def features() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())


def make(name: str) -> lightning.LightningModule:
    torch.manual_seed(0)
    options = dict(train_ways=WAYS, train_shots=SHOTS, train_queries=QUERIES, test_ways=WAYS, test_shots=SHOTS,
                   test_queries=QUERIES, lr=0.01)
    if name == "maml":
        return l2l.algorithms.LightningMAML(nn.Sequential(features(), nn.Linear(16, WAYS)), adaptation_lr=0.5, **options)
    if name == "anil":
        return l2l.algorithms.LightningANIL(features(), nn.Linear(16, WAYS), adaptation_steps=2, **options)
    if name == "protonet":
        return l2l.algorithms.LightningPrototypicalNetworks(features(), distance_metric="euclidean", **options)
    return l2l.algorithms.LightningMetaOptNet(features(), svm_C_reg=0.1, svm_max_iters=15, **options)


@pytest.mark.parametrize("name", ["maml", "anil", "protonet", "metaoptnet"])
def test_each_lightning_module_fits_validates_and_tests_on_an_episodic_batcher(name):
    module = make(name)
    before = [p.detach().clone() for p in module.parameters()]
    data = EpisodicBatcher(Episodes(0), Episodes(1), Episodes(2), epoch_length=3)
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 6
    assert any(not torch.equal(p, q) for p, q in zip(before, module.parameters()))
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train_loss"])) and 0 <= float(metrics["valid_accuracy"]) <= 1
    (results,) = trainer.test(module, datamodule=data, verbose=False)
    assert 0 <= results["test_accuracy"] <= 1 and math.isfinite(results["test_loss"])
    assert module.hparams["train_ways"] == WAYS and module.hparams["lr"] == 0.01


def test_options_default_to_learn2learns_and_unknown_ones_are_rejected():
    maml = l2l.algorithms.LightningMAML(nn.Linear(2, 5))
    assert (maml.train_ways, maml.train_shots, maml.lr, maml.adaptation_lr, maml.adaptation_steps) == (5, 1, 0.001, 0.1, 1)
    assert l2l.algorithms.LightningMetaOptNet(nn.Flatten()).svm_C_reg == 0.1
    with pytest.raises(TypeError, match=r"LightningMAML got unknown options \['ways'\]"):
        l2l.algorithms.LightningMAML(nn.Linear(2, 5), ways=5)
    with pytest.raises(ValueError, match="train_ways=5 must equal test_ways=3"):
        l2l.algorithms.LightningANIL(nn.Flatten(), nn.Linear(2, 5), test_ways=3)


def test_configure_optimizers_is_adam_with_a_step_schedule():
    module = l2l.algorithms.LightningPrototypicalNetworks(features(), lr=0.02, scheduler_step=7, scheduler_decay=0.5)
    [optimizer], [scheduler] = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 0.02
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 7 and scheduler.gamma == 0.5


def test_add_model_specific_args_parses_the_options():
    import argparse

    parser = l2l.algorithms.LightningMetaOptNet.add_model_specific_args(argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["--train_ways", "7", "--svm_C_reg", "0.5"])
    assert args.train_ways == 7 and args.svm_C_reg == 0.5 and args.svm_max_iters == 15


def test_split_episode_takes_the_first_shots_of_each_class_as_support():
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    data = torch.arange(6.0)[:, None]
    support, support_labels, query, query_labels = split_episode(data, labels, ways=3, shots=1, queries=1)
    assert support_labels.tolist() == [0, 1, 2] and query_labels.tolist() == [0, 1, 2]
    assert support.flatten().tolist() == [1.0, 2.0, 0.0] and query.flatten().tolist() == [3.0, 5.0, 4.0]
    with pytest.raises(ValueError, match=r"ways=3, shots=2, queries=1 need 9"):
        split_episode(data, labels, ways=3, shots=2, queries=1)


def test_episodic_batcher_serves_epoch_length_samples_and_checks_its_inputs():
    data = EpisodicBatcher(Episodes(0), epoch_length=4)
    assert data.validation_tasks is data.train_tasks and data.test_tasks is data.train_tasks
    episodes = list(data.train_dataloader())
    assert len(episodes) == 4 and len(data.val_dataloader()) == 4
    assert all(x.shape == (WAYS * (SHOTS + QUERIES), 1, 8, 8) for x, _ in episodes)
    with pytest.raises(TypeError, match="train_tasks is a list without sample()"):
        EpisodicBatcher([1, 2])
    with pytest.raises(ValueError, match="epoch_length=0 must be at least 1"):
        EpisodicBatcher(Episodes(0), epoch_length=0)


@pytest.mark.parametrize("name", ["maml", "anil"])
def test_validation_adapts_although_lightning_evaluates_under_inference_mode(name):
    """The same episodes scored with adaptation_lr 0 and 0.5 give different losses: the inner step really runs."""
    losses = []
    for lr in (0.0, 0.5):
        module = make(name)
        module.adaptation_lr = lr
        module_maml = module.model if name == "maml" else module.classifier
        module_maml.lr = lr
        trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                    enable_model_summary=False)
        (result,) = trainer.validate(module, datamodule=EpisodicBatcher(Episodes(3), epoch_length=2), verbose=False)
        losses.append(result["valid_loss"])
    assert abs(losses[0] - losses[1]) > 1e-4


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="the warning is for machines with fewer than two GPUs")
def test_data_parallel_without_two_gpus_warns_and_runs_on_one():
    with pytest.warns(UserWarning, match="data_parallel=True needs 2 or more CUDA devices"):
        module = l2l.algorithms.LightningPrototypicalNetworks(features(), data_parallel=True)
    assert not module.data_parallel and not isinstance(module.features, nn.DataParallel)


def test_the_episodic_base_class_needs_a_meta_learn_hook():
    from metaloop.compat.learn2learn.algorithms import LightningEpisodicModule

    with pytest.raises(TypeError, match="abstract method.*meta_learn"):
        LightningEpisodicModule()
