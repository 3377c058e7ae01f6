"""Scale-out checks and placement: what a run needs from the machine, checked before any process starts.

- :func:`check_scale_out`: devices that exist, evaluation sets with at least one meta-batch per rank,
  launcher settings that Lightning's cluster environments need.
- :func:`claim_devices`: the device pool of ``launcher=parallel`` (Hydra's joblib launcher runs
  ``sweep.jobs_at_once`` jobs at once; each claims a free slot of ``sweep.devices_per_job`` devices,
  its own ``CUDA_VISIBLE_DEVICES`` and master port, for as long as it runs).
- :func:`process_rank`: which distributed rank this process is, from the launcher's environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "JOBS_AT_ONCE", "SLURM_CPUS_PER_TASK", "SLURM_GPUS_PER_NODE", "check_scale_out", "claim_devices", "jobs_at_once",
    "process_rank", "slurm_cpus_per_task", "slurm_gpus_per_node", "visible_gpus",
]

JOBS_AT_ONCE = "metaloop.jobs_at_once"  # the resolver launcher=parallel sets hydra.launcher.n_jobs with
# the resolvers launcher=submitit_slurm sets hydra.launcher.cpus_per_task and gpus_per_node with
SLURM_CPUS_PER_TASK = "metaloop.slurm_cpus_per_task"
SLURM_GPUS_PER_NODE = "metaloop.slurm_gpus_per_node"
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def visible_gpus() -> list[str]:
    """Returns the ids of the CUDA devices this process may use: ``CUDA_VISIBLE_DEVICES``, or all of them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _uses_gpu(accelerator: str) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and bool(visible_gpus())


def jobs_at_once(value: Any, devices_per_job: Any, accelerator: str) -> int:
    """Returns how many jobs run at once: ``value``, or for ``"auto"`` the visible GPUs (CPU cores) per ``devices_per_job``."""
    if value != "auto":
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"sweep.jobs_at_once={value!r} must be a positive integer or 'auto'")
        return value
    per_job = int(devices_per_job or 1)
    available = len(visible_gpus()) if _uses_gpu(accelerator) else (os.cpu_count() or 1)
    return max(1, available // per_job)


OmegaConf.register_new_resolver(JOBS_AT_ONCE, jobs_at_once, replace=True)


def slurm_cpus_per_task(threads: Any, num_workers: Any) -> int:
    """Returns the CPUs one SLURM task (one rank) uses: its torch threads (``threads``; 1 when unset) plus its data-loader workers."""
    return max(1, int(threads or 1)) + int(num_workers or 0)


def _partition_has_gpus(partition: str | None) -> bool | None:
    """Returns whether the nodes of ``partition`` (None: the default partition) have GPUs, from sinfo's GRES; None if sinfo cannot tell."""
    import subprocess

    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split("|", 1) for line in out.stdout.splitlines() if "|" in line]
    if out.returncode != 0 or not rows:
        return None
    # sinfo marks the default partition with a trailing '*'
    chosen = [gres for name, gres in rows if (name.rstrip("*") == partition if partition else name.endswith("*"))]
    return any("gpu" in gres for gres in chosen) if chosen else None


def slurm_gpus_per_node(accelerator: str, devices: Any, partition: str | None) -> int | None:
    """Returns the GPUs a SLURM job asks for on each node: none on CPU, ``trainer.devices`` on GPU.

    ``accelerator=auto`` takes GPUs where the partition's nodes have them (sinfo's GRES), so that
    ``trainer=ddp`` runs on a CPU-only partition and on a GPU one; where sinfo cannot tell, it asks for GPUs.
    """
    if accelerator not in ("gpu", "cuda", "auto"):
        return None
    if accelerator == "auto" and _partition_has_gpus(partition) is False:
        return None
    return int(devices) if isinstance(devices, int) or str(devices).isdigit() else None


OmegaConf.register_new_resolver(SLURM_CPUS_PER_TASK, slurm_cpus_per_task, replace=True)
OmegaConf.register_new_resolver(SLURM_GPUS_PER_NODE, slurm_gpus_per_node, replace=True)


def process_rank() -> int:
    """Returns this process's rank as its launcher set it (torchrun, Lightning's DDP launcher, SLURM); 0 if none did."""
    for name in _RANK_VARIABLES:
        with contextlib.suppress(ValueError):
            if int(os.environ.get(name, "0")) != 0:
                return int(os.environ[name])
    return 0


def _device_count(accelerator: str, devices: Any) -> tuple[int, str | None]:
    """Returns (devices per node, a problem or None) of ``trainer.devices`` on this machine."""
    if not _uses_gpu(accelerator):
        if isinstance(devices, int) and devices > 0:
            return devices, None
        if devices in ("auto", 1, "1"):
            return 1, None
        if isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
            return int(devices), None
        return 1, f"trainer.devices={devices!r} on CPU must be a positive number of processes, e.g. trainer.devices=2"
    gpus = visible_gpus()
    if not gpus:
        return 0, (
            f"trainer.accelerator={accelerator} but this machine has no visible CUDA GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use trainer=cpu or a GPU machine"
        )
    if devices in ("auto", -1, "-1"):
        return len(gpus), None
    if isinstance(devices, str) and "," in devices:
        devices = [int(d) for d in devices.split(",") if d.strip()]
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        if devices < 1 or devices > len(gpus):
            return devices, f"trainer.devices={devices} but this machine has {len(gpus)} visible GPU(s); use at most {len(gpus)}"
        return devices, None
    ids = list(devices)
    missing = [i for i in ids if not 0 <= int(i) < len(gpus)]
    if missing:
        return len(ids), f"trainer.devices={ids} names GPU(s) {missing}, but the visible GPUs are 0..{len(gpus) - 1}"
    return len(ids), None


def _launcher(cfg: DictConfig) -> str | None:
    """Returns the Hydra launcher's option: from ``cfg.hydra`` (a sweep's config) or from Hydra's state (a job's)."""
    from hydra.core.hydra_config import HydraConfig

    if "hydra" in cfg:
        return cfg.hydra.runtime.choices.get("hydra/launcher")
    return HydraConfig.get().runtime.choices.get("hydra/launcher") if HydraConfig.initialized() else None


def check_scale_out(cfg: DictConfig) -> None:
    """Raises :class:`~metaloop.cli.UsageError` for a run that cannot be placed: before any process starts.

    Checks that ``trainer.devices`` exist on this machine (on a SLURM launcher, where jobs run
    elsewhere, only that it is a number), and that each evaluation set the command runs has at
    least one meta-batch per rank (``ceil(num_tasks / eval_meta_batch_size) >= devices * num_nodes``);
    with fewer, a rank would get an empty loader and the run would crash midway.
    """
    from metaloop.cli import UsageError

    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    nodes = int(trainer.get("num_nodes", 1) or 1)
    if _launcher(cfg) == "submitit_slurm":
        if not isinstance(devices, int) or devices < 1:
            raise UsageError(
                f"launcher=submitit_slurm needs trainer.devices as a number (the tasks and GPUs per node), "
                f"not {devices!r}; e.g. trainer.devices=4 trainer.num_nodes=2"
            )
        per_node = devices
    else:
        per_node, problem = _device_count(str(trainer.get("accelerator", "auto")), devices)
        if problem:
            raise UsageError(problem)
    ranks = per_node * nodes
    datamodule = cfg.task.get("datamodule") or {}
    splits = {"fit": ["val"] + (["test"] if cfg.get("test_after_fit") else []), "validate": ["val"], "test": ["test"]}
    batch = datamodule.get("eval_meta_batch_size")
    for split in splits.get(str(cfg.get("command", "fit")), []):
        tasks = datamodule.get(f"num_{split}_tasks")
        if not tasks or not batch or ranks <= 1:
            continue
        batches = math.ceil(tasks / batch)
        if batches < ranks:
            raise UsageError(
                f"task.num_{split}_tasks={tasks} in meta-batches of task.eval_meta_batch_size={batch} gives {batches} "
                f"evaluation meta-batch(es) for {ranks} ranks (devices {per_node} x num_nodes {nodes}); each rank needs "
                f"one: set task.num_{split}_tasks to at least {ranks * batch}, or task.eval_meta_batch_size to at most "
                f"{max(1, tasks // ranks)}"
            )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def claim_devices(sweep_dir: str | Path, cfg: DictConfig) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:
    """Yields (environment for the job, its placement) while holding one of the sweep's device slots.

    Without ``sweep.devices_per_job`` the job runs as configured: no environment, no placement. With
    it, slot ``k`` of ``sweep.jobs_at_once`` (a lock file in ``<sweep>/.device_slots``, held until the
    job ends; a job waits while all are taken) gives GPUs ``k*d .. k*d+d-1`` of the visible ones as
    ``CUDA_VISIBLE_DEVICES`` (on CPU, no devices: the job's processes get their own threads), and a
    free ``MASTER_PORT`` so that jobs' process groups do not meet.
    """
    per_job = cfg.sweep.get("devices_per_job")
    if not per_job:
        yield {}, {}
        return
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    slots = jobs_at_once(cfg.sweep.get("jobs_at_once", "auto"), per_job, accelerator)
    folder = Path(sweep_dir) / ".device_slots"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(slots):
            handle = open(folder / f"slot_{slot}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                env = {"MASTER_PORT": str(_free_port())}
                placement: dict[str, Any] = {"slot": slot, "master_port": int(env["MASTER_PORT"])}
                if _uses_gpu(accelerator):
                    gpus = visible_gpus()[slot * per_job : (slot + 1) * per_job]
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
                    placement["gpus"] = gpus
                if cfg.get("threads"):
                    env["OMP_NUM_THREADS"] = str(cfg.threads)
                yield env, placement
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(0.5)
