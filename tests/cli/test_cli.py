"""The ``metaloop`` command: recipes, help, runs, resume, sweeps, evaluation from checkpoints, and bad input."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import TINY, cli, cli_error, last_metrics
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import metaloop.cli
from metaloop.cli import config_dir, main, recipe_summaries
from metaloop.lightning import checkpoint_config

RECIPES = sorted(p.stem for p in (Path(metaloop.__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
SINE = ["--config", "maml_sinusoid.yaml", *TINY]


def test_the_recipes_the_brief_asks_for_exist_with_a_one_line_summary():
    expected = {
        "maml_omniglot", "maml_omniglot_20way", "fomaml_omniglot", "anil_omniglot", "metasgd_omniglot",
        "maml_sinusoid", "metasgd_sinusoid", "metacurvature_omniglot",
    }
    summaries = recipe_summaries()
    assert expected <= set(summaries)
    assert all(summary for summary in summaries.values())
    assert "98.7" in summaries["maml_omniglot"] and "95.8" in summaries["maml_omniglot_20way"]
    assert "1.13" in summaries["maml_sinusoid"] and "0.90" in summaries["metasgd_sinusoid"]


def test_recipes_command_lists_each_recipe(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    for name in RECIPES:
        assert f"{name}.yaml" in out


def test_fit_help_lists_config_groups_and_options(capsys):
    main(["fit", "--help"])
    out = capsys.readouterr().out
    for group, options in {
        "task": ["omniglot", "sinusoid", "custom"], "model": ["conv4", "mlp"],
        "inner_optim": ["sgd", "adam", "metacurvature", "kronecker"],
        "learnable": ["none", "inner_lr", "per_param_lr", "per_layer_lr", "betas"],
        "outer_optim": ["adam"], "trainer": ["cpu", "gpu", "ddp"], "logger": ["csv", "tensorboard"],
        "launcher": ["basic", "joblib", "submitit_local", "submitit_slurm"],
    }.items():
        assert group in out
        for option in options:
            assert option in out, (group, option)
    assert not Path("outputs").exists()


# -- every option of the groups that shape the module builds a module that adapts -------
def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=["task=sinusoid", "model=mlp", "inner.lr=0.01", *overrides])


@pytest.mark.parametrize("inner_optim,learnable", [
    *((p.stem, "none") for p in sorted((Path(metaloop.__file__).resolve().parents[1] / "configs" / "inner_optim").glob("*.yaml"))),
    *(("adam", p.stem) for p in sorted((Path(metaloop.__file__).resolve().parents[1] / "configs" / "learnable").glob("*.yaml"))),
    ("metacurvature", "inner_lr"),
])
def test_every_inner_optimizer_and_learnable_option_builds_a_module_that_adapts(inner_optim, learnable):
    cfg = compose_config([f"inner_optim={inner_optim}", f"learnable={learnable}"])
    torch.manual_seed(0)
    module = instantiate(cfg.module, _convert_="partial")
    x, y = torch.linspace(-3, 3, 10)[:, None], torch.sin(torch.linspace(-3, 3, 10))[:, None]
    adapted = module.adapt((x, y), steps=2)(x)
    assert torch.isfinite(adapted).all()
    assert not torch.allclose(adapted, module.model(x))
    assert len(module.learned) == (0 if learnable == "none" else 1 if learnable in ("inner_lr", "betas") else 3 if learnable == "per_layer_lr" else 6)


# -- runs -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_a_few_meta_steps_and_tests(recipe, precision, tmp_path):
    """Both precisions explicitly, whatever ``auto`` means on this CPU (bf16 is emulated, slower but correct, without bf16 hardware)."""
    run = tmp_path / recipe
    recipe_file = Path(metaloop.__file__).resolve().parents[1] / "recipes" / f"{recipe}.yaml"
    validates = (yaml.safe_load(recipe_file.read_text()).get("task") or {}).get("num_val_tasks") != 0  # oneshot_20min: no val split
    cli("fit", "--config", f"{recipe}.yaml", *TINY, *([] if validates else ["task.num_val_tasks=0"]),
        f"trainer.precision={precision}", f"hydra.run.dir={run}")
    assert checkpoint_config(run / "checkpoints" / "last.ckpt").trainer.precision == precision
    metrics = last_metrics(run)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["test/loss_post"])
    assert (not validates or math.isfinite(metrics["val/loss_post"])) and "test/loss_post_ci95" in metrics
    if "omniglot" in recipe:
        assert 0.0 <= metrics["test/acc_post"] <= 1.0
    assert (run / "learning_curve.png").stat().st_size > 0
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    keys = state["state_dict"].keys()
    assert any(k.startswith("learned.lr/") for k in keys) == ("metasgd" in recipe or "mamlpp" in recipe)
    assert any(k.startswith("inner_modules.transform.") for k in keys) == ("metacurvature" in recipe)


def test_validate_and_test_from_a_checkpoint_reproduce_the_fit_results(tmp_path):
    cli("fit", *SINE, f"hydra.run.dir={tmp_path / 'fit'}")
    fitted = last_metrics(tmp_path / "fit")
    checkpoint = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    cli("test", *SINE, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'test'}")
    cli("validate", *SINE, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'validate'}")
    tested, validated = last_metrics(tmp_path / "test"), last_metrics(tmp_path / "validate")
    for key in ("test/loss_pre", "test/loss_post", "test/loss_post_ci95"):
        assert tested[key] == pytest.approx(fitted[key], rel=1e-6)
    assert validated["val/loss_post"] == pytest.approx(fitted["val/loss_post"], rel=1e-6)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    # Meta-SGD (learned rates) with Adam (optimizer state) and a step schedule, 4 meta-steps, checkpoint every 2
    common = ["--config", "metasgd_sinusoid.yaml", *TINY, "trainer.max_steps=4", "scheduler=step",
              "scheduler.step_size=3", "test_after_fit=false"]
    cli("fit", *common, f"hydra.run.dir={tmp_path / 'straight'}")
    crashed = tmp_path / "crashed"
    crash = ["+callbacks.crash._target_=cli_helpers.CrashAt", "+callbacks.crash.step=3"]
    cli_error("fit", *common, *crash, f"hydra.run.dir={crashed}")
    checkpoint = crashed / "checkpoints" / "last.ckpt"
    saved = checkpoint.read_bytes()
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2
    # a run that fails before training leaves the checkpoints as they were
    cli_error("fit", *common, "model=conv4", "ckpt_path=last", f"hydra.run.dir={crashed}")
    assert checkpoint.read_bytes() == saved
    cli("fit", *common, "ckpt_path=last", f"hydra.run.dir={crashed}")
    # the resumed run logs beside the first part, which keeps its metrics
    assert sorted(p.name for p in (crashed / "logs").iterdir()) == ["version_0", "version_1"]

    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    resumed = torch.load(checkpoint, weights_only=False)
    assert straight["global_step"] == resumed["global_step"] == 4
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for a, b in zip(straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert straight["lr_schedulers"][0]["last_epoch"] == resumed["lr_schedulers"][0]["last_epoch"] == 4


def test_a_sweep_writes_one_run_folder_per_job(tmp_path):
    cli("fit", "-m", *SINE, "inner.lr=0.01,0.02", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    assert (tmp_path / "sweep" / "multirun.yaml").exists()
    results = set()
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").exists() and (job / "learning_curve.png").exists()
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        results.add(last_metrics(job)["test/loss_post"])
        assert "inner.lr=" in overrides and "seed=" in overrides
    assert len(results) == 4  # each job ran its own configuration


@pytest.mark.slow
@pytest.mark.skipif(not metaloop.cli._installed("hydra_plugins.hydra_joblib_launcher"),
                    reason="needs hydra-joblib-launcher (pip install 'metaloop[launchers]')")
def test_a_sweep_with_the_joblib_launcher(tmp_path):
    cli("fit", "-m", *SINE, "launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    for job in ("0", "1"):
        assert math.isfinite(last_metrics(tmp_path / "sweep" / job)["test/loss_post"])


@pytest.mark.slow
def test_ddp_through_the_command_line(tmp_path):
    """Lightning's DDP launcher re-runs the process with Hydra's arguments; the second rank must compose the same run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        [sys.executable, "-m", "metaloop.cli", "fit", *SINE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "task.num_val_tasks=4", "task.num_test_tasks=4", f"hydra.run.dir={tmp_path / 'ddp'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = last_metrics(tmp_path / "ddp")
    assert math.isfinite(metrics["test/loss_post"])
    assert torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


# -- bad input: one clear message, before any training ----------------------------------
def test_unknown_recipe_lists_the_recipes():
    message = cli_error("fit", "--config", "mmaml_omniglot.yaml")
    assert "unknown recipe 'mmaml_omniglot.yaml'" in message
    assert all(name in message for name in RECIPES)
    assert not Path("outputs").exists()


def test_unknown_command_and_missing_config_value(capsys):
    main([])
    assert capsys.readouterr().out.startswith("usage: metaloop recipes | {fit,validate,test}")
    assert "unknown command 'train'" in cli_error("train")
    assert "--config needs a recipe name" in cli_error("fit", "--config")


def test_unknown_option_shows_hydras_message_with_the_groups_options():
    message = cli_error("fit", *SINE, "model=resnet")
    assert "Could not find 'model/resnet'; Available options in 'model': " in message
    assert "conv4" in message and "mlp" in message
    assert len(message.splitlines()) == 1
    assert "Could not override 'inner.stepz'. To append to your config use +inner.stepz=3" in cli_error("fit", *SINE, "inner.stepz=3")


@pytest.mark.parametrize("overrides,message", [
    (["--config", "maml_omniglot.yaml", "task=sinusoid"], "Conv4 cannot run on the task's support inputs of shape"),
    (["--config", "maml_sinusoid.yaml", "task=omniglot"], "MLP cannot run on the task's support inputs of shape (50, 1, 28, 28)"),
    (["--config", "maml_sinusoid.yaml", "model=conv4"], "out_features=None: Conv4 is a classifier"),
    (["--config", "maml_sinusoid.yaml", "learnable=betas"], "learnable names 'betas', which is not a hyperparameter"),
    (["--config", "maml_omniglot.yaml", "task.full=true", "task.root=/nonexistent/omniglot"],
     "Omniglot file /nonexistent/omniglot/images_background.zip not found"),
    (["--config", "maml_omniglot.yaml", "task.n_ways=500"], "n_ways=500 exceeds the"),
    (["--config", "maml_sinusoid.yaml", "task=custom"], "Missing mandatory value: source (at task.source)"),
])
def test_incompatible_choices_and_missing_data_fail_before_training(overrides, message, tmp_path):
    error = cli_error("fit", *overrides, *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert message in error
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "logs").exists()


def test_missing_launcher_plugin_names_the_package(monkeypatch):
    monkeypatch.setitem(metaloop.cli._LAUNCHER_PLUGINS, "joblib", ("hydra_plugins.not_installed", "hydra-joblib-launcher"))
    message = cli_error("fit", *SINE, "-m", "launcher=joblib", "seed=0,1")
    assert "launcher=joblib needs the Hydra plugin hydra-joblib-launcher" in message and "metaloop[launchers]" in message


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None,
                    reason="tensorboard is installed")
def test_tensorboard_logger_without_tensorboard_says_what_to_install(tmp_path):
    message = cli_error("fit", *SINE, "logger=tensorboard", f"hydra.run.dir={tmp_path / 'run'}")
    assert "metaloop[tensorboard]" in message and "logger=csv" in message


def test_config_folder_override_and_its_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("METALOOP_CONFIG_DIR", str(tmp_path / "absent"))
    assert "set METALOOP_CONFIG_DIR to the folder" in cli_error("fit", *SINE)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("METALOOP_CONFIG_DIR", str(tmp_path / "empty"))
    assert "holds no config.yaml" in cli_error("fit", *SINE)
    monkeypatch.setenv("METALOOP_CONFIG_DIR", str(Path(metaloop.__file__).resolve().parents[1] / "configs"))
    assert config_dir() == Path(os.environ["METALOOP_CONFIG_DIR"]).resolve()


def test_a_recipe_given_as_a_path(tmp_path):
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text("# my experiment\ndefaults:\n  - maml_sinusoid\n  - _self_\ninner:\n  lr: 0.02\n")
    cli("fit", "--config", str(recipe), *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert "lr: 0.02" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()



GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("trainer", "logger", "launcher", "scheduler", "outer_optim", "task", "model")
    for p in sorted((Path(metaloop.__file__).resolve().parents[1] / "configs" / group).glob("*.yaml"))
]


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_option_composes_with_a_recipe(group, option, capsys):
    plugin = metaloop.cli._LAUNCHER_PLUGINS.get(option) if group == "launcher" else None
    if plugin and not metaloop.cli._installed(plugin[0]):
        pytest.skip(f"needs {plugin[1]}")
    extra = ["task.source=metaloop.tasks.SinusoidTasks"] if option == "custom" else []
    main(["fit", "--config", "maml_sinusoid.yaml", f"{group}={option}", *extra, "--cfg", "job"])
    out = capsys.readouterr().out
    assert "module:" in out and "_target_: metaloop.algorithms.MetaLightningModule" in out
    assert not Path("outputs").exists()
