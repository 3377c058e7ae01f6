"""PrototypicalModule: a backbone trained through a few-shot head (Prototypical Networks, MetaOptNet's SVM)."""

from __future__ import annotations

import functools
import math

import lightning
import pytest
import torch
import torch.nn.functional as F
from lightning_cases import TinyImages
from torch import nn

from metaloop.lightning import MetaDataModule, PrototypicalModule, conv4_backbone, head_logits
from metaloop.nn import PrototypicalClassifier, SVClassifier
from metaloop.tasks import EpisodeSampler, Task, sample_meta_batch


def module(head: nn.Module | None = None, lr: float = 1e-3) -> PrototypicalModule:
    torch.manual_seed(0)
    return PrototypicalModule(
        conv4_backbone(hidden=8, image_size=16), PrototypicalClassifier() if head is None else head,
        functools.partial(torch.optim.Adam, lr=lr),
    )


def batch(n_ways: int = 4, tasks: int = 2) -> Task:
    return sample_meta_batch(EpisodeSampler(TinyImages(), n_ways=n_ways, k_shots=2, k_queries=2), "train", 0, range(tasks))


def test_conv4_backbone_is_conv4_without_its_head():
    assert conv4_backbone()(torch.zeros(3, 1, 28, 28)).shape == (3, 64)
    assert conv4_backbone(in_channels=3, hidden=32, image_size=84)(torch.zeros(2, 3, 84, 84)).shape == (2, 32 * 25)


def test_training_loss_is_the_mean_query_cross_entropy_of_the_prototype_head():
    """By hand: embed support and query together, class means of the support, logits = -squared distance."""
    m, b = module(), batch()
    losses = []
    for i in range(2):
        emb = m.backbone(torch.cat([b.support_x[i], b.query_x[i]]))
        support, query = emb[:8], emb[8:]
        means = torch.stack([support[b.support_y[i] == c].mean(0) for c in range(4)])
        logits = -((query[:, None] - means[None]) ** 2).sum(-1)
        losses.append(F.cross_entropy(logits, b.query_y[i]))
    loss, metrics = m.meta_gradient(b)  # the body of training_step, outside a Trainer
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)
    assert set(metrics) == {"acc"} and all(p.grad is not None for p in m.model.parameters())


@pytest.mark.parametrize("head", [PrototypicalClassifier(), PrototypicalClassifier(distance="cosine"), SVClassifier(C_reg=0.1)],
                         ids=["euclidean", "cosine", "svm"])
def test_the_query_loss_trains_every_backbone_parameter_through_the_head(head):
    m, b = module(head), batch()
    logits = head_logits(m.backbone, m.head, b.support_x[0], b.support_y[0], b.query_x[0])
    assert logits.shape == (8, 4)
    F.cross_entropy(logits, b.query_y[0]).backward()
    grads = [p.grad for p in m.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("head", [PrototypicalClassifier(), SVClassifier()], ids=["prototypical", "svm"])
def test_fit_validate_and_test_log_post_adaptation_metrics(head):
    m = module(head, lr=1e-2)
    data = MetaDataModule(
        EpisodeSampler(TinyImages(), n_ways=4, k_shots=2, k_queries=2),
        meta_batch_size=2, eval_meta_batch_size=2, num_val_tasks=4, num_test_tasks=4, seed=0,
    )
    before = [p.detach().clone() for p in m.backbone.parameters()]
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, max_steps=3, val_check_interval=3, check_val_every_n_epoch=None, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(m, datamodule=data)
    assert any(not torch.equal(p, q) for p, q in zip(before, m.backbone.parameters()))
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and 0 <= float(metrics["train/acc"]) <= 1
    assert 0 <= float(metrics["val/acc_post"]) <= 1 and float(metrics["val/acc_post_ci95"]) >= 0
    (results,) = trainer.test(m, datamodule=data, verbose=False)
    assert set(results) == {"test/acc_post", "test/acc_post_ci95", "test/loss_post", "test/loss_post_ci95"}
    assert 0 <= results["test/acc_post"] <= 1


def test_a_backbone_that_cannot_embed_the_task_is_reported_before_training():
    m = PrototypicalModule(conv4_backbone(in_channels=3, hidden=8, image_size=16), PrototypicalClassifier(),
                           functools.partial(torch.optim.Adam, lr=1e-3))
    data = MetaDataModule(EpisodeSampler(TinyImages(), n_ways=4, k_shots=1, k_queries=1), meta_batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"Sequential cannot run on the task's support inputs of shape \(4, 1, 16, 16\)"):
        m.check_datamodule(data, "fit")


def test_a_head_without_fit_is_rejected():
    with pytest.raises(TypeError, match=r"head Linear has no fit_\(support, labels\)"):
        PrototypicalModule(nn.Flatten(), nn.Linear(2, 2), functools.partial(torch.optim.Adam, lr=1e-3))


@pytest.mark.parametrize("option,head", [("prototypical", PrototypicalClassifier), ("metaoptnet", SVClassifier)])
def test_the_module_config_options_build_a_prototypical_module(option, head):
    """configs/module/{prototypical,metaoptnet}.yaml with model=conv4_backbone: the module trains on an Omniglot-shaped task."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from metaloop.cli import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"module={option}", "model=conv4_backbone", "model.hidden=8"])
    m = instantiate(cfg.module, _convert_="partial")
    assert isinstance(m, PrototypicalModule) and isinstance(m.head, head)
    x = torch.rand(2, 1, 28, 28)
    task = Task(x, torch.tensor([0, 1]), x.flip(0), torch.tensor([1, 0]))
    m.check_task(task)
    assert m.task_metrics(*task)["loss"].requires_grad
