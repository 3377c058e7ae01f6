"""The Reptile, CAVIA and BOIL recipes: their headers, the overrides of a GPU report run, checkpoints, BOIL's frozen head."""

from __future__ import annotations

import math

import pytest
import torch
from cli_helpers import TINY, cli, cli_error, last_metrics
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metaloop.cli import UsageError, config_dir, recipe_dir, recipe_summaries
from metaloop.cli.schema import check_command_line
from metaloop.lightning import CaviaModule, MetaLightningModule, ReptileModule
from metaloop.tasks import sample_task

ALGORITHMS = ["reptile_omniglot", "reptile_sinusoid", "cavia_omniglot", "cavia_sinusoid", "boil_omniglot"]
# what the lead's GPU runs add (trainer=gpu only composes here: no GPU is needed to check and build the run)
GPU_RUN = ["trainer=gpu", "trainer.max_time=00:00:05:00", "task.meta_batch_size=3", "trainer.precision=bf16-mixed"]


def composed(recipe: str, overrides: list[str]):
    search = [config_dir(), recipe_dir()]
    searchpath = "hydra.searchpath=[" + ",".join(f"'file://{p}'" for p in search) + "]"
    with initialize_config_dir(config_dir=str(recipe_dir()), version_base="1.3"):
        return compose(recipe, overrides=[searchpath, *overrides])


def test_each_recipe_cites_its_paper_in_a_one_line_summary():
    summaries = recipe_summaries()
    assert "97.68" in summaries["reptile_omniglot"] and "89.43" in summaries["reptile_omniglot"]
    assert "Zintgraf" in summaries["cavia_sinusoid"] and "47.24" in summaries["cavia_omniglot"]
    assert "49.61" in summaries["boil_omniglot"]
    for recipe in ALGORITHMS:
        assert (recipe_dir() / f"{recipe}.yaml").read_text().count("#") > 8, recipe  # a header with the paper's settings


@pytest.mark.parametrize("recipe", ALGORITHMS)
def test_the_recipe_takes_the_overrides_of_a_gpu_report_run_and_builds_its_module(recipe):
    ways = ["task.n_ways=20"] if "omniglot" in recipe else []
    search = [config_dir(), recipe_dir()]
    check_command_line(recipe_dir(), recipe, ["command=fit", f"recipe={recipe}", *GPU_RUN, *ways], search, config_dir(),
                       False, UsageError)
    cfg = composed(recipe, [*GPU_RUN, *ways])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.max_time == "00:00:05:00"
    module = instantiate(cfg.module, _convert_="partial")
    expected = {"reptile": ReptileModule, "cavia": CaviaModule, "boil": MetaLightningModule}[recipe.split("_")[0]]
    assert type(module) is expected
    if ways:
        assert module.model.head.out_features == 20


def test_reptile_anneals_the_meta_step_over_the_run():
    cfg = composed("reptile_omniglot", ["trainer.max_steps=300"])
    scheduler = instantiate(cfg.scheduler)(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.outer_optim.lr))
    assert cfg.outer_optim.lr == 1.0 and scheduler.total_iters == 300 and scheduler.end_factor == 0.0
    assert tuple(cfg.inner_optim.betas) == (0.0, 0.999) and cfg.inner.steps == 5 and cfg.inner.eval_steps == 50


def test_boil_adapts_the_body_and_freezes_the_head():
    cfg = composed("boil_omniglot", [])
    torch.manual_seed(0)
    module = instantiate(cfg.module, _convert_="partial")
    task = sample_task(instantiate(cfg.task.datamodule.tasks), "train", 0, 0)
    adapted = module.adapt((task.support_x, task.support_y), steps=1)
    for name, param in module.model.named_parameters():
        moved = not torch.equal(adapted.weights[name], param)
        assert moved == name.startswith("features."), name
    assert cfg.inner.lr == 0.5


def test_a_head_that_does_not_adapt_refuses_other_ways_at_test_time():
    message = cli_error("test", "--config", "boil_omniglot.yaml", "ckpt_path=none", "task.datamodule.tasks.n_ways=20",
                        "task.num_test_tasks=2")
    assert "n_ways=20 differs from the head's 5 outputs" in message and "use n_ways=5" in message


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["reptile_omniglot", "cavia_sinusoid"])
def test_a_checkpoint_reloads_and_tests_to_the_same_numbers(recipe, tmp_path):
    fit_dir, short = tmp_path / "fit", [*TINY, "inner.eval_steps=5"]
    cli("fit", "--config", f"{recipe}.yaml", *short, f"hydra.run.dir={fit_dir}")
    checkpoint = fit_dir / "checkpoints" / "last.ckpt"
    cli("test", "--config", f"{recipe}.yaml", *short, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'test'}")
    fitted, tested = last_metrics(fit_dir), last_metrics(tmp_path / "test")
    for key in ("test/loss_pre", "test/loss_post", "test/loss_post_ci95"):
        assert tested[key] == pytest.approx(fitted[key], rel=1e-6), key
    module = MetaLightningModule.load_from_checkpoint(checkpoint)
    assert type(module) is (ReptileModule if "reptile" in recipe else CaviaModule)
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert saved.keys() == module.state_dict().keys()
    for key, value in module.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.slow
def test_cavia_sinusoid_logs_what_maml_sinusoid_logs(tmp_path):
    for recipe in ("maml_sinusoid", "cavia_sinusoid"):
        cli("fit", "--config", f"{recipe}.yaml", *TINY, f"hydra.run.dir={tmp_path / recipe}")
    maml, cavia = last_metrics(tmp_path / "maml_sinusoid"), last_metrics(tmp_path / "cavia_sinusoid")
    assert maml.keys() == cavia.keys()
    assert all(math.isfinite(v) for v in cavia.values())


@pytest.mark.slow
def test_reptile_tests_a_five_way_model_on_twenty_way_five_shot_tasks(tmp_path):
    cli("fit", "--config", "reptile_omniglot.yaml", *TINY, "inner.eval_steps=5", f"hydra.run.dir={tmp_path / 'fit'}")
    cli("test", "--config", "reptile_omniglot.yaml", *TINY, "inner.eval_steps=5",
        f"ckpt_path={tmp_path / 'fit' / 'checkpoints' / 'last.ckpt'}", "task.datamodule.tasks.n_ways=20",
        "task.datamodule.tasks.k_shots=5", f"hydra.run.dir={tmp_path / 'test'}")
    assert 0.0 <= last_metrics(tmp_path / "test")["test/acc_post"] <= 1.0


@pytest.mark.parametrize("recipe", sorted(p.stem for p in recipe_dir().glob("*.yaml")))
def test_every_recipe_module_takes_the_memory_format(recipe):
    # a top-level key that a module's config did not pass on would be silently ignored
    module = instantiate(composed(recipe, ["memory_format=contiguous"]).module, _convert_="partial")
    assert module.memory_format == "contiguous"
