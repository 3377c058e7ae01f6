"""Reports: scripts that reproduce published numbers with metaloop's recipes and write Markdown tables.

Each script (``python -m reports.sinusoid``, ``reports.omniglot``, ``reports.cross_alphabet``) trains
through the ``metaloop`` command (:func:`metaloop_run`: one process per run, so runs can go in
parallel and every run folder holds its Hydra config, checkpoints and ``metrics.csv``), reads the
metrics back, and writes ``reports/<name>.md`` and learning-curve PNGs. Run folders go under
``outputs/reports/`` (git-ignored); the tables and plots are the only files written to ``reports/``.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["RECIPE_DIR", "REPORT_DIR", "RUN_DIR", "max_time", "metaloop_run", "cpu_name", "parallel", "published_command", "plot_curves", "read_metrics", "run_info", "table", "write_report"]

REPORT_DIR = Path(__file__).resolve().parent
RUN_DIR = REPORT_DIR.parent / "outputs" / "reports"
RECIPE_DIR = REPORT_DIR.parent / "recipes"
T = TypeVar("T")


def metaloop_run(command: str, recipe: str, run_dir: Path, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Returns the last logged value of every metric after ``metaloop COMMAND --config RECIPE OVERRIDES`` in ``run_dir``.

    ``fit`` resumes from ``run_dir/checkpoints/last.ckpt`` when it exists, so a finished run is
    loaded rather than retrained (and a longer ``trainer.max_steps`` continues it); ``test`` is not
    rerun when ``run_dir`` holds test metrics from the same overrides (Hydra's ``.hydra/overrides.yaml``),
    so a report can gather runs made by earlier invocations. The command's output goes to
    ``run_dir/<command>.log``.

    Raises:
        RuntimeError: when the command fails, with the end of its log.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [f"hydra.run.dir={run_dir}", *overrides]
    results = run_dir / "results.json"
    finished = results.read_text() if command == "fit" and results.is_file() else None
    if command == "fit" and (run_dir / "checkpoints" / "last.ckpt").is_file():
        args.append("ckpt_path=last")
    if command == "test" and _tested(run_dir, [f"command={command}", f"recipe={recipe}", *overrides]):
        return {name: values[-1][1] for name, values in read_metrics(run_dir).items()}
    log = run_dir / f"{command}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        argv = [sys.executable, "-m", "metaloop.cli", command, "--config", recipe, *args]
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"metaloop {command} --config {recipe} failed (exit {done.returncode}); end of {log}:\n{tail}")
    if finished is not None and json.loads(finished)["global_step"] == run_info(run_dir)["global_step"]:
        results.write_text(finished)  # a finished run resumed without a step: its budget is the fit that made it
    return {name: values[-1][1] for name, values in read_metrics(run_dir).items()}


def cpu_name() -> str:
    """Returns this machine's CPU model as ``/proc/cpuinfo`` names it (e.g. "AMD EPYC"), or "CPU" where it does not."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split()) or "CPU"
    except OSError:
        pass
    return "CPU"


def published_command(script: str, argv: Sequence[str] | None) -> str:
    """Returns the command line of ``python -m reports.SCRIPT ARGV`` as a table cites it: without ``--runs`` and
    ``--report-dir``, which name folders of one machine and do not change a number."""
    args, kept = list(sys.argv[1:] if argv is None else argv), []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--runs", "--report-dir"):
            skip = True
        elif not arg.startswith(("--runs=", "--report-dir=")):
            kept.append(shlex.quote(arg))
    return " ".join([f"python -m reports.{script}", *kept])


def max_time(minutes: float | None) -> list[str]:
    """Returns the override of Lightning's ``trainer.max_time`` ("DD:HH:MM:SS") for ``minutes``; none for None."""
    if minutes is None:
        return []
    seconds = round(minutes * 60)
    return [f"trainer.max_time='{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'"]


def run_info(run_dir: Path) -> dict[str, Any]:
    """Returns a run folder's ``results.json``: its final ``metrics``, ``global_step`` and ``timings`` (seconds)."""
    return json.loads((run_dir / "results.json").read_text())


def _tested(run_dir: Path, overrides: list[str]) -> bool:
    """Returns whether ``run_dir`` holds test metrics of a run made with exactly ``overrides``."""
    from omegaconf import OmegaConf

    recorded = run_dir / ".hydra" / "overrides.yaml"
    if not recorded.is_file() or list(OmegaConf.load(recorded)) != overrides:
        return False
    try:
        return any(name.startswith("test/") for name in read_metrics(run_dir))
    except FileNotFoundError:
        return False


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Returns ``{metric: [(step, value), ...]}`` from a run folder's ``logs/version_N/metrics.csv``, oldest version first.

    A resumed run logs to the next version, so the versions together hold its whole history.
    """
    versions = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no logs/version_*/metrics.csv in {run_dir}; run metaloop there first")
    series: dict[str, list[tuple[int, float]]] = {}
    for version in versions:
        with version.open() as f:
            for row in csv.DictReader(f):
                for name, value in row.items():
                    if name != "step" and value not in ("", None):
                        series.setdefault(name, []).append((int(row["step"] or 0), float(value)))
    return series


def parallel(
    jobs: Sequence[Callable[[], T]], workers: int, progress: Callable[[list[T | None]], None] | None = None
) -> list[T]:
    """Returns the results of ``jobs`` (in order), running ``workers`` at a time (each job starts its own processes).

    ``progress`` is called after each job with the results so far (None for the unfinished ones), so a
    report can be rewritten as runs finish rather than only at the end.
    """
    results: list[T | None] = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if progress is not None:
                progress(results)
    return results  # type: ignore[return-value]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Returns a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def write_report(path: Path, title: str, body: str, command: str, wall_s: float) -> None:
    """Writes ``path`` (Markdown): the title, the body, and the command that made it with its wall time; prints it."""
    text = f"# {title}\n\n{body}\n\nMade by `{command}` in {wall_s / 60:.1f} min of wall time.\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)


def plot_curves(runs: Mapping[str, Path], metric: str, path: Path, ylabel: str, log_y: bool = False) -> None:
    """Saves a PNG of the validation ``val/<metric>_post`` (with its 95% band) against meta-steps, one line per run."""
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the tables still come; plot later from the runs' metrics.csv
        print(f"matplotlib is not installed: {path} was not drawn", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, run_dir in runs.items():
        series = read_metrics(run_dir)
        points, cis = series.get(f"val/{metric}_post", []), dict(series.get(f"val/{metric}_post_ci95", []))
        if not points:
            continue
        steps, values = zip(*points)
        half = [cis.get(s, 0.0) for s in steps]
        ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.fill_between(steps, [v - h for v, h in zip(values, half)], [v + h for v, h in zip(values, half)], alpha=0.2)
    ax.set_xlabel("meta-step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
