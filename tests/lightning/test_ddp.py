"""Under DDP (2 CPU processes, gloo) one meta-step equals the single-process step on the union of both ranks' tasks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from torch.utils.data import DataLoader

import ddp_worker

WORKER = Path(ddp_worker.__file__)


@pytest.mark.slow
def test_ddp_meta_step_equals_single_process_step_on_the_union_of_tasks(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        [sys.executable, str(WORKER), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    distributed = torch.load(out, weights_only=True)
    assert sorted(distributed) == sorted(ddp_worker.CASES)
    for case in ddp_worker.CASES:
        module = ddp_worker.build(case)
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        lightning.Trainer(
            accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        ).fit(module, train_dataloaders=DataLoader([ddp_worker.union_batch()], batch_size=None))
        single = module.state_dict()
        assert set(single) == set(distributed[case])
        moved = 0
        for key, value in single.items():
            torch.testing.assert_close(distributed[case][key], value, rtol=0, atol=1e-6, msg=f"{case}: {key}")
            moved += not torch.equal(value, initial[key])
        # every weight, learned rate and transform moved, so the comparison is not vacuous
        assert moved == len(single), case
