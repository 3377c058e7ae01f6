"""Benchmarks metaloop against higher, torchopt and hand-written PyTorch; prints Markdown tables.

Run ``python -m benchmarks.run`` (all workloads, several minutes on 2 CPU cores) or
``python -m benchmarks.run --quick``. Peers come from ``pip install -e .[bench]``; a missing
one is reported and skipped. Before timing, every implementation's meta-gradient is compared
with the hand-written reference (max abs difference). Timings interleave implementations
(round robin) so that background load affects all alike; the median is reported. The "Lightning"
rows run ``training_step`` through a ``lightning.Trainer`` (as ``metaloop fit`` does), ``repeats``
meta-steps after a warm-up one, right after the others.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.memory import GraphMemory
from benchmarks.workloads import IMPLEMENTATIONS, Workload, omniglot_workload, sinusoid_workload

REFERENCE = "plain PyTorch"


def _grads(w: Workload, step) -> list[torch.Tensor]:
    w.model.zero_grad(set_to_none=True)
    step()
    grads = [p.grad.detach().clone() for p in w.model.parameters()]
    w.model.zero_grad(set_to_none=True)
    return grads


def _build(w: Workload, names: list[str], track: bool = True) -> tuple[dict, dict[str, str]]:
    steps, skipped = {}, {}
    for name in names:
        try:
            steps[name] = IMPLEMENTATIONS[name](w, track)
        except ImportError as err:
            skipped[name] = f"not installed ({err.name})"
        except ValueError as err:  # metaloop refuses a combination it cannot differentiate correctly
            skipped[name] = f"refused: {str(err).split(': ', 1)[-1][:90]}"
    return steps, skipped


def speed(w: Workload, names: list[str], repeats: int) -> list[dict]:
    """Returns one row per implementation: meta-steps/s (median) and max |grad - reference|."""
    steps, skipped = _build(w, names)
    reference = _grads(w, steps[REFERENCE])
    diffs = {}
    for name, step in list(steps.items()):
        try:
            grads = _grads(w, step)
        except ValueError as err:  # metaloop refuses a combination it cannot differentiate correctly
            skipped[name] = f"refused: {str(err).split(': ', 1)[-1][:90]}"
            del steps[name]
            continue
        scale = max(b.abs().max().item() for b in reference)
        diffs[name] = (max((a - b).abs().max().item() for a, b in zip(grads, reference)), scale)
    times: dict[str, list[float]] = {name: [] for name in steps}
    looped = {name: step for name, step in steps.items() if not hasattr(step, "fit_seconds")}
    for _ in range(repeats):
        for name, step in looped.items():
            w.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    state = {k: v.clone() for k, v in w.model.state_dict().items()}
    for name, step in steps.items():
        if name not in looped:  # "Lightning" rows: training_step through a Trainer, which steps the outer optimizer
            times[name] = step.fit_seconds(repeats)
            w.model.load_state_dict(state)
    rows = []
    base = 1 / statistics.median(times[REFERENCE])
    higher = 1 / statistics.median(times["higher"]) if "higher" in times else float("nan")
    for name in names:
        if name in skipped:
            rows.append({"workload": w.name, "impl": name, "note": skipped[name]})
            continue
        rate = 1 / statistics.median(times[name])
        rows.append({
            "workload": w.name, "impl": name, "rate": rate, "vs_ref": rate / base,
            "vs_higher": rate / higher, "grad_diff": diffs[name],
        })
    return rows


def memory(w: Workload, names: list[str]) -> list[dict]:
    """Returns the peak bytes saved by autograd during one meta-step, with and without tracking."""
    rows = []
    for track in (True, False):
        steps, _ = _build(w, names, track)
        for name, step in steps.items():
            w.model.zero_grad(set_to_none=True)
            meter = GraphMemory()
            with meter.track():
                step()
            rows.append({"workload": w.name, "impl": name, "track": track, "K": w.steps, "peak_mb": meter.peak / 2**20})
    return rows


def _speed_table(rows: list[dict]) -> str:
    lines = ["| workload | implementation | meta-steps/s | vs plain PyTorch | vs higher | max abs grad diff (max abs grad) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['workload']} | {r['impl']} | {r['note']} | | | |")
        else:
            lines.append(f"| {r['workload']} | {r['impl']} | {r['rate']:.2f} | {r['vs_ref']:.2f}x | "
                         f"{r['vs_higher']:.2f}x | {r['grad_diff'][0]:.1e} ({r['grad_diff'][1]:.1e}) |")
    return "\n".join(lines)


def _memory_table(rows: list[dict]) -> str:
    ks = sorted({r["K"] for r in rows})
    lines = ["| implementation | track_higher_grads | " + " | ".join(f"K={k} (MB)" for k in ks) + " |",
             "|---|---|" + "---:|" * len(ks)]
    keys = sorted({(r["impl"], r["track"]) for r in rows}, key=lambda t: (t[0], not t[1]))
    for impl, track in keys:
        values = {r["K"]: r["peak_mb"] for r in rows if r["impl"] == impl and r["track"] == track}
        lines.append(f"| {impl} | {track} | " + " | ".join(f"{values[k]:.1f}" for k in ks) + " |")
    return "\n".join(lines)


def _plot(speed_rows: list[dict], memory_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    rows = [r for r in speed_rows if "rate" in r]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        values = [next((r["vs_ref"] for r in rows if r["workload"] == wl and r["impl"] == impl), 0) for wl in workloads]
        ax1.bar([i + j * width for i in range(len(workloads))], values, width, label=impl)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads, rotation=30, ha="right", fontsize=7)
    ax1.set_ylabel("meta-steps/s relative to plain PyTorch")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    for impl, track in sorted({(r["impl"], r["track"]) for r in memory_rows}):
        pts = sorted((r["K"], r["peak_mb"]) for r in memory_rows if r["impl"] == impl and r["track"] == track)
        ax2.plot(*zip(*pts), marker="o", linestyle="-" if track else "--", label=f"{impl} track={track}")
    ax2.set_xlabel("inner steps K")
    ax2.set_ylabel("peak autograd-saved MB")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", choices=["sinusoid", "omniglot", "memory"], action="append")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    parts = args.only or ["sinusoid", "omniglot", "memory"]
    names = list(IMPLEMENTATIONS)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(header)
    speed_rows: list[dict] = []
    if "sinusoid" in parts:
        ks = [5] if args.quick else [1, 5, 10]
        for inner in ("sgd", "adam"):
            for k in ks:
                speed_rows += speed(sinusoid_workload(25, k, inner), names, args.repeats or (5 if args.quick else 9))
                print(_speed_table(speed_rows[-len(names):]), flush=True)
    if "omniglot" in parts:
        configs = [(16, 1)] if args.quick else [(16, 1), (32, 1), (16, 5), (32, 5)]
        for tasks, k in configs:
            speed_rows += speed(omniglot_workload(tasks, k), names, args.repeats or 3)
            print(_speed_table(speed_rows[-len(names):]), flush=True)
    memory_rows: list[dict] = []
    if "memory" in parts:
        mem_names = ["higher", "plain PyTorch", "metaloop ctx", "Lightning sequential"]
        for k in [1, 5, 10, 20]:
            memory_rows += memory(omniglot_workload(2, k), mem_names)
    report = [header, "", "## Speed", "", _speed_table(speed_rows)] if speed_rows else [header]
    if memory_rows:
        report += ["", "## Peak autograd memory, Omniglot conv net, 2 tasks", "", _memory_table(memory_rows)]
    text = "\n".join(report) + "\n"
    print(text)
    (args.out / "results.md").write_text(text)
    _plot(speed_rows, memory_rows, args.out / "benchmarks.png")
    print(f"wrote {args.out / 'results.md'} and {args.out / 'benchmarks.png'}")


if __name__ == "__main__":
    main()
