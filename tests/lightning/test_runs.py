"""Trained runs load in one line (``metaloop.lightning.runs``): the config stored in the checkpoint rebuilds the module."""

from __future__ import annotations

import lightning
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from metaloop.lightning import MetaLightningModule, checkpoint_config, load_run
from metaloop.lightning.runs import CONFIG_KEY, SaveRunConfig
from metaloop.tasks import SinusoidTasks, sample_meta_batch

CONFIG = {
    "seed": 0,
    "module": {
        "_target_": "metaloop.lightning.MetaLightningModule",
        "model": {"_target_": "metaloop.lightning.MLP", "sizes": [1, 8, 1]},
        "objective": {"_target_": "metaloop.lightning.Regression"},
        "inner_optim": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05},
        "outer_optim": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01},
        "learnable": {"lr": {"_target_": "metaloop.lightning.PerElement"}},
        "inner": {"steps": 1},
    },
}


def _fit_one_step(folder, callbacks) -> MetaLightningModule:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    module = instantiate(OmegaConf.create(CONFIG).module, _convert_="partial")
    batch = sample_meta_batch(SinusoidTasks(k_shots=5, k_queries=5), "train", 0, range(2))
    trainer = lightning.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=folder, callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(folder / "checkpoints", save_last=True), *callbacks],
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    return module


def test_a_checkpoint_with_its_config_loads_in_one_line_with_weights_and_learned_rates(tmp_path):
    trained = _fit_one_step(tmp_path, [SaveRunConfig(OmegaConf.to_yaml(CONFIG))])
    path = tmp_path / "checkpoints" / "last.ckpt"
    assert isinstance(torch.load(path, weights_only=True)[CONFIG_KEY], str)  # plain data
    for loaded in (MetaLightningModule.load_from_checkpoint(path), load_run(tmp_path)):
        assert not loaded.training and set(loaded.learned) == set(trained.learned)
        for key, value in trained.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    assert checkpoint_config(path).seed == 0


def test_a_checkpoint_without_config_says_how_to_load_it(tmp_path):
    trained = _fit_one_step(tmp_path, [])
    path = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="holds no metaloop run configuration .* pass the module's constructor arguments"):
        MetaLightningModule.load_from_checkpoint(path)
    # Lightning's loader, given the constructor arguments
    args = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(CONFIG).module).items() if k != "_target_"}
    from hydra.utils import instantiate

    built = instantiate({"_target_": "builtins.dict", **args}, _convert_="partial")
    with pytest.raises(ValueError, match="weights_only must stay True"):
        MetaLightningModule.load_from_checkpoint(path, weights_only=False, **built)
    loaded = MetaLightningModule.load_from_checkpoint(path, **built)
    assert torch.equal(loaded.model.head.weight, trained.model.head.weight)


def test_missing_files_name_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass the path of a .ckpt file"):
        MetaLightningModule.load_from_checkpoint(tmp_path / "absent.ckpt")
    with pytest.raises(FileNotFoundError, match="is not a metaloop run folder or has no last.ckpt"):
        load_run(tmp_path)
