"""Sweeps (``metaloop fit -m ...``): each job runs as its own ``metaloop`` process; a results table at the end.

Why a process per job: Lightning's DDP launcher starts ranks 1..N-1 by re-running the command line
(``sys.argv``), which for a sweep is the whole sweep; and a finished DDP job leaves ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_*`` and a process group behind, so the next job in the same process would
believe it was launched by torchrun. A fresh ``python -m metaloop.cli`` per job, with the job's
overrides and ``hydra.run.dir`` set to the job folder, is a plain single run: its DDP ranks re-run
*its* command line, and all distributed state ends with it. The Hydra launcher (basic, joblib,
submitit) still decides where and when jobs run; this module only runs each one.

Each job leaves ``sweep_job.json`` in its folder (number, overrides, status, wall time, metrics);
:class:`SweepResults`, a Hydra callback, gathers them when the sweep ends into
``sweep_results.csv`` and ``sweep_results.md`` in the sweep folder, prints the table, and exits
non-zero if any job failed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["RECORD", "RESULTS", "SweepResults", "job_command", "read_records", "results_table", "run_job"]

RECORD = "sweep_job.json"  # one per job folder, written by the sweep process
RESULTS = "results.json"  # one per run folder, written by the run's rank 0 (metaloop.cli.report.write_results)
_SET_BY_CLI = ("command=", "recipe=")


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


def read_records(sweep_dir: str | Path, since: float = 0.0) -> list[dict[str, Any]]:
    """Returns the job records under ``sweep_dir`` of jobs started at or after ``since`` (a Unix time), by job number."""
    records = []
    for path in Path(sweep_dir).rglob(RECORD):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            if record.get("started", 0.0) >= since:
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


def run_job(cfg: DictConfig) -> float | dict[str, float]:
    """Returns the job's final metrics (or ``cfg.optimized_metric``'s value, NaN if it failed) after running it alone.

    Runs in the sweep's process (or in a launcher's worker): it claims devices when
    ``sweep.devices_per_job`` is set (:func:`metaloop.cli.launch.claim_devices`), runs
    :func:`job_command`, and writes the job's record. A failed job is recorded, not raised, so the
    sweep goes on; with ``sweep.continue_on_failure=false`` the jobs after a failure are skipped.
    """
    from hydra.core.hydra_config import HydraConfig

    from metaloop.cli.launch import claim_devices, process_rank

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir)
    record: dict[str, Any] = {
        "job": int(hydra_cfg.job.num),
        "overrides": [o for o in hydra_cfg.overrides.task if not o.startswith(_SET_BY_CLI)],
        "folder": str(job_dir),
        "started": time.time(),
    }
    failed_before = [r["job"] for r in read_records(sweep_dir) if r["status"] == "failed" and r["job"] != record["job"]]
    if failed_before and not cfg.sweep.continue_on_failure:
        record.update(status="skipped", error=f"job {failed_before[0]} failed and sweep.continue_on_failure=false")
    else:
        with claim_devices(sweep_dir, cfg) as (env, placement):
            record.update(placement)
            (job_dir / RESULTS).unlink(missing_ok=True)
            start = time.perf_counter()
            process = subprocess.Popen(
                job_command(hydra_cfg), env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
            )
            stderr = _stream(process)
            record["wall_time_s"] = round(time.perf_counter() - start, 2)
        results = job_dir / RESULTS
        if process.returncode == 0 and results.is_file():
            record.update(status="ok", metrics=json.loads(results.read_text())["metrics"])
        else:
            record.update(status="failed", error=f"exit code {process.returncode}: {_tail(stderr)}")
    record["ended"] = time.time()
    if process_rank() == 0:  # on SLURM every task of a job runs this function; rank 0 keeps the record
        (job_dir / RECORD).write_text(json.dumps(record, indent=1))
    metrics: dict[str, float] = record.get("metrics", {})
    if cfg.get("optimized_metric"):
        return _optimized(metrics, str(cfg.optimized_metric), record)
    return metrics


def _optimized(metrics: Mapping[str, float], name: str, record: dict[str, Any]) -> float:
    """Returns the metric a hyperparameter sweeper minimises or maximises; NaN (a failed trial) if the job has none."""
    if record["status"] == "ok" and name not in metrics:
        raise KeyError(
            f"optimized_metric={name!r} is not among the job's final metrics {sorted(metrics)}; "
            "pick one of them (validation metrics need task.num_val_tasks > 0)"
        )
    return float(metrics.get(name, math.nan))


# -- the results table -----------------------------------------------------------------------
def _varying(records: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Returns each job's overrides, less those every job shares (all of them for a single job)."""
    shared = set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
    return [[o for o in r["overrides"] if o not in shared] for r in records]


def _metric_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    names = {k for r in records for k in r.get("metrics", {}) if k.startswith(("val/", "test/"))}
    return sorted(names, key=lambda k: (not k.startswith("val/"), k))


def _cell(metrics: Mapping[str, float], name: str) -> str:
    if name not in metrics:
        return ""
    text = f"{metrics[name]:.4g}"
    ci = metrics.get(f"{name}_ci95")
    return text + (f" ± {ci:.2g}" if ci is not None and math.isfinite(ci) else "")


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
            str(record["job"]), " ".join(overrides), *(repr(metrics[n]) if n in metrics else "" for n in names),
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

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from metaloop.cli import UsageError
        from metaloop.cli.launch import check_scale_out

        self.started = time.time() - 1.0
        try:
            check_scale_out(config)
        except UsageError as err:
            raise SystemExit(f"metaloop: error: {err}") from err

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = read_records(sweep_dir, self.started)
        if not records:
            return
        write_results(sweep_dir, records)
        _print(records, sweep_dir)
        bad = [r for r in records if r["status"] != "ok"]
        if bad:
            raise SystemExit(
                f"metaloop: error: {len(bad)} of {len(records)} sweep jobs did not finish "
                f"(jobs {', '.join(str(r['job']) for r in bad)}); see {sweep_dir / 'sweep_results.md'}"
            )

