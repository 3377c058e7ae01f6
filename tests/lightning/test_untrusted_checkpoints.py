"""A checkpoint carries data, never instructions: its stored configuration cannot make ``load_*`` run code (issue 19, A).

Each attack is a checkpoint whose weights load with ``weights_only=True`` but whose stored run
configuration names a callable that runs code when built. Before the fix, each of them ran.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from metaloop.lightning import MetaDataModule, MetaLightningModule, load_run, load_tasks
from metaloop.lightning.runs import CONFIG_KEY
from metaloop.lightning.targets import ALLOW_ENV, TargetNotAllowed, build

LEGIT_MODULE = {
    "_target_": "metaloop.lightning.MetaLightningModule",
    "model": {"_target_": "metaloop.lightning.MLP", "sizes": [1, 8, 1]},
    "objective": {"_target_": "metaloop.lightning.Regression"},
    "inner": {"steps": 1},
    "inner_optim": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05},
    "outer_optim": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01},
}
LEGIT_TASKS = {
    "_target_": "metaloop.lightning.MetaDataModule",
    "tasks": {"_target_": "metaloop.tasks.SinusoidTasks", "k_shots": 5, "k_queries": 5},
    "meta_batch_size": 2,
    "num_val_tasks": 2,
    "num_test_tasks": 2,
}


class _Payload:
    """A pickle that runs code while it loads: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class UserNet(torch.nn.Module):
    """A model of the user's own: loads only when the user allows it."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _save(path: Path, config: dict, state_dict: dict | None = None) -> Path:
    """Writes a checkpoint of plain data (it loads with weights_only=True) whose stored run configuration is ``config``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict or {}, CONFIG_KEY: OmegaConf.to_yaml(OmegaConf.create(config))}, path)
    return path


@pytest.fixture
def attacks(http_folder, tmp_path):
    """Returns {name: (stored node, check that nothing ran)} for the attacks of issue 19 and variants."""
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), http_folder.root / "x.pt")  # what torch.load(weights_only=False) runs
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    np.save(tmp_path / "evil.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    hub = {
        "_target_": "torch.hub.load_state_dict_from_url", "url": f"{http_folder.url}/x.pt", "weights_only": False,
        "model_dir": str(tmp_path / "hub"), "progress": False,
    }

    def untouched() -> None:
        assert "/x.pt" not in http_folder.requested, "the stored configuration downloaded x.pt"
        assert not marker.exists(), "the stored configuration ran the payload"
        assert victim.read_text() == "precious", "the stored configuration truncated a file"

    nodes = {
        "hub": hub,
        "open": {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
        "numpy": {"_target_": "numpy.load", "file": str(tmp_path / "evil.npy"), "allow_pickle": True},
        "nested": {**LEGIT_MODULE, "model": {"_target_": "torch.nn.Sequential", "_args_": [hub]}},
        "through_metaloop": {**hub, "_target_": "metaloop.lightning.checkpoint.torch.hub.load_state_dict_from_url"},
        "resolver": f"${{oc.create:{{_target_:'builtins.open',file:'{victim}',mode:'w'}}}}",
    }
    return nodes, untouched


def _refusal(load) -> BaseException | None:
    """Returns what ``load()`` raised (None if it returned): the caller checks first that nothing ran."""
    try:
        load()
    except Exception as err:
        return err
    return None


def _target_named(node) -> str:
    if isinstance(node, str):
        return "interpolation"
    inner = node["model"]["_args_"][0] if "model" in node else node
    return inner["_target_"]


@pytest.mark.parametrize("attack", ["hub", "open", "numpy", "nested", "through_metaloop", "resolver"])
def test_a_stored_module_config_that_would_run_code_is_refused_before_anything_is_called(attack, attacks, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    nodes, untouched = attacks
    path = _save(tmp_path / "run" / "checkpoints" / "last.ckpt", {"seed": 0, "module": nodes[attack], "task": {"datamodule": LEGIT_TASKS}})
    for load in (lambda: MetaLightningModule.load_from_checkpoint(path), lambda: load_run(tmp_path / "run")):
        refused = _refusal(load)
        untouched()
        assert isinstance(refused, TargetNotAllowed), refused
        message = str(refused)
        assert "\n" not in message and f"checkpoint {path}" in message and _target_named(nodes[attack]) in message
        if attack != "resolver":
            assert "allow=[" in message and f"{ALLOW_ENV}=" in message


@pytest.mark.parametrize("attack", ["hub", "open", "numpy", "resolver"])
def test_a_stored_task_config_that_would_run_code_is_refused_by_load_tasks(attack, attacks, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    nodes, untouched = attacks
    tasks = {**LEGIT_TASKS, "tasks": nodes[attack]} if attack != "resolver" else nodes[attack]
    path = _save(tmp_path / "last.ckpt", {"seed": 0, "module": LEGIT_MODULE, "task": {"datamodule": tasks}})
    refused = _refusal(lambda: load_tasks(path))
    untouched()
    assert isinstance(refused, TargetNotAllowed), refused
    assert f"checkpoint {path}" in str(refused) and ("task.datamodule" in str(refused) or "interpolation" in str(refused))


@pytest.mark.parametrize("attack", ["hub", "open"])
def test_a_checkpoint_given_as_an_http_address_is_refused_the_same_way(attack, attacks, http_folder, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    nodes, untouched = attacks
    _save(http_folder.root / "evil.ckpt", {"seed": 0, "module": nodes[attack], "task": {"datamodule": nodes[attack]}})
    for load in (MetaLightningModule.load_from_checkpoint, load_tasks):
        refused = _refusal(lambda: load(f"{http_folder.url}/evil.ckpt"))
        untouched()
        assert isinstance(refused, TargetNotAllowed), refused
        assert str(refused).startswith(f"checkpoint {http_folder.url}/evil.ckpt names the target '{_target_named(nodes[attack])}'")
    assert http_folder.requested.count("/evil.ckpt") == 2


def test_a_legit_run_loads_its_module_and_tasks(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    torch.manual_seed(0)
    trained = build(LEGIT_MODULE)
    path = _save(tmp_path / "run" / "checkpoints" / "last.ckpt", {"seed": 0, "module": LEGIT_MODULE, "task": {"datamodule": LEGIT_TASKS}}, trained.state_dict())
    for loaded in (MetaLightningModule.load_from_checkpoint(path), load_run(tmp_path / "run")):
        assert torch.equal(loaded.model.head.weight, trained.model.head.weight)
    tasks = load_tasks(path)
    assert isinstance(tasks, MetaDataModule) and tasks.meta_batch_size == 2


def test_a_users_own_class_loads_when_allowed_by_argument_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    user = f"{UserNet.__module__}.UserNet"
    config = {**LEGIT_MODULE, "model": {"_target_": user, "width": 4}}
    trained = build(config, allow=[user])
    path = _save(tmp_path / "run" / "checkpoints" / "last.ckpt", {"seed": 0, "module": config}, trained.state_dict())
    with pytest.raises(TargetNotAllowed, match=rf"names the target '{user}' at module.model._target_, .* allow=\['{user}'\]"):
        MetaLightningModule.load_from_checkpoint(path)
    for loaded in (MetaLightningModule.load_from_checkpoint(path, allow=[user]), load_run(tmp_path / "run", allow=[user])):
        assert isinstance(loaded.model, UserNet) and torch.equal(loaded.model.body[0].weight, trained.model.body[0].weight)
    monkeypatch.setenv(ALLOW_ENV, f"{UserNet.__module__}.")
    assert isinstance(MetaLightningModule.load_from_checkpoint(path).model, UserNet)
