"""recipes/mamlpp_omniglot.yaml: each MAML++ component is one override away, bad values are refused in one line,
and the run the GPU report makes (20-way training, a test of other ways and shots from the checkpoint) works."""

from __future__ import annotations

import math

import pytest
import torch
from cli_helpers import TINY, cli, cli_error, last_metrics
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metaloop.cli import config_dir, main
from metaloop.lightning import MAMLPlusPlus

SMALL = ["model.hidden=8", "inner.steps=2", "inner.eval_steps=2"]


def recipe_module(overrides: list[str]) -> MAMLPlusPlus:
    """Returns the module recipes/mamlpp_omniglot.yaml builds with ``overrides``."""
    recipes = config_dir().parent / "recipes"
    with initialize_config_dir(config_dir=str(recipes), version_base="1.3"):
        cfg = compose("mamlpp_omniglot", overrides=[f"hydra.searchpath=['file://{config_dir()}']", *SMALL, *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.module, _convert_="partial")


def test_the_recipe_turns_on_all_five_components():
    module = recipe_module([])
    norm = module.model.blocks[0]["norm"]
    assert module.lslr and sorted(module.learned)[0] == "lr/blocks/0/conv" and module.learned["lr/head"].shape == (2,)
    assert module.msl and module.loss_weights() == pytest.approx([0.5, 0.5])
    assert norm.weight.shape == (3, 8) and norm.running_mean.shape == (3, 8)
    assert module.is_first_order() and module.first_order_steps == 5
    assert isinstance(module.scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)),
                      torch.optim.lr_scheduler.CosineAnnealingLR)


@pytest.mark.parametrize("override,check", [
    ("module.lslr=false", lambda m: len(m.learned) == 0),
    ("module.msl=false", lambda m: m.loss_weights() == [0.0, 1.0]),
    ("model.per_step_weights=false", lambda m: m.model.blocks[0]["norm"].weight.shape == (8,)),
    ("model.per_step_stats=false", lambda m: not list(m.model.buffers())),
    ("module.first_order_steps=0", lambda m: not m.is_first_order()),
    ("~scheduler", lambda m: m.scheduler is None),
])
def test_each_component_is_one_override_away(override, check):
    assert check(recipe_module([override]))


@pytest.mark.parametrize("override,message", [
    ("module.msl=maybe", "module.msl='maybe' is not accepted"),
    ("module.msl_anneal_steps=-5", "module.msl_anneal_steps=-5 is not accepted"),
    ("module.first_order_steps=1.5", "module.first_order_steps=1.5 is not accepted"),
    ("model.eval_stats=mean", "model.eval_stats='mean' is not accepted (not one of the choices); use one of running, batch"),
    ("model.per_step_stats=1", "model.per_step_stats=1 is not accepted"),
])
def test_bad_values_are_refused_in_one_line_before_any_file(override, message, tmp_path):
    error = cli_error("fit", "--config", "mamlpp_omniglot.yaml", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert message in error and "\n" not in error
    assert not (tmp_path / "run").exists()


def test_the_gpu_overrides_compose(capsys):
    main(["fit", "--config", "mamlpp_omniglot.yaml", "trainer=gpu", "trainer.max_time=00:00:05:00", "task.n_ways=20",
          "task.meta_batch_size=8", "--cfg", "job"])
    out = capsys.readouterr().out
    assert "_target_: metaloop.algorithms.MAMLPlusPlus" in out and "max_time: 00:00:05:00" in out


@pytest.mark.slow
def test_a_20_way_run_and_a_test_of_other_ways_and_shots_from_its_checkpoint(tmp_path):
    common = ["--config", "mamlpp_omniglot.yaml", *TINY, *SMALL, "task.k_queries=2"]
    cli("fit", *common, "task.n_ways=20", "trainer.max_time=00:00:05:00", f"hydra.run.dir={tmp_path / 'fit'}")
    fitted = last_metrics(tmp_path / "fit")
    for key in ("train/loss", "val/acc_post", "test/acc_post", "test/acc_post_ci95", "train/msl_final_weight"):
        assert math.isfinite(fitted[key]), key
    checkpoint = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    cli("test", *common, "task.n_ways=20", f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'same'}")
    assert last_metrics(tmp_path / "same")["test/acc_post"] == pytest.approx(fitted["test/acc_post"], rel=1e-6)
    for ways, shots in ((20, 5), (5, 1)):
        run = tmp_path / f"test_{ways}_{shots}"
        cli("test", *common, "task.n_ways=20", f"ckpt_path={checkpoint}", f"task.datamodule.tasks.n_ways={ways}",
            f"task.datamodule.tasks.k_shots={shots}", f"hydra.run.dir={run}")
        tested = last_metrics(run)
        assert 0.0 <= tested["test/acc_post"] <= 1.0 and math.isfinite(tested["test/acc_post_ci95"])
