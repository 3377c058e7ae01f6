"""Sweeps (``metaloop.cli.sweep``): one process per job, DDP jobs in a sweep, the results table, failures, Optuna."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, cli, cli_error

import metaloop.cli
from metaloop.cli.sweep import RECORD, read_records, results_table, write_results

SINE = ["--config", "maml_sinusoid.yaml", *TINY]
DISTRIBUTED_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def _record(job: int, overrides: list[str], status: str = "ok", **metrics: float) -> dict:
    return {"job": job, "overrides": overrides, "folder": f"sweep/{job}", "started": 10.0 + job, "ended": 20.0 + job,
            "wall_time_s": 1.5 + job, "status": status, "metrics": metrics}


def test_results_table_lists_every_job_with_the_overrides_that_differ_and_its_status(tmp_path):
    records = [
        _record(0, ["trainer=ddp", "seed=0"], **{"val/loss_post": 0.5, "val/loss_post_ci95": 0.1, "test/loss_post": 0.25}),
        _record(1, ["trainer=ddp", "seed=1"], status="failed"),
    ]
    records[1]["error"] = "exit code 1: boom"
    header, csv_rows, shown = results_table(records)
    assert header == ["job", "overrides", "val/loss_post", "test/loss_post", "wall time (s)", "status"]
    assert shown[1] == ["0", "seed=0", "0.5 ± 0.1", "0.25", "1.5", "ok"]
    assert shown[2] == ["1", "seed=1", "", "", "2.5", "failed"]
    csv_path, md_path = write_results(tmp_path, records)
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert float(rows[0]["val/loss_post_ci95"]) == 0.1 and rows[1]["error"] == "exit code 1: boom"
    assert md_path.read_text().splitlines()[2] == "| 0 | seed=0 | 0.5 ± 0.1 | 0.25 | 1.5 | ok |"
    # one job: its overrides are all there is to say about it
    assert results_table(records[:1])[2][1][1] == "trainer=ddp seed=0"


def test_records_of_an_earlier_sweep_in_the_same_folder_are_left_out(tmp_path):
    for job, started in ((0, 5.0), (1, 50.0)):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / RECORD).write_text(json.dumps({**_record(job, []), "started": started}))
    assert [r["job"] for r in read_records(tmp_path, since=10.0)] == [1]


def test_a_failed_job_is_marked_failed_the_sweep_goes_on_and_exits_non_zero(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # job 0 asks for a model that cannot run on sinusoid tasks; job 1 is fine
    message = cli_error("fit", "-m", *SINE, "model=mlp,conv4", f"hydra.sweep.dir={sweep}")
    assert "1 of 2 sweep jobs did not finish (jobs 1)" in message and "sweep_results.md" in message
    rows = list(csv.DictReader(open(sweep / "sweep_results.csv")))
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [("0", "model=mlp", "ok"), ("1", "model=conv4", "failed")]
    assert "out_features=None: Conv4 is a classifier" in rows[1]["error"]
    assert math.isfinite(float(rows[0]["test/loss_post"]))
    assert "sweep results" in capsys.readouterr().out


def test_with_continue_on_failure_off_the_jobs_after_a_failure_are_skipped(tmp_path):
    sweep = tmp_path / "sweep"
    cli_error("fit", "-m", *SINE, "model=conv4,mlp", "sweep.continue_on_failure=false", f"hydra.sweep.dir={sweep}")
    statuses = [r["status"] for r in read_records(sweep)]
    assert statuses == ["failed", "skipped"]
    assert not (sweep / "1" / "checkpoints").exists()


@pytest.mark.slow
def test_a_sweep_of_two_rank_ddp_jobs_runs_each_job_alone_and_leaves_no_distributed_state(tmp_path):
    """2 seeds x 2 CPU ranks (gloo) through the command line, in this process: the sweep must not become rank 0 itself."""
    sweep = tmp_path / "sweep"
    cli("fit", "-m", *SINE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "task.num_val_tasks=4",
        "task.num_test_tasks=4", "trainer.max_steps=3", "trainer.val_check_interval=3", "seed=0,1",
        f"hydra.sweep.dir={sweep}")
    assert not any(v in os.environ for v in DISTRIBUTED_VARIABLES)
    assert not torch.distributed.is_initialized()
    assert not Path("outputs").exists() and not Path("multirun").exists()
    rows = list(csv.DictReader(open(sweep / "sweep_results.csv")))
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [("0", "seed=0", "ok"), ("1", "seed=1", "ok")]
    assert rows[0]["test/loss_post"] != rows[1]["test/loss_post"]
    assert "| seed=0 |" in (sweep / "sweep_results.md").read_text()
    for job in ("0", "1"):
        state = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert state["global_step"] == 3
        # rank 0 writes the run folder: one log file, one learning curve, one metrics file
        assert sorted(p.name for p in (sweep / job).glob("*.log")) == ["cli.log"]
        assert len(list((sweep / job).rglob("metrics.csv"))) == 1 and (sweep / job / "learning_curve.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(not metaloop.cli._installed("hydra_plugins.hydra_joblib_launcher"),
                    reason="needs hydra-joblib-launcher (pip install 'metaloop[launchers]')")
def test_the_parallel_launcher_runs_two_jobs_at_once_each_in_its_own_slot(tmp_path):
    sweep = tmp_path / "sweep"
    cli("fit", "-m", *SINE, "launcher=parallel", "sweep.jobs_at_once=2", "trainer.max_steps=4", "seed=0,1",
        f"hydra.sweep.dir={sweep}")
    first, second = read_records(sweep)
    assert first["status"] == second["status"] == "ok"
    assert {first["slot"], second["slot"]} == {0, 1} and first["master_port"] != second["master_port"]
    # the two jobs' processes overlapped in time
    assert first["started"] < second["ended"] and second["started"] < first["ended"]


@pytest.mark.slow
@pytest.mark.skipif(not metaloop.cli._installed("hydra_plugins.hydra_optuna_sweeper"),
                    reason="needs hydra-optuna-sweeper (pip install 'metaloop[sweepers]')")
def test_an_optuna_search_of_three_trials_minimises_the_jobs_validation_loss(tmp_path):
    sweep = tmp_path / "sweep"
    cli("fit", "-m", *SINE, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.direction=minimize", "optimized_metric=val/loss_post", "inner.lr=interval(0.001,0.1)",
        "inner.steps=range(1,3)", "hydra.sweeper.sampler.seed=0", f"hydra.sweep.dir={sweep}")
    records = read_records(sweep)
    assert [r["status"] for r in records] == ["ok"] * 3
    assert len({r["metrics"]["val/loss_post"] for r in records}) == 3
    best = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {min(r['metrics']['val/loss_post'] for r in records)}" in best


def test_a_missing_sweeper_plugin_names_the_extra(monkeypatch):
    monkeypatch.setitem(metaloop.cli._SWEEPER_PLUGINS, "optuna", ("hydra_plugins.not_installed", "hydra-optuna-sweeper", "metaloop[sweepers]"))
    message = cli_error("fit", *SINE, "-m", "hydra/sweeper=optuna")
    assert "hydra/sweeper=optuna needs the Hydra plugin hydra-optuna-sweeper" in message and "metaloop[sweepers]" in message
