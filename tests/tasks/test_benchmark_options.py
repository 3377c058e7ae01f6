"""The new ``task=`` options (mini_imagenet, tiered_imagenet, cifarfs, fc100) and ``model=`` options (cnn4, resnet12, wrn28) compose and train.

Each runs ``metaloop fit`` for one meta-step (with validation and test) on generated files of the
benchmark's published format (``scripts/fewshot_data.py``).
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import metaloop
from metaloop.cli import config_dir, main

CHECKOUT = Path(metaloop.__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fewshot_data", CHECKOUT / "scripts" / "fewshot_data.py")
fewshot_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fewshot_data)

TASKS = {"mini_imagenet": "mini-imagenet", "tiered_imagenet": "tiered-imagenet", "cifarfs": "cifarfs", "fc100": "fc100"}
FINE = {"cub200": (140, 30, 30), "dtd": (33, 7, 7), "fgvc_aircraft": (70, 15, 15), "vgg_flowers": (71, 15, 16)}
ONE_STEP = [
    "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.log_every_n_steps=1",
    "task.meta_batch_size=2", "task.eval_meta_batch_size=2", "task.num_val_tasks=2", "task.num_test_tasks=2",
    "task.k_queries=2", "inner.eval_steps=1", "~callbacks.progress_bar", "~callbacks.learning_curve",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fewshot")
    for write in fewshot_data.WRITERS.values():
        write(root, (6, 5, 5), 16)  # 16 = k_shots + the default k_queries
    return root


def test_each_new_option_exists():
    for group, options in {"task": [*TASKS, *FINE], "model": ["cnn4", "resnet12", "wrn28"]}.items():
        for option in options:
            assert (config_dir() / group / f"{option}.yaml").exists()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_option_builds_its_benchmark_sampler(task, files):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"task={task}", "model=cnn4", f"task.root={files}"])
    datamodule = instantiate(cfg.task.datamodule)
    sampler = datamodule.tasks
    assert [sampler.num_classes(s) for s in ("train", "val", "test")] == [6, 5, 5]
    size = 84 if "imagenet" in task else 32
    task_batch = sampler("test", torch.Generator().manual_seed(0))
    assert task_batch.support_x.shape == (5, 3, size, size) and task_batch.query_x.shape == (75, 3, size, size)
    model = instantiate(cfg.model)
    assert model(task_batch.support_x).shape == (5, 5)


@pytest.fixture(scope="module")
def fine_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fine")
    for write in fewshot_data.FINE_GRAINED.values():
        write(root, 2)
    return root


@pytest.mark.parametrize("task", sorted(FINE))
def test_fine_grained_task_option_builds_its_sampler_and_trains_one_step(task, fine_files, tmp_path, monkeypatch):
    small = [f"task.root={fine_files}", "task.k_queries=1", "task.image_size=32"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"task={task}", "model=cnn4", *small])
    sampler = instantiate(cfg.task.datamodule).tasks
    assert tuple(sampler.num_classes(s) for s in ("train", "val", "test")) == FINE[task]
    assert sampler("val", torch.Generator().manual_seed(0)).support_x.shape == (5, 3, 32, 32)
    if task == "dtd":  # one of them through a whole fit
        monkeypatch.chdir(tmp_path)
        metrics = run_one_step(tmp_path, f"task={task}", "model=cnn4", *small)
        assert math.isfinite(metrics["train/loss"])


def run_one_step(tmp_path: Path, *overrides: str) -> dict[str, float]:
    run = tmp_path / "run"
    try:
        main(["fit", *ONE_STEP, *overrides, f"hydra.run.dir={run}"])  # overrides last: they win
    except SystemExit as exit:
        pytest.fail(f"metaloop fit {' '.join(overrides)} exited with {exit.code!r}")
    values: dict[str, float] = {}
    with open(next((run / "logs").glob("version_*/metrics.csv"))) as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_option_trains_one_step_with_cnn4(task, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = run_one_step(tmp_path, f"task={task}", "model=cnn4", f"task.root={files}")
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["test/acc_post"] <= 1.0


# small images keep these quick on CPUs: WRN-28-10 pools adaptively; ResNet-12 keeps its 2x2 maps (4 x 640 features)
@pytest.mark.slow
@pytest.mark.parametrize("model, extra", [
    ("resnet12", ["task.image_size=32", "model.avg_pool=false", "model.hidden_size=2560"]),
    ("wrn28", ["task.image_size=16"]),
])
def test_each_model_option_trains_one_step_on_mini_imagenet(model, extra, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = run_one_step(tmp_path, "task=mini_imagenet", f"model={model}", f"task.root={files}", "task.n_ways=2",
                           "inner.first_order=true", "task.k_queries=1", *extra)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["test/loss_post"])
