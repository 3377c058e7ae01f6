"""What a ``metaloop fit`` run shows and leaves: each log line once, a meta-step progress bar, results.json, a loadable module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from cli_helpers import TINY
from hydra.utils import instantiate

from metaloop.lightning import MetaLightningModule, checkpoint_config
from metaloop.tasks import sample_task

WITH_PROGRESS_BAR = [o for o in TINY if "progress_bar" not in o]


@pytest.mark.slow
def test_a_fit_prints_each_line_once_counts_meta_steps_and_its_checkpoint_adapts_in_python(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        [sys.executable, "-m", "metaloop", "fit", "--config", "maml_omniglot.yaml", *WITH_PROGRESS_BAR, f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert console.count("GPU available") == 1, console[:2000]
    assert (run / "cli.log").read_text().count("GPU available") == 1
    assert "Epoch 0/-2" not in console and re.search(r"meta-step\s.*\b2/2\b", done.stdout), done.stdout[-2000:]
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    assert {"val/acc_post", "test/acc_post", "test/loss_post_ci95"} <= set(metrics)

    # train with the CLI, adapt in Python
    checkpoint = run / "checkpoints" / "last.ckpt"
    module = MetaLightningModule.load_from_checkpoint(checkpoint)
    cfg = checkpoint_config(checkpoint)
    task = sample_task(instantiate(cfg.task.datamodule).tasks, "test", cfg.seed, 0)
    fmodel = module.adapt((task.support_x, task.support_y), n_ways=5)
    logits = fmodel(task.query_x)
    assert logits.shape == (task.query_x.shape[0], 5) and torch.isfinite(logits).all()
    stored = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in stored.items())
