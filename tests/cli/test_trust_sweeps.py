"""Sweeps you can trust (issue 19, B8, B11, C3): a failed job or trial is failed and the sweep goes on, a misnamed
optimised metric is refused before the first job, and a signal to a sweep stops its jobs, which save, and leaves none."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, cli_error

import metaloop.cli
from metaloop.cli.sweep import read_records

SINE = ["--config", "maml_sinusoid.yaml", *TINY]
# finite training; an evaluation inner loop of 200 steps at lr 0.5 diverges (NaN loss), 1 step does not
DIVERGES = {1: False, 200: True}
OPTUNA = pytest.mark.skipif(not metaloop.cli._installed("hydra_plugins.hydra_optuna_sweeper"),
                            reason="needs hydra-optuna-sweeper (pip install 'metaloop[sweepers]')")
JOBLIB = pytest.mark.skipif(not metaloop.cli._installed("hydra_plugins.hydra_joblib_launcher"),
                            reason="needs hydra-joblib-launcher (pip install 'metaloop[launchers]')")


def _rows(sweep: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(sweep / "sweep_results.csv")))


# -- B8: a diverging evaluation is a failed job --------------------------------------------------------
def test_a_job_whose_evaluation_diverges_is_failed_with_its_cause(tmp_path):
    sweep = tmp_path / "sweep"
    message = cli_error("fit", "-m", *SINE, "inner.lr=0.5", "inner.eval_steps=1,200", f"hydra.sweep.dir={sweep}")
    assert "1 of 2 sweep jobs did not finish (jobs 1)" in message
    rows = _rows(sweep)
    assert [(r["overrides"], r["status"]) for r in rows] == [("inner.eval_steps=1", "ok"), ("inner.eval_steps=200", "failed")]
    assert "val/loss_post=nan" in rows[1]["error"] and "inner.eval_steps=200" in rows[1]["error"]
    assert rows[1]["val/loss_post"] == "" and float(rows[0]["val/loss_post"]) > 0


# -- B11: Optuna goes on after a failed trial; a misnamed metric is refused first ------------------------
@pytest.mark.slow
@OPTUNA
def test_an_optuna_search_goes_on_after_a_failed_trial_and_lists_it_failed(tmp_path):
    sweep = tmp_path / "sweep"
    # TPE's start-up trials with seed 0 draw inner.eval_steps 200, 1, 200: the first trial fails
    message = cli_error(
        "fit", "-m", *SINE, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.seed=0", "hydra.sweeper.direction=minimize", "optimized_metric=val/loss_post",
        "inner.lr=0.5", "inner.eval_steps=choice(1,200)", f"hydra.sweep.dir={sweep}",
    )
    records = read_records(sweep)
    assert len(records) == 3, message
    steps = [next(int(o.split("=")[1]) for o in r["overrides"] if o.startswith("inner.eval_steps=")) for r in records]
    assert steps == [200, 1, 200]
    assert [r["status"] for r in records] == ["failed" if DIVERGES[s] else "ok" for s in steps]
    assert "2 of 3 sweep jobs did not finish (jobs 0, 2)" in message
    best = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {records[1]['metrics']['val/loss_post']}" in best
    assert [r["status"] for r in _rows(sweep)] == ["failed", "ok", "failed"]


@pytest.mark.parametrize("recipe,override,expected", [
    ("maml_sinusoid.yaml", "optimized_metric=val/los_post",
     "optimized_metric=val/los_post is not a metric this sweep's jobs report; use one of val/loss_pre, val/loss_post, "
     "test/loss_pre, test/loss_post"),
    ("maml_sinusoid.yaml", "optimized_metric=val/loss_post task.num_val_tasks=0",
     "use one of test/loss_pre, test/loss_post (or a name with _ci95); validation metrics need task.num_val_tasks > 0"),
    ("protonet_omniglot.yaml", "optimized_metric=val/acc_pre",
     "use one of val/loss_post, val/acc_post, test/loss_post, test/acc_post"),
])
def test_a_misnamed_optimized_metric_is_refused_before_the_first_job(recipe, override, expected, tmp_path):
    sweep = tmp_path / "sweep"
    message = cli_error("fit", "-m", "--config", recipe, *TINY, "seed=0,1", *override.split(), f"hydra.sweep.dir={sweep}")
    assert expected in message and len(message.splitlines()) == 1
    assert not sweep.exists()


# -- C3: a signal to a sweep reaches its jobs -------------------------------------------------------------
def _tagged(tag: str) -> list[int]:
    """Returns the ids of the live processes whose environment holds ``METALOOP_TEST_TAG=tag``: the sweep's and its jobs'."""
    marker, found = f"METALOOP_TEST_TAG={tag}".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the sweep's processes through /proc")
@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=JOBLIB)])
def test_sigterm_to_a_sweep_stops_its_jobs_which_save_and_leaves_no_process(launcher, tmp_path):
    sweep, tag = tmp_path / "sweep", uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METALOOP_TEST_TAG": tag}
    log = open(tmp_path / "sweep.err", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "metaloop.cli", "fit", "-m", *SINE, "trainer.max_steps=1000000",
         "trainer.val_check_interval=20", f"launcher={launcher}", "seed=0,1,2", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        deadline = time.monotonic() + 240
        # the running jobs are training and have saved once (joblib runs jobs 0 and 1 at once; a job stopped before
        # its first meta-step has nothing to save, and says so)
        running = ("0", "1") if launcher == "joblib" else ("0",)
        while not all((sweep / job / "checkpoints" / "last.ckpt").exists() for job in running):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.err").read_text()[-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=180)
        for _ in range(50):  # a launcher's idle workers may take a moment to notice that the sweep ended
            if not _tagged(tag):
                break
            time.sleep(0.2)
        assert _tagged(tag) == []
    finally:
        for pid in _tagged(tag):  # only processes this test started carry its tag
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
        log.close()
    errors = (tmp_path / "sweep.err").read_text()
    assert code == 128 + signal.SIGTERM, errors[-3000:]
    assert "the sweep was stopped by SIGTERM" in errors
    statuses = {r["job"]: r["status"] for r in read_records(sweep)}
    assert statuses[0] == "interrupted" and statuses[2] == "skipped"
    assert statuses[1] == ("interrupted" if launcher == "joblib" else "skipped")  # joblib runs 2 at once
    for job, status in statuses.items():
        if status == "interrupted":  # each stopped job saved the step it reached
            state = torch.load(sweep / str(job) / "checkpoints" / "last.ckpt", weights_only=True)
            assert state["global_step"] > 0
            assert f"stopped by SIGTERM at meta-step {state['global_step']}" in errors
    assert [r["status"] for r in _rows(sweep)] == [statuses[0], statuses[1], statuses[2]]
