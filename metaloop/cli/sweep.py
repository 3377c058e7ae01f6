"""Sweeps (``metaloop fit -m ...``): each job runs as its own ``metaloop`` process; a results table at the end.

Why a process per job: Lightning's DDP launcher starts ranks 1..N-1 by re-running the command line
(``sys.argv``), which for a sweep is the whole sweep; and a finished DDP job leaves ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_*`` and a process group behind, so the next job in the same process would
believe it was launched by torchrun. A fresh ``python -m metaloop.cli`` per job, with the job's
overrides and ``hydra.run.dir`` set to the job folder, is a plain single run: its DDP ranks re-run
*its* command line, and all distributed state ends with it. The Hydra launcher (basic, joblib,
submitit) still decides where and when jobs run; this module only runs each one.

Each job leaves ``sweep_job.json`` in its folder (number, overrides, status, wall time, metrics, and the
sweep's id); :class:`SweepResults`, a Hydra callback, gathers this sweep's records when it ends into
``sweep_results.csv`` and ``sweep_results.md`` in the sweep folder, prints the table, and exits
non-zero if any job failed. A failed job returns None to a hyperparameter sweeper, which Optuna
records as a failed trial, and the search goes on. The ``metaloop`` command holds the sweep folder for
the whole sweep (a second sweep there fails at once), and each job's folder while the job runs.

Signals: each job runs in a session of its own, so that the sweep decides what reaches it. SIGTERM,
SIGINT or SIGHUP to the sweep (or to a launcher's worker) is forwarded as SIGTERM to every running
job on this machine, which saves its step and stops (:class:`~metaloop.lightning.callbacks.RunCheckpoint`);
a job still alive :data:`STOP_GRACE_S` seconds later, or at a second signal, is killed with its
processes. Jobs not started yet are skipped, the table marks them, and the sweep exits ``128 + signal``
(143 for SIGTERM) once no job of it is left.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = [
    "RECORD", "STOP_GRACE_S", "SWEEP_ID", "SweepResults", "check_optimized_metric", "job_command", "job_metric_names",
    "read_records", "results_table", "run_job",
]

RECORD = "sweep_job.json"  # one per job folder, written by the sweep process
INTERRUPTED = ".interrupted"  # in the sweep folder while a signal stops the sweep: the signal's number
STOP_GRACE_S = 120.0  # seconds a job has to save and stop after the sweep forwards a signal, before it is killed
SWEEP_ID = "METALOOP_SWEEP_ID"  # set for each job (hydra.job.env_set) by the `metaloop` command: the sweep it belongs to
_SET_BY_CLI = ("command=", "recipe=")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _quote(value: str) -> str:
    """Returns ``value`` as a quoted Hydra override value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_command(hydra_cfg: Any) -> list[str]:
    """Returns the command that runs one sweep job alone: ``python -m metaloop.cli`` with Hydra's arguments.

    ``hydra_cfg`` is the job's :class:`~hydra.core.hydra_config.HydraConfig`: the same primary config,
    search path and task overrides (``command=`` and ``recipe=`` among them), the job folder as
    ``hydra.run.dir``, and the sweep folder's name as ``sweep.group`` (unless the sweep sets it), by which
    experiment trackers group the sweep's jobs.
    """
    # --config-dir is the source Hydra names "command-line"
    config_dir = next(s.path for s in hydra_cfg.runtime.config_sources if s.provider == "command-line")
    searchpath = ",".join(_quote(p) for p in hydra_cfg.searchpath)
    grouped = any(o.lstrip("+~").startswith("sweep.group=") for o in hydra_cfg.overrides.task)
    group = [] if grouped else [f"sweep.group={_quote(Path(hydra_cfg.sweep.dir).name)}"]
    return [
        sys.executable, "-m", "metaloop.cli",
        "--config-dir", config_dir,
        "--config-name", hydra_cfg.job.config_name,
        f"hydra.searchpath=[{searchpath}]",
        *hydra_cfg.overrides.task,
        *group,
        f"hydra.run.dir={_quote(hydra_cfg.runtime.output_dir)}",
    ]


def read_records(sweep_dir: str | Path, since: float = 0.0, sweep: str | None = None) -> list[dict[str, Any]]:
    """Returns the job records under ``sweep_dir`` of jobs started at or after ``since`` (a Unix time), by job number.

    ``sweep``: only the records of that sweep id (:data:`SWEEP_ID`).
    """
    records = []
    for path in Path(sweep_dir).rglob(RECORD):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            if record.get("started", 0.0) >= since and (sweep is None or record.get("sweep") == sweep):
                records.append(record)
    return sorted(records, key=lambda r: r["job"])


def _tail(text: str, lines: int = 2) -> str:
    """Returns the last ``lines`` lines of ``text`` that say something (Hydra's stack-trace hint does not)."""
    kept = [line.strip() for line in text.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    return " | ".join(kept[-lines:])


def _stream(process: subprocess.Popen[str]) -> str:
    """Copies the process's stderr to ours as it comes and returns its last 50 lines."""
    assert process.stderr is not None
    last: list[str] = []
    for line in process.stderr:
        sys.stderr.write(line)
        last = [*last[-49:], line]
    process.wait()
    return "".join(last)


def run_job(cfg: DictConfig) -> float | dict[str, float] | None:
    """Returns the job's final metrics (or ``cfg.optimized_metric``'s value, None if it failed) after running it alone.

    Runs in the sweep's process (or in a launcher's worker): it claims devices when
    ``sweep.devices_per_job`` is set (:func:`metaloop.cli.launch.claim_devices`), runs
    :func:`job_command` in a session of its own, and writes the job's record (``status: running`` with
    its process id while it runs). A failed job is recorded, not raised, so the sweep goes on; with
    ``sweep.continue_on_failure=false`` the jobs after a failure are skipped, and after a signal (see
    the module's notes) every job not started yet is.
    """
    from hydra.core.hydra_config import HydraConfig

    from metaloop.cli.launch import process_rank
    from metaloop.cli.folders import RunFolderError, lock_run_folder

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir)
    record: dict[str, Any] = {
        "job": int(hydra_cfg.job.num),
        "overrides": [o for o in hydra_cfg.overrides.task if not o.startswith(_SET_BY_CLI)],
        "folder": str(job_dir),
        "started": time.time(),
        "sweep": os.environ.get(SWEEP_ID),
    }
    keep = process_rank() == 0  # on SLURM every task of a job runs this function; rank 0 keeps the record
    failed_before = [
        r["job"] for r in read_records(sweep_dir, sweep=record["sweep"]) if r["status"] == "failed" and r["job"] != record["job"]
    ]
    if _interrupted_by(sweep_dir):
        record.update(status="skipped", error=f"not started: the sweep was stopped by {_interrupted_by(sweep_dir)}")
    elif failed_before and not cfg.sweep.continue_on_failure:
        record.update(status="skipped", error=f"job {failed_before[0]} failed and sweep.continue_on_failure=false")
    else:
        try:
            # rank 0 holds the job folder: on SLURM every task of a job (one per rank) runs this function
            with lock_run_folder(job_dir) if keep else contextlib.nullcontext():
                _run_alone(cfg, hydra_cfg, job_dir, sweep_dir, record, keep)
        except RunFolderError as err:
            record.update(status="failed", error=str(err))
    if cfg.get("optimized_metric") and record["status"] == "ok":
        name = str(cfg.optimized_metric)
        value = record["metrics"].get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            record.update(status="failed", error=f"optimized_metric={name} is {value} in the job's results {sorted(record['metrics'])}")
    record["ended"] = time.time()
    if keep:
        _write(job_dir, record)
    metrics: dict[str, float] = record.get("metrics", {})
    if cfg.get("optimized_metric"):
        # not NaN: the Optuna the sweeper pins refuses NaN and ends the whole search; a value that is no number
        # makes it record this trial as failed and go on
        return float(metrics[str(cfg.optimized_metric)]) if record["status"] == "ok" else None
    return metrics


def _run_alone(cfg: DictConfig, hydra_cfg: Any, job_dir: Path, sweep_dir: Path, record: dict[str, Any], keep: bool) -> None:
    """Runs the job's own process (:func:`job_command`) on the devices it claims, signals forwarded; fills in ``record``."""
    from metaloop.cli.launch import claim_devices
    from metaloop.cli.report import latest_record

    with claim_devices(sweep_dir, cfg) as (env, placement):
        record.update(placement)
        start = time.perf_counter()
        process = subprocess.Popen(
            job_command(hydra_cfg), env={**os.environ, **env}, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # a signal to the sweep reaches the job through the sweep, as SIGTERM
        )
        stderr = ""
        with _forwarding_signals(sweep_dir, process):
            if keep:
                _write(job_dir, {**record, "status": "running", "pid": process.pid, "host": socket.gethostname()})
            if _interrupted_by(sweep_dir):  # a signal between the start and the record above found no pid
                _stop(process)
            stderr = _stream(process)
        record["wall_time_s"] = round(time.perf_counter() - start, 2)
    results = latest_record(job_dir, str(cfg.command), since=record["started"] - 1.0)
    if process.returncode == 0 and results is not None:
        record.update(status="ok", metrics=json.loads(results.read_text())["metrics"])
    elif _interrupted_by(sweep_dir):
        record.update(status="interrupted", error=f"stopped by {_interrupted_by(sweep_dir)} (exit code {process.returncode}): {_tail(stderr)}")
    else:
        record.update(status="failed", error=f"exit code {process.returncode}: {_tail(stderr)}")


def _write(job_dir: Path, record: Mapping[str, Any]) -> None:
    """Writes the job's record, replacing the previous one at once (a reader never sees half a file)."""
    temporary = job_dir / f".{RECORD}.tmp"
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, job_dir / RECORD)


# -- signals ---------------------------------------------------------------------------------
def _interrupted_by(sweep_dir: Path) -> str | None:
    """Returns the name of the signal that stopped the sweep in ``sweep_dir`` ("SIGTERM"), or None."""
    try:
        return signal.Signals(int((sweep_dir / INTERRUPTED).read_text())).name
    except (OSError, ValueError):
        return None


def _mark_interrupted(sweep_dir: Path, signum: int) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not (sweep_dir / INTERRUPTED).exists():
        (sweep_dir / INTERRUPTED).write_text(str(int(signum)))


def _signal_group(pid: int, signum: int) -> None:
    """Sends ``signum`` to the process group ``pid`` leads (a job and its DDP ranks); gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _stop(process: subprocess.Popen[str]) -> None:
    """Asks the job to save and stop (SIGTERM to its first process, which stops its own ranks); kills its
    process group if it is still alive :data:`STOP_GRACE_S` seconds later."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)

    def kill() -> None:
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGKILL)

    timer = threading.Timer(STOP_GRACE_S, kill)
    timer.daemon = True
    timer.start()


@contextlib.contextmanager
def _forwarding_signals(sweep_dir: Path, process: subprocess.Popen[str]) -> Iterator[None]:
    """While the block runs, a stop signal to this process marks the sweep interrupted and stops ``process``.

    Only the main thread can take signals; elsewhere (a thread of a launcher) the sweep's own handler
    (:class:`SweepResults`) reaches the job through its record. A second signal kills the job at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        _mark_interrupted(sweep_dir, signum)
        if signals_seen:
            _signal_group(process.pid, signal.SIGKILL)
        else:
            _stop(process)
        signals_seen.append(signum)

    signals_seen: list[int] = []
    previous = {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
    try:
        yield
    except KeyboardInterrupt:  # a launcher's worker that took Ctrl-C before the handler above: stop the job too
        _mark_interrupted(sweep_dir, signal.SIGINT)
        _stop(process)
        process.wait()
    except BaseException:
        _stop(process)
        process.wait()
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stop_running_jobs(sweep_dir: Path, since: float, kill: bool) -> None:
    """Sends SIGTERM (or, with ``kill``, SIGKILL to its process group) to each job of the sweep running on this machine."""
    host = socket.gethostname()
    for record in read_records(sweep_dir, since):
        if record["status"] == "running" and record.get("host") == host and record.get("pid"):
            if kill:
                _signal_group(int(record["pid"]), signal.SIGKILL)
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(record["pid"]), signal.SIGTERM)


# -- the optimised metric ----------------------------------------------------------------------
def job_metric_names(cfg: DictConfig) -> list[str] | None:
    """Returns the final metrics (``val/...``, ``test/...``, and each one's ``_ci95``) a job of ``cfg`` reports.

    Derived from what the module logs: each name of the objective's ``metric_names`` for each phase of
    the module's ``evaluation_phases`` (``pre``/``post`` adaptation), for the evaluations the command runs.
    None when the module or objective (a user's own) does not declare them.
    """
    from hydra.utils import get_class

    try:
        module = get_class(str(cfg.module._target_))
        objective = get_class(str(cfg.task.objective._target_))
    except Exception:  # noqa: BLE001 (any import failure: the job reports it; nothing to check against here)
        return None
    phases, names = getattr(module, "evaluation_phases", None), getattr(objective, "metric_names", None)
    if not phases or not names:
        return None
    command = str(cfg.command)
    stages = [
        stage for stage, runs in (
            ("val", command in ("fit", "validate") and bool(cfg.task.get("num_val_tasks"))),
            ("test", (command == "test" or (command == "fit" and cfg.get("test_after_fit"))) and bool(cfg.task.get("num_test_tasks"))),
        ) if runs
    ]
    return [f"{stage}/{name}_{phase}{ci}" for stage in stages for name in names for phase in phases for ci in ("", "_ci95")]


def check_optimized_metric(cfg: DictConfig) -> None:
    """Raises :class:`~metaloop.cli.UsageError` if ``cfg.optimized_metric`` is set and no job of ``cfg`` reports it."""
    from metaloop.cli import UsageError

    name = cfg.get("optimized_metric")
    if not name:
        return
    reported = job_metric_names(cfg)
    if reported is None or name in reported:
        return
    shown = ", ".join(n for n in reported if not n.endswith("_ci95")) or "none"
    hints = {
        "val/": "validation metrics need task.num_val_tasks > 0 and command fit or validate",
        "test/": "test metrics need task.num_test_tasks > 0 and command test, or fit with test_after_fit=true",
    }
    hint = next((h for prefix, h in hints.items() if str(name).startswith(prefix) and not any(n.startswith(prefix) for n in reported)), "")
    raise UsageError(
        f"optimized_metric={name} is not a metric this sweep's jobs report; use one of {shown} (or a name with _ci95)"
        + (f"; {hint}" if hint else "")
    )


# -- the results table -----------------------------------------------------------------------
def _varying(records: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Returns each job's overrides, less those every job shares (all of them for a single job)."""
    shared = set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
    return [[o for o in r["overrides"] if o not in shared] for r in records]


def _metric_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    names = {k for r in records for k in r.get("metrics", {}) if k.startswith(("val/", "test/"))}
    return sorted(names, key=lambda k: (not k.startswith("val/"), k))


def _cell(metrics: Mapping[str, float | None], name: str) -> str:
    value = metrics.get(name)
    if value is None:  # not reported, or undefined (null in results.json: the half-width of one task)
        return ""
    ci = metrics.get(f"{name}_ci95")
    return f"{value:.4g}" + (f" ± {ci:.2g}" if ci is not None and math.isfinite(ci) else "")


def results_table(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Returns (header, CSV rows, display rows) of the sweep table: one row per job.

    CSV rows hold raw numbers, every metric and its ``_ci95``; display rows show ``mean ± ci`` of
    the post-adaptation metrics.
    """
    names = _metric_names(records)
    shown = [n for n in names if n.endswith("_post")] or [n for n in names if not n.endswith("_ci95")]
    header = ["job", "overrides", *shown, "wall time (s)", "status"]
    csv_header = ["job", "overrides", *names, "wall_time_s", "status", "error", "folder"]
    csv_rows, display_rows = [csv_header], [header]
    for record, overrides in zip(records, _varying(records)):
        metrics = record.get("metrics", {})
        wall = record.get("wall_time_s")
        csv_rows.append([
            str(record["job"]), " ".join(overrides), *("" if metrics.get(n) is None else repr(metrics[n]) for n in names),
            "" if wall is None else str(wall), record["status"], record.get("error", ""), record["folder"],
        ])
        display_rows.append([
            str(record["job"]), " ".join(overrides), *(_cell(metrics, n) for n in shown),
            "" if wall is None else f"{wall:.1f}", record["status"],
        ])
    return header, csv_rows, display_rows


def _markdown(rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(rows[0]), line(["---"] * len(rows[0])), *(line(r) for r in rows[1:])]) + "\n"


def write_results(sweep_dir: str | Path, records: Sequence[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Returns the paths of ``sweep_results.csv`` and ``sweep_results.md`` after writing them in ``sweep_dir``."""
    _, csv_rows, display_rows = results_table(records)
    folder = Path(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sweep_results.csv", "w", newline="") as f:
        csv.writer(f).writerows(csv_rows)
    (folder / "sweep_results.md").write_text(_markdown(display_rows))
    return folder / "sweep_results.csv", folder / "sweep_results.md"


def _print(records: Sequence[Mapping[str, Any]], sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    _, _, rows = results_table(records)
    table = Table(*rows[0], title=f"sweep results: {sweep_dir}", box=None)
    for row in rows[1:]:
        table.add_row(*(escape(c) for c in row))
    console = Console()
    # a log file or pipe gets the whole table rather than Rich's 80 columns
    Console(width=None if console.is_terminal else 200).print(table)
    for record in records:
        if record["status"] != "ok":
            print(f"job {record['job']} {record['status']}: {record.get('error', '')}", file=sys.stderr)


class SweepResults(Callback):
    """A Hydra callback: checks a sweep before any job starts; at its end, writes and prints the results table.

    The end of a sweep raises :class:`SystemExit` with a non-zero code when a job failed or was skipped,
    so ``metaloop fit -m`` exits non-zero.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.sweep_dir: Path | None = None
        self._previous: dict[int, Any] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from metaloop.cli import UsageError
        from metaloop.cli.launch import check_scale_out

        self.started = time.time() - 1.0
        try:
            check_scale_out(config)
            check_optimized_metric(config)
        except UsageError as err:
            raise SystemExit(f"metaloop: error: {err}") from err
        self.sweep_dir = Path(config.hydra.sweep.dir)
        (self.sweep_dir / INTERRUPTED).unlink(missing_ok=True)  # an earlier sweep's, in the same folder
        self._previous = {s: signal.signal(s, self._on_signal) for s in _STOP_SIGNALS}

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Marks the sweep interrupted and stops its running jobs (kills them at a second signal or after the grace period)."""
        assert self.sweep_dir is not None
        again = _interrupted_by(self.sweep_dir) is not None
        _mark_interrupted(self.sweep_dir, signum)
        print(f"metaloop: {signal.Signals(signum).name}: stopping the sweep's running jobs (they save their step)", file=sys.stderr)
        _stop_running_jobs(self.sweep_dir, self.started, kill=again)
        if not again:
            timer = threading.Timer(STOP_GRACE_S, _stop_running_jobs, (self.sweep_dir, self.started, True))
            timer.daemon = True
            timer.start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        sweep_dir = Path(config.hydra.sweep.dir)
        stopped_by = _interrupted_by(sweep_dir)
        records = read_records(sweep_dir, self.started, config.hydra.job.env_set.get(SWEEP_ID))
        if records:
            write_results(sweep_dir, records)
            _print(records, sweep_dir)
        if stopped_by is not None:
            (sweep_dir / INTERRUPTED).unlink(missing_ok=True)
            print(
                f"metaloop: error: the sweep was stopped by {stopped_by}; the jobs it stopped saved their step (resume "
                f"one with hydra.run.dir=JOB_FOLDER ckpt_path=last); see {sweep_dir / 'sweep_results.md'}",
                file=sys.stderr,
            )
            raise SystemExit(128 + signal.Signals[stopped_by].value)
        bad = [r for r in records if r["status"] != "ok"]
        if bad:
            raise SystemExit(
                f"metaloop: error: {len(bad)} of {len(records)} sweep jobs did not finish "
                f"(jobs {', '.join(str(r['job']) for r in bad)}); see {sweep_dir / 'sweep_results.md'}"
            )

