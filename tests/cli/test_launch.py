"""Scale-out (``metaloop.cli.launch``): checks before any process starts, launcher configs, multi-node through torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from cli_helpers import TINY, cli_error
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

import metaloop.cli
import metaloop.cli.launch
from metaloop.cli import config_dir, main
from metaloop.cli.launch import claim_devices, jobs_at_once, process_rank
from metaloop.lightning import checkpoint_config
from metaloop.tasks import Task, sample_meta_batch

SINE = ["--config", "maml_sinusoid.yaml", *TINY]
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def _no_run(folder: Path) -> bool:
    return not (folder / "checkpoints").exists() and not (folder / "logs").exists()


# -- bad scale-out input: one message, before any process starts ----------------------------
def test_evaluation_sets_smaller_than_one_meta_batch_per_rank_are_refused(tmp_path):
    message = cli_error("fit", *SINE, *DDP_CPU, "task.num_val_tasks=4", "task.eval_meta_batch_size=50",
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert message.startswith("metaloop: error: task.num_val_tasks=4 in meta-batches of task.eval_meta_batch_size=50 "
                              "gives 1 evaluation meta-batch(es) for 2 ranks")
    assert "set task.num_val_tasks to at least 100, or task.eval_meta_batch_size to at most 2" in message
    assert _no_run(tmp_path / "run")
    # the test set is checked too, and validate checks only the validation set
    assert "task.num_test_tasks=2" in cli_error("fit", *SINE, *DDP_CPU, "task.num_val_tasks=4")
    assert "task.num_val_tasks=1" in cli_error("validate", *SINE, *DDP_CPU, "task.num_val_tasks=1", "task.num_test_tasks=1", "ckpt_path=none")


def test_a_sweep_with_a_bad_evaluation_set_stops_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    message = cli_error("fit", "-m", *SINE, *DDP_CPU, "task.num_val_tasks=2", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert "task.num_val_tasks=2" in message
    assert not list(sweep.glob("[0-9]*"))


def test_devices_that_do_not_exist_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(metaloop.cli.launch, "visible_gpus", lambda: [])
    assert "trainer.accelerator=gpu but this machine has no visible CUDA GPU" in cli_error("fit", *SINE, "trainer=gpu")
    monkeypatch.setattr(metaloop.cli.launch, "visible_gpus", lambda: ["0", "1"])
    message = cli_error("fit", *SINE, "trainer=gpu", "trainer.devices=4", f"hydra.run.dir={tmp_path / 'run'}")
    assert "trainer.devices=4 but this machine has 2 visible GPU(s); use at most 2" in message
    assert "names GPU(s) [3]" in cli_error("fit", *SINE, "trainer=gpu", "trainer.devices=[0,3]")
    assert "must be a positive number of processes" in cli_error("fit", *SINE, "trainer.devices=0")
    assert _no_run(tmp_path / "run")


def test_slurm_jobs_need_a_number_of_devices(tmp_path):
    if not metaloop.cli._installed("hydra_plugins.hydra_submitit_launcher"):
        pytest.skip("needs hydra-submitit-launcher")
    sweep = tmp_path / "sweep"
    message = cli_error("fit", "-m", *SINE, "launcher=submitit_slurm", "trainer=ddp", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert "launcher=submitit_slurm needs trainer.devices as a number" in message and "not 'auto'" in message
    assert not sweep.exists() or not list(sweep.glob("[0-9]*"))


def test_the_launcher_plugin_of_the_parallel_launcher_is_checked_first(monkeypatch):
    monkeypatch.setitem(metaloop.cli._LAUNCHER_PLUGINS, "parallel", ("hydra_plugins.not_installed", "hydra-joblib-launcher"))
    assert "launcher=parallel needs the Hydra plugin hydra-joblib-launcher" in cli_error("fit", *SINE, "-m", "launcher=parallel")


# -- launcher configs ---------------------------------------------------------------------------
def _hydra_config(capsys, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["task=sinusoid", "model=mlp", *overrides], return_hydra_config=True)
    return {"launcher": {k: cfg.hydra.launcher[k] for k in cfg.hydra.launcher}}


def test_slurm_launcher_asks_for_one_task_and_gpu_per_device_on_each_node(capsys):
    if not metaloop.cli._installed("hydra_plugins.hydra_submitit_launcher"):
        pytest.skip("needs hydra-submitit-launcher")
    launcher = _hydra_config(capsys, "launcher=submitit_slurm", "trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=4",
                             "trainer.num_nodes=2")["launcher"]
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)


def test_parallel_launcher_runs_visible_devices_per_job_at_once(monkeypatch, capsys):
    if not metaloop.cli._installed("hydra_plugins.hydra_joblib_launcher"):
        pytest.skip("needs hydra-joblib-launcher")
    monkeypatch.setattr(metaloop.cli.launch, "visible_gpus", lambda: [str(i) for i in range(8)])
    launcher = _hydra_config(capsys, "launcher=parallel", "trainer=ddp", "trainer.accelerator=gpu", "sweep.devices_per_job=2")["launcher"]
    assert launcher["n_jobs"] == 4
    main(["fit", *SINE, "launcher=parallel", "trainer=ddp", "sweep.devices_per_job=2", "--cfg", "job", "--resolve"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["devices"] == 2
    assert jobs_at_once("auto", 1, "cpu") == (os.cpu_count() or 1)
    assert jobs_at_once(3, 2, "gpu") == 3
    with pytest.raises(ValueError, match="sweep.jobs_at_once=0 must be a positive integer or 'auto'"):
        jobs_at_once(0, 1, "cpu")


def test_jobs_at_once_each_hold_their_own_gpus_and_master_port(monkeypatch, tmp_path):
    monkeypatch.setattr(metaloop.cli.launch, "visible_gpus", lambda: ["0", "1", "2", "3"])
    cfg = OmegaConf.create({"sweep": {"devices_per_job": 2, "jobs_at_once": "auto"}, "trainer": {"accelerator": "gpu"}, "threads": 1})
    with claim_devices(tmp_path, cfg) as (first_env, first), claim_devices(tmp_path, cfg) as (second_env, second):
        assert (first["slot"], first_env["CUDA_VISIBLE_DEVICES"]) == (0, "0,1")
        assert (second["slot"], second_env["CUDA_VISIBLE_DEVICES"]) == (1, "2,3")
        assert first_env["MASTER_PORT"] != second_env["MASTER_PORT"] and first_env["OMP_NUM_THREADS"] == "1"
    # released when the job ends
    with claim_devices(tmp_path, cfg) as (env, placement):
        assert placement["slot"] == 0
    with claim_devices(tmp_path, OmegaConf.create({"sweep": {"devices_per_job": None}})) as (env, placement):
        assert env == {} and placement == {}


def test_process_rank_reads_the_launchers_environment(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert process_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_rank() == 1
    monkeypatch.setenv("RANK", "3")
    assert process_rank() == 3


# -- multi-node through torchrun -----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_make_the_single_process_step_on_the_union_of_their_tasks(tmp_path):
    """``torchrun --nnodes=2`` (one process per "node", on localhost, gloo) through Lightning's torchelastic environment."""
    run, port, meta_batch = tmp_path / "run", _free_port(), 3
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
             "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "metaloop", "fit", "--config", "maml_sinusoid.yaml",
             "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_steps=1",
             "trainer.val_check_interval=1", f"task.meta_batch_size={meta_batch}", "task.num_val_tasks=0",
             "test_after_fit=false", "~callbacks.progress_bar", f"hydra.run.dir={run}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    checkpoint = run / "checkpoints" / "last.ckpt"
    distributed = torch.load(checkpoint, weights_only=True)
    assert distributed["global_step"] == 1
    assert sorted(p.name for p in run.glob("*.log")) == ["cli.log"]  # node 1 wrote no files

    # the same run in one process: same seed and construction order as `metaloop fit`, both nodes' tasks in one batch
    cfg = checkpoint_config(checkpoint)
    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.task.datamodule, _convert_="partial")
    module = instantiate(cfg.module, _convert_="partial")
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    parts = [sample_meta_batch(datamodule.tasks, "train", cfg.seed, range(meta_batch), stream=rank) for rank in (0, 1)]
    union = Task(*(torch.cat(fields) for fields in zip(*parts)))
    lightning.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(module, train_dataloaders=DataLoader([union], batch_size=None))
    single = module.state_dict()
    assert set(single) == set(distributed["state_dict"])
    for key, value in single.items():
        assert not torch.equal(value, initial[key]), key
        torch.testing.assert_close(distributed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
