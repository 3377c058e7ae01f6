from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
import torch
from torch.utils.data import TensorDataset

from metaloop.lightning import MetaDataModule
from metaloop.tasks import EpisodeSampler, SinusoidTasks, Task, sample_meta_batch


def fake_trainer(rank: int, world_size: int, trained: int = 0) -> SimpleNamespace:
    """Returns the parts of a Trainer the data module reads: its rank and its count of trained meta-batches."""
    progress = SimpleNamespace(total=SimpleNamespace(processed=trained))
    return SimpleNamespace(
        global_rank=rank, world_size=world_size, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    )


def first_batches(loader: object, count: int) -> list[Task]:
    return [batch for batch, _ in zip(loader, range(count))]  # type: ignore[call-overload]


class Recorder(lightning.LightningModule):
    """Fits a linear model on the query sets; records a fingerprint of every training meta-batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.seen: list[float] = []

    def training_step(self, batch: Task, batch_idx: int) -> torch.Tensor:
        assert isinstance(batch, Task)
        self.seen.append(float(batch.support_x.sum()))
        return torch.nn.functional.mse_loss(self.linear(batch.query_x), batch.query_y)

    def validation_step(self, batch: Task, batch_idx: int) -> None:
        self.log("val_loss", torch.nn.functional.mse_loss(self.linear(batch.query_x), batch.query_y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(module: MetaDataModule, root: Path, ckpt_path: str | None = None, **trainer_options: object) -> list[float]:
    model = Recorder()
    options = {"max_steps": 6, "val_check_interval": 3, "check_val_every_n_epoch": None, **trainer_options}
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1, default_root_dir=root,
        callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=3, save_top_k=-1)],
        **options,
    )
    trainer.fit(model, module, ckpt_path=ckpt_path)
    return model.seen


@pytest.fixture
def sampler() -> EpisodeSampler:
    images = torch.randint(0, 256, (120, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return EpisodeSampler(TensorDataset(images, torch.arange(120) // 5), n_ways=3, k_shots=1, k_queries=2)


def test_loaders_yield_the_seeded_meta_batches(sampler: EpisodeSampler) -> None:
    module = MetaDataModule(sampler, meta_batch_size=4, eval_meta_batch_size=8, num_val_tasks=20, num_test_tasks=600, seed=5)
    train = first_batches(module.train_dataloader(), 2)
    assert [tuple(field.shape) for field in train[1]] == [(4, 3, 1, 4, 4), (4, 3), (4, 6, 1, 4, 4), (4, 6)]
    assert torch.equal(train[1].query_x, sample_meta_batch(sampler, "train", 5, range(4, 8)).query_x)
    val = list(module.val_dataloader())
    assert [len(batch.query_y) for batch in val] == [8, 8, 4]
    assert torch.equal(torch.cat([b.support_x for b in val]), sample_meta_batch(sampler, "val", 5, range(20)).support_x)
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(val, module.val_dataloader()))  # same every time
    test = module.test_dataloader()
    assert len(test) == 75 and len(list(test)[-1].query_y) == 8


def test_same_tasks_with_zero_and_two_workers(sampler: EpisodeSampler) -> None:
    results = []
    for workers in (0, 2):
        module = MetaDataModule(sampler, meta_batch_size=4, num_val_tasks=10, eval_meta_batch_size=3, num_workers=workers)
        results.append((first_batches(module.train_dataloader(), 5), list(module.val_dataloader())))
    (train0, val0), (train2, val2) = results
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(train0, train2))
    assert len(val0) == len(val2) == 4
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(val0, val2))


def test_ranks_draw_different_training_tasks_and_share_evaluation(sampler: EpisodeSampler) -> None:
    shards, streams = [], []
    for rank in range(2):
        module = MetaDataModule(sampler, meta_batch_size=4, eval_meta_batch_size=32, num_test_tasks=600)
        module.trainer = fake_trainer(rank, world_size=2)  # type: ignore[assignment]
        shards.append(list(module.test_dataloader()))
        streams.append(first_batches(module.train_dataloader(), 1)[0])
    assert [len(shard) for shard in shards] == [10, 9]
    merged = [shards[b % 2][b // 2].support_x for b in range(19)]
    whole = sample_meta_batch(sampler, "test", 0, range(600)).support_x
    assert torch.equal(torch.cat(merged), whole)  # each of the 600 tasks once
    assert not torch.equal(streams[0].support_x, streams[1].support_x)
    assert torch.equal(streams[1].support_x, sample_meta_batch(sampler, "train", 0, range(4), stream=1).support_x)


def test_training_stream_starts_after_the_trained_meta_batches(sampler: EpisodeSampler) -> None:
    module = MetaDataModule(sampler, meta_batch_size=4)
    module.trainer = fake_trainer(0, 1, trained=7)  # type: ignore[assignment]
    first = first_batches(module.train_dataloader(), 1)[0]
    assert torch.equal(first.support_x, sample_meta_batch(sampler, "train", 0, range(28, 32)).support_x)


def test_resuming_from_a_checkpoint_continues_the_task_stream(tmp_path: Path) -> None:
    module = MetaDataModule(SinusoidTasks(k_shots=5, k_queries=5), meta_batch_size=4, num_val_tasks=8, seed=1)
    uninterrupted = fit(module, tmp_path / "run")
    assert len(uninterrupted) == 6 and len(set(uninterrupted)) == 6
    resumed = fit(module, tmp_path / "resumed", ckpt_path=str(tmp_path / "run" / "step=3.ckpt"))
    assert resumed == uninterrupted[3:]


def test_epochs_continue_the_stream_instead_of_repeating_it(tmp_path: Path) -> None:
    module = MetaDataModule(SinusoidTasks(k_shots=5, k_queries=5), meta_batch_size=4, num_val_tasks=0, seed=1)
    by_epochs = fit(module, tmp_path / "epochs", max_steps=-1, max_epochs=2, limit_train_batches=3, val_check_interval=None, check_val_every_n_epoch=1)
    expected = [float(sample_meta_batch(module.tasks, "train", 1, range(4 * i, 4 * i + 4)).support_x.sum()) for i in range(6)]
    assert by_epochs == pytest.approx(expected, rel=1e-6)
    assert module.val_dataloader() == []


def test_lightning_moves_a_task_to_the_device_as_a_task() -> None:
    batch = sample_meta_batch(SinusoidTasks(), "val", 0, range(2))
    moved = lightning.LightningModule().transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert isinstance(moved, Task) and torch.equal(moved.query_y, batch.query_y)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"meta_batch_size": 0}, "meta_batch_size=0 must be at least 1"),
        ({"num_test_tasks": -1}, "num_test_tasks=-1 must be at least 0"),
        ({"num_workers": -2}, "num_workers=-2 must be at least 0"),
    ],
)
def test_bad_options_are_refused(option: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetaDataModule(SinusoidTasks(), **option)


def test_evaluating_a_split_without_classes_is_refused_at_construction():
    images = TensorDataset(torch.rand(24, 1, 5, 5), torch.arange(24) // 4)
    sampler = EpisodeSampler(images, n_ways=2, k_shots=1, k_queries=1, splits=(6, 0, 0))
    with pytest.raises(ValueError, match=r"num_val_tasks=2 but the task source's split 'val' has no classes; set num_val_tasks=0"):
        MetaDataModule(sampler, num_val_tasks=2, num_test_tasks=0)
    with pytest.raises(ValueError, match=r"num_test_tasks=3 but the task source's split 'test' has no classes"):
        MetaDataModule(sampler, num_val_tasks=0, num_test_tasks=3)
    assert MetaDataModule(sampler, num_val_tasks=0, num_test_tasks=0).num_val_tasks == 0
