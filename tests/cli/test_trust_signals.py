"""DDP runs end together (``metaloop.lightning.distributed``): SIGTERM to every rank saves the step reached and every
rank exits 143; a rank that fails or hangs ends the run within the collective timeout, in one line naming the rank.

The runs are real: two CPU ranks (gloo) of ``metaloop fit``, either launched by Lightning (rank 0 starts rank 1) or
started side by side as torchrun and SLURM do. Every wait is bounded; a run that hangs is killed and fails its test.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, cli_error

HERE = Path(__file__).parent
SINE = ["--config", "maml_sinusoid.yaml", *TINY]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "task.num_val_tasks=4", "task.num_test_tasks=4"]
LONG = ["trainer.max_steps=150", "trainer.val_check_interval=75"]  # far more steps than a test waits for
TRACEBACK = re.compile(r"Traceback|Connection closed by peer|gloo")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    for name in {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT"} - set(extra):
        env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(run: Path, overrides: list[str], launch: str) -> list[subprocess.Popen]:
    """Starts ``metaloop fit`` on two ranks: one process that launches the other (``lightning``), or both (``external``)."""
    command = [sys.executable, "-m", "metaloop.cli", "fit", *SINE, *DDP, *overrides, f"hydra.run.dir={run}"]
    run.parent.mkdir(parents=True, exist_ok=True)
    if launch == "lightning":
        envs = [_env()]
    else:
        port = str(_free_port())
        envs = [
            _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(r), RANK=str(r))
            for r in (0, 1)
        ]
    return [
        subprocess.Popen(command, cwd=run.parent, env=env, stdout=subprocess.DEVNULL,
                         stderr=open(run.parent / f"{run.name}.rank{r}.err", "w"))
        for r, env in enumerate(envs)
    ]


def _wait(procs: list[subprocess.Popen], seconds: float) -> list[int]:
    """Returns the exit codes; kills the processes and fails the test if they run longer than ``seconds``."""
    deadline = time.monotonic() + seconds
    try:
        return [proc.wait(timeout=max(0.1, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the DDP run still runs {seconds:g} s later (a hang)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _marks(folder: Path) -> dict[int, tuple[int, int]]:
    """Returns each rank's (pid, meta-step) from :class:`signal_helpers.StepMarker`'s files."""
    marks = {}
    for rank in (0, 1):
        with_text = (folder / f"rank{rank}").read_text().split() if (folder / f"rank{rank}").is_file() else []
        if len(with_text) == 2:
            marks[rank] = (int(with_text[0]), int(with_text[1]))
    return marks


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def _stderr(run: Path) -> str:
    return "".join(p.read_text() for p in sorted(run.parent.glob(f"{run.name}.rank*.err")))


def _errors(run: Path) -> list[str]:
    return [line for line in _stderr(run).splitlines() if line.startswith("metaloop: error")]


# -- C1: SIGTERM to every rank ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("launch", ["lightning", "external"])
def test_sigterm_to_every_rank_saves_the_step_reached_once_and_every_rank_exits_143(tmp_path, launch):
    """``scancel`` and preemption signal every rank at once; that deadlocked 5 times in 6. Three tries each way."""
    for attempt in range(3):
        run, marks = tmp_path / f"run{attempt}", tmp_path / f"marks{attempt}"
        marker = ["+callbacks.marker._target_=signal_helpers.StepMarker", f"+callbacks.marker.folder={marks}"]
        procs = _start(run, [*LONG, *marker], launch)
        deadline = time.monotonic() + 120
        while not (len(found := _marks(marks)) == 2 and min(step for _, step in found.values()) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _stderr(run)[-3000:]
            time.sleep(0.02)
        pids = [pid for pid, _ in found.values()]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        codes = _wait(procs, 45)
        assert not any(_alive(pid) for pid in pids), f"try {attempt}: a rank outlived the run"
        assert codes == [128 + signal.SIGTERM] * len(procs), f"try {attempt}: {codes}\n{_stderr(run)[-3000:]}"
        # one line, from rank 0, naming the step; last.ckpt holds that step
        errors = _errors(run)
        assert len(errors) == 1 and not TRACEBACK.search(_stderr(run)), _stderr(run)[-3000:]
        step = int(re.search(r"stopped by SIGTERM at meta-step (\d+)", errors[0]).group(1))
        assert min(s for _, s in found.values()) <= step < 150
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    # the run resumes from that checkpoint, on two ranks again, to its end
    resumed = _start(run, [*LONG, *marker, "ckpt_path=last"], launch)
    assert _wait(resumed, 180) == [0] * len(resumed), _stderr(run)[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 150


# -- C2: a failed or stuck rank --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_an_error_on_one_rank_ends_the_run_in_one_line_naming_the_rank(tmp_path, rank):
    run = tmp_path / "run"
    error = ["+callbacks.stall._target_=signal_helpers.StallAt", f"+callbacks.stall.rank={rank}",
             "+callbacks.stall.step=3", "+callbacks.stall.error='corrupt task file tasks/7.npz'"]
    codes = _wait(_start(run, [*LONG, *error], "lightning"), 120)
    assert codes == [1], _stderr(run)[-3000:]
    assert not TRACEBACK.search(_stderr(run)), _stderr(run)[-3000:]
    errors = _errors(run)
    assert errors[0].startswith(f"metaloop: error: rank {rank}: ValueError: corrupt task file tasks/7.npz (at ")
    if rank == 1:  # rank 0 says why it stopped; when rank 0 fails, the rank it launched is stopped with it
        assert errors[1:] == ["metaloop: error: rank 0: stopped because rank 1 failed (ValueError: corrupt task file tasks/7.npz)"]
    else:
        assert len(errors) == 1


@pytest.mark.slow
def test_a_stuck_rank_ends_the_run_within_the_collective_timeout_naming_the_rank(tmp_path):
    run = tmp_path / "run"
    stuck = ["+callbacks.stall._target_=signal_helpers.StallAt", "+callbacks.stall.rank=1", "+callbacks.stall.step=3",
             "trainer.strategy.timeout_s=5"]
    marks = ["+callbacks.marker._target_=signal_helpers.StepMarker", f"+callbacks.marker.folder={tmp_path / 'marks'}"]
    procs = _start(run, [*LONG, *stuck, *marks], "lightning")
    deadline = time.monotonic() + 120
    while 1 not in (found := _marks(tmp_path / "marks")) or found[1][1] < 2:  # it stalls after step 3
        assert time.monotonic() < deadline and procs[0].poll() is None, _stderr(run)[-3000:]
        time.sleep(0.05)
    stalled = time.monotonic()
    # torch's default would wait 30 minutes; two collectives of 5 s, the report and killing the stuck rank take ~20 s
    assert _wait(procs, 60) == [1], _stderr(run)[-3000:]
    assert time.monotonic() - stalled < 60
    assert not _alive(found[1][0]), "the stuck rank outlived the run"
    assert _errors(run) == [
        "metaloop: error: rank 0: stopped: rank 1 did not answer within timeout_s=5 s (stuck, or slower than that); "
        "raise trainer.strategy.timeout_s if a meta-step or a checkpoint takes longer"
    ], _stderr(run)[-3000:]


def test_the_collective_timeout_is_a_typed_key_checked_before_the_run(tmp_path):
    message = cli_error("fit", *SINE, "trainer=ddp", "trainer.strategy.timeout_s=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert "trainer.strategy.timeout_s=0 is not accepted (it is below 1)" in message
    assert not (tmp_path / "run").exists()


def test_the_strategy_refuses_a_timeout_that_is_not_a_positive_number():
    from metaloop.lightning.distributed import DDPStrategy

    assert DDPStrategy().timeout_s == 300
    for bad in (0, -1, True, "300"):
        with pytest.raises(ValueError, match="must be a positive number of seconds"):
            DDPStrategy(timeout_s=bad)
