"""``launcher=submitit_slurm`` on a real single-node SLURM cluster on 127.0.0.1 (``scripts/slurm_cluster.sh``).

The slow tests install Debian's SLURM packages when they are missing (CI runs as root), start
munged, slurmctld and slurmd with a slurm.conf of their own, run the README's plain sweep commands
(no launcher overrides), and stop the daemons. The fast tests check what the launcher asks SLURM for
and how it reads the queue.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import TINY
from hydra import compose, initialize_config_dir

import metaloop.cli
from metaloop.cli import config_dir
from metaloop.cli.launch import slurm_cpus_per_task, slurm_gpus_per_node
from metaloop.cli.slurm import QueuedJob, read_queue, unrunnable

ROOT = Path(metaloop.__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
SWEEP_TIMEOUT_S = 240  # one sweep of two tiny jobs takes 15-30 s on 2 busy cores

needs_submitit = pytest.mark.skipif(
    not metaloop.cli._installed("hydra_plugins.hydra_submitit_launcher"), reason="needs hydra-submitit-launcher"
)


# -- what the launcher asks for, and how it reads the queue (fast) ------------------------------
def _launcher(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["task=sinusoid", "model=mlp", "launcher=submitit_slurm", *overrides],
                      return_hydra_config=True)
    return {k: cfg.hydra.launcher[k] for k in ("cpus_per_task", "gpus_per_node", "tasks_per_node", "nodes")}


@needs_submitit
def test_a_cpu_job_asks_for_no_gpu_and_one_cpu_per_thread(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", f"{_fake_sinfo(tmp_path, 'debug*|(null)')}{os.pathsep}{os.environ['PATH']}")
    assert _launcher() == {"cpus_per_task": 1, "gpus_per_node": None, "tasks_per_node": 1, "nodes": 1}
    assert _launcher("threads=3")["cpus_per_task"] == 3
    # trainer=ddp is accelerator=auto: a partition without GPUs gets none, one task per rank
    assert _launcher("trainer=ddp", "trainer.devices=2") == {"cpus_per_task": 1, "gpus_per_node": None, "tasks_per_node": 2, "nodes": 1}
    assert _launcher("trainer=gpu")["gpus_per_node"] == 1


def _fake_sinfo(folder: Path, table: str) -> Path:
    """Returns a folder holding an ``sinfo`` that prints ``table`` (``partition|gres`` lines)."""
    (folder / "bin").mkdir(exist_ok=True)
    script = folder / "bin" / "sinfo"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' {' '.join(repr(line) for line in table.splitlines())}\n")
    script.chmod(0o755)
    return folder / "bin"


def test_gpus_per_node_follow_the_accelerator_and_for_auto_the_partition(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", f"{_fake_sinfo(tmp_path, 'cpu*|(null)' + chr(10) + 'gpu|gpu:a100:4(S:0-1)')}{os.pathsep}{os.environ['PATH']}")
    assert slurm_gpus_per_node("cpu", 4, None) is None and slurm_gpus_per_node("cpu", 4, "gpu") is None
    assert slurm_gpus_per_node("gpu", 4, None) == 4 and slurm_gpus_per_node("cuda", "2", "cpu") == 2
    assert slurm_gpus_per_node("auto", 4, None) is None  # the default partition (cpu*) has no GPUs
    assert slurm_gpus_per_node("auto", 4, "gpu") == 4
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert slurm_gpus_per_node("auto", 4, "gpu") == 4  # no sinfo to ask: GPUs, as trainer.devices says
    assert slurm_cpus_per_task(None, None) == 1 and slurm_cpus_per_task(2, 3) == 5


def test_the_queue_watch_knows_which_pending_reasons_never_clear():
    jobs = read_queue("7_[0-1%2]|PENDING|PartitionConfig|/s/.submitit/.submission_file_1.sh\n8|PENDING|Resources|/x.sh\n"
                      "9|PENDING|QOSMaxCpuPerJobLimit|/y.sh\n10|RUNNING|None|/z.sh\nnot a line\n")
    assert jobs[0] == QueuedJob("7_[0-1%2]", "PENDING", "PartitionConfig", "/s/.submitit/.submission_file_1.sh")
    assert [unrunnable(j) for j in jobs] == [True, False, True, False]


# -- a real single-node cluster (slow) ----------------------------------------------------------
def _install() -> None:
    """Installs SLURM and munge when missing; fails in CI (CI=true), skips elsewhere, if that cannot be done."""
    problem = None
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        problem = "SLURM is not installed and installing it needs root"
    else:
        try:
            done = subprocess.run(["bash", str(CLUSTER), "install"], capture_output=True, text=True, timeout=600)
            problem = None if done.returncode == 0 else done.stderr.strip()[-2000:]
        except subprocess.TimeoutExpired:
            problem = "apt-get took longer than 10 minutes"
    if problem is None and os.geteuid() != 0:
        problem = "slurmd runs jobs as root here; run the tests as root"
    if problem is not None:
        message = f"no SLURM cluster for the tests: {problem} (bash scripts/slurm_cluster.sh install)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def _cluster(**settings: str) -> Iterator[dict[str, str]]:
    """Yields the environment for the commands of a cluster started in a fresh folder (``settings``: the script's variables)."""
    folder = Path(tempfile.mkdtemp(prefix="metaloop-slurm-"))  # short: munge's socket path must fit 108 bytes
    env = {**os.environ, **settings}
    started = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, f"the SLURM cluster did not start: {started.stderr[-3000:]}"
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "cli"), *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        yield {**env, "SLURM_CONF": str(folder / "slurm.conf"), "PATH": f"{folder / 'bin'}{os.pathsep}{env['PATH']}",
               "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    finally:
        stopped = subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, f"the SLURM cluster did not stop: {stopped.stderr[-3000:]}"
        for pidfile in ("slurmctld.pid", "slurmd.pid", "munge/munged.pid"):
            with contextlib.suppress(FileNotFoundError, ValueError):
                pid = int((folder / pidfile).read_text())
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm() -> Iterator[dict[str, str]]:
    """The environment (SLURM_CONF, PATH with the sacct stand-in, PYTHONPATH) of a cluster that lives for the session."""
    if not metaloop.cli._installed("hydra_plugins.hydra_submitit_launcher"):
        pytest.skip("needs hydra-submitit-launcher (pip install 'metaloop[launchers]')")
    _install()
    with _cluster() as env:
        yield env


def _node_cpus(env: dict[str, str]) -> int:
    return int(subprocess.run(["sinfo", "-h", "-o", "%c"], env=env, capture_output=True, text=True, check=True).stdout.split()[0])


def _sweep(env: dict[str, str], sweep: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Returns the finished ``metaloop fit -m --config maml_sinusoid.yaml launcher=submitit_slurm ...`` and its seconds."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "metaloop", "fit", "-m", "--config", "maml_sinusoid.yaml", "launcher=submitit_slurm",
         *TINY, *overrides, f"hydra.sweep.dir={sweep}"],
        cwd=sweep.parent, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S,
    )
    return done, time.monotonic() - start


def _rows(sweep: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(sweep / "sweep_results.csv")))


def _batch_script(sweep: Path) -> str:
    return next((sweep / ".submitit").rglob("*_submission.sh")).read_text()


@pytest.mark.slow
def test_the_plain_sweep_command_runs_on_a_cpu_only_cluster(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    done, _ = _sweep(slurm, sweep, "seed=0,1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(r["overrides"], r["status"]) for r in _rows(sweep)] == [("seed=0", "ok"), ("seed=1", "ok")]
    assert all((sweep / job / "results.json").is_file() for job in ("0", "1"))
    script = _batch_script(sweep)
    assert "#SBATCH --cpus-per-task=1" in script and "gpu" not in script


@pytest.mark.slow
def test_a_sweep_of_two_rank_ddp_jobs_runs_one_slurm_task_per_rank(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    done, _ = _sweep(slurm, sweep, "trainer=ddp", "trainer.devices=2", "task.num_val_tasks=4", "task.num_test_tasks=4", "seed=0,1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["status"] for r in _rows(sweep)] == ["ok", "ok"]
    assert "#SBATCH --ntasks-per-node=2" in _batch_script(sweep) and "gpu" not in _batch_script(sweep)
    for job in ("0", "1"):
        log = (sweep / job / "cli.log").read_text()
        assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log


@pytest.mark.slow
def test_a_job_that_crashes_is_marked_failed_and_the_sweep_exits_non_zero(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    # job 0 crashes at its first meta-step; job 1 never reaches step 99
    done, _ = _sweep(slurm, sweep, "+callbacks.crash._target_=cli_helpers.CrashAt", "+callbacks.crash.step=1,99")
    assert done.returncode != 0
    assert "1 of 2 sweep jobs did not finish (jobs 0)" in done.stderr
    rows = _rows(sweep)
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "simulated crash at meta-step 1" in rows[0]["error"]


@pytest.mark.slow
def test_a_job_slurm_refuses_is_one_message_naming_the_request(slurm, tmp_path):
    cpus = _node_cpus(slurm)
    done, seconds = _sweep(slurm, tmp_path / "sweep", f"threads={cpus + 1}", "seed=0,1")
    assert done.returncode != 0 and seconds < 60
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("metaloop: error: SLURM refused the sweep's jobs (sbatch: error: Batch job submission failed:")
    assert f"hydra.launcher.cpus_per_task={cpus + 1} (from threads" in message


@pytest.mark.slow
def test_a_job_that_can_never_leave_the_queue_is_cancelled_with_its_reason(slurm, tmp_path):
    # a cluster without EnforcePartLimits queues a job asking for more CPUs than its node has (Reason=PartitionConfig)
    with _cluster(SLURM_ENFORCE_PART_LIMITS="NO") as env:
        cpus = _node_cpus(env)
        done, seconds = _sweep(env, tmp_path / "sweep", f"threads={cpus + 1}", "seed=0,1")
        queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T"], env=env, capture_output=True, text=True).stdout
    assert done.returncode != 0 and seconds < 120
    message = done.stderr.strip().splitlines()[-1]
    assert re.match(r"metaloop: error: SLURM can never run job \d+_", message) and "Reason=PartitionConfig" in message
    assert f"hydra.launcher.cpus_per_task={cpus + 1}" in message and "the sweep's jobs were cancelled" in message
    assert set(queue.split()) == {"CANCELLED"}


@pytest.mark.slow
def test_max_pending_min_bounds_the_wait_in_the_queue(slurm, tmp_path):
    # the jobs may start in an hour (Reason=BeginTime); the sweep waits 6 s for them
    done, seconds = _sweep(slurm, tmp_path / "sweep", "sweep.max_pending_min=0.1",
                           "+hydra.launcher.additional_parameters.begin=now+1hour", "seed=0,1")
    assert done.returncode != 0 and seconds < 120
    message = done.stderr.strip().splitlines()[-1]
    assert "Reason=BeginTime), longer than sweep.max_pending_min=0.1" in message and "the sweep's jobs were cancelled" in message
