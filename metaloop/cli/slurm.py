"""``launcher=submitit_slurm``: a sweep never waits silently on a job SLURM cannot run.

Hydra's submitit launcher submits the sweep's jobs with ``sbatch`` and waits for their results;
metaloop's launcher (``hydra_plugins.metaloop_launcher``, a subclass: Hydra loads launchers only from
the ``hydra_plugins`` package) waits inside :func:`watched_queue`. Two ways a sweep could hang or end
in a traceback become one message (``metaloop: error: ...``) and a non-zero exit:

- ``sbatch`` refuses the jobs (more CPUs or GPUs than a node of the partition has, where the cluster
  sets ``EnforcePartLimits``; a GPU request on a partition without GPUs): the message names what the
  jobs asked for and the keys that set it.
- a submitted job waits in the queue for a reason that no amount of waiting removes
  (:data:`NEVER_RUNS`: e.g. ``PartitionConfig``, a request the partition's nodes cannot give), or
  longer than ``sweep.max_pending_min``: the sweep's jobs are cancelled and the message names the job,
  its reason and its request. While jobs wait, each new pending reason is logged.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["NEVER_RUNS", "QueuedJob", "read_queue", "unrunnable", "watched_queue"]

log = logging.getLogger(__name__)

# squeue's pending reasons that waiting never clears: the request exceeds what the partition, the account
# or the QOS allows any one job
NEVER_RUNS = (
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount", "InvalidQOS",
    "DependencyNeverSatisfied",
)
_PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)Max\w*PerJob\w*$")  # e.g. QOSMaxCpuPerJobLimit, AssocMaxNodePerJobLimit
_POLL_S = 2.0
# what the jobs ask SLURM for, and the keys that set it (configs/launcher/submitit_slurm.yaml)
_REQUEST = (
    ("nodes", "trainer.num_nodes"),
    ("tasks_per_node", "trainer.devices"),
    ("cpus_per_task", "threads + task.datamodule.num_workers"),
    ("gpus_per_node", "trainer.accelerator and trainer.devices"),
    ("mem_gb", None),
    ("timeout_min", None),
    ("partition", None),
)


@dataclass(frozen=True)
class QueuedJob:
    """One line of ``squeue -o '%i|%T|%r|%o'``: the job id, its state, the reason it waits, its batch script."""

    job_id: str
    state: str
    reason: str
    script: str


def read_queue(text: str) -> list[QueuedJob]:
    """Returns the jobs of ``squeue -h -o '%i|%T|%r|%o'`` output (lines that do not parse are skipped)."""
    jobs = []
    for line in text.splitlines():
        fields = line.strip().split("|", 3)
        if len(fields) == 4:
            jobs.append(QueuedJob(*fields))
    return jobs


def unrunnable(job: QueuedJob) -> bool:
    """True if ``job`` is pending for a reason that waiting never clears (:data:`NEVER_RUNS`, a per-job limit)."""
    return job.state == "PENDING" and (job.reason in NEVER_RUNS or bool(_PER_JOB_LIMIT.match(job.reason)))


def _request(params: Mapping[str, Any]) -> str:
    """Returns what a job asks SLURM for, with the keys that set it, e.g. ``cpus_per_task=4 (threads)``."""
    parts = []
    for name, source in _REQUEST:
        if params.get(name) is not None:
            parts.append(f"hydra.launcher.{name}={params[name]}" + (f" (from {source})" if source else ""))
    return ", ".join(parts)


class _QueueWatch(threading.Thread):
    """Polls ``squeue`` for the jobs whose batch script lies under ``folder``: logs new pending reasons, and cancels
    the sweep's jobs when one can never run or has waited longer than ``limit_s``; :attr:`problem` then says why."""

    def __init__(self, folder: str, limit_s: float | None, request: str) -> None:
        super().__init__(name="metaloop-slurm-queue", daemon=True)
        self.folder, self.limit_s, self.request = folder, limit_s, request
        self.problem: str | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def run(self) -> None:
        first_seen: dict[str, float] = {}
        reasons: dict[str, str] = {}
        while not self._stop_event.wait(_POLL_S):
            try:
                out = subprocess.run(["squeue", "--me", "-h", "-o", "%i|%T|%r|%o"], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            ours = [j for j in read_queue(out.stdout) if j.script.startswith(self.folder)]
            now = time.monotonic()
            for job in ours:
                if job.state != "PENDING":
                    continue
                first_seen.setdefault(job.job_id, now)
                if job.reason not in ("None", reasons.get(job.job_id)):
                    reasons[job.job_id] = job.reason
                    log.info(f"SLURM job {job.job_id} is pending: {job.reason}")
                waited = now - first_seen[job.job_id]
                if unrunnable(job):
                    self._give_up(ours, f"SLURM can never run job {job.job_id}: it is pending with Reason={job.reason} "
                                        f"(its request exceeds what the partition, account or QOS allows a job)",
                                  "lower them or pick another hydra.launcher.partition")
                    return
                if self.limit_s is not None and waited > self.limit_s:
                    self._give_up(ours, f"SLURM job {job.job_id} waited {waited / 60:.1f} min in the queue "
                                        f"(Reason={job.reason}), longer than sweep.max_pending_min={self.limit_s / 60:g}",
                                  "raise or unset sweep.max_pending_min, lower them, or pick another hydra.launcher.partition")
                    return

    def _give_up(self, jobs: Sequence[QueuedJob], what: str, fix: str) -> None:
        if self._stop_event.is_set():  # the launcher is done waiting: nothing to interrupt
            return
        self.problem = f"{what}; the sweep's jobs were cancelled. The jobs asked for {self.request}: {fix}"
        ids = sorted({j.job_id.split("_")[0] for j in jobs})
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30, check=False)
        # the launcher waits in submitit's polling loop (sacct at growing intervals, then 15 s for result files that
        # a cancelled job never writes): interrupt it; watched_queue turns the interrupt into the message
        _thread.interrupt_main()


def _sbatch_errors(message: str) -> str:
    """Returns sbatch's own error lines of a failed submission, joined on one line."""
    return " ".join(line.strip() for line in message.splitlines() if "sbatch: error" in line)


@contextlib.contextmanager
def watched_queue(params: Mapping[str, Any], config: Any) -> Iterator[None]:
    """Runs the block (the launcher's submit-and-wait) while :class:`_QueueWatch` watches the sweep's jobs.

    ``params`` are the launcher's (``hydra.launcher``, resolved), ``config`` the sweep's (for
    ``sweep.max_pending_min``). A refused submission or a job given up on leaves the block as
    :class:`SystemExit` with one message.
    """
    from submitit.core.utils import FailedJobError, UncompletedJobError

    if shutil.which("sbatch") is None:
        raise SystemExit("metaloop: error: launcher=submitit_slurm needs SLURM's sbatch on PATH, and it is not; "
                         "run the sweep on a SLURM login node, or use launcher=basic or launcher=submitit_local")
    limit = config.get("sweep", {}).get("max_pending_min")
    # the batch scripts lie in the submitit folder's part before the job id (%j)
    folder = os.path.abspath(str(params["submitit_folder"]).split("%", 1)[0])
    watch = _QueueWatch(folder, None if limit is None else float(limit) * 60, _request(params))
    watch.start()
    try:
        yield
    except (KeyboardInterrupt, UncompletedJobError) as err:
        if watch.problem is not None:
            raise SystemExit(f"metaloop: error: {watch.problem}") from err
        if isinstance(err, KeyboardInterrupt):
            raise
        if isinstance(err, FailedJobError) and "sbatch: error" in str(err):
            raise SystemExit(
                f"metaloop: error: SLURM refused the sweep's jobs ({_sbatch_errors(str(err))}). They asked for "
                f"{_request(params)}: lower what the partition's nodes cannot give, or pick another "
                "hydra.launcher.partition (sinfo -o '%P %c %G' lists CPUs and GPUs per node)"
            ) from err
        # a job SLURM ended without a result (cancelled, timed out, its node lost): submitit's first lines name it and its log
        summary = " ".join(str(err).split("Error stream produced")[0].split())
        raise SystemExit(f"metaloop: error: a SLURM job of the sweep ended without a result: {summary}") from err
    finally:
        watch.stop()
