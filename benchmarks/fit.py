"""Times what users run: ``metaloop fit`` end to end, against a hand-written vmapped MAML loop and an older checkout.

Run ``python -m benchmarks.fit`` (several minutes on 2 CPU cores; ``--quick`` for fewer steps) and
``--base DIR`` to time another checkout of metaloop (e.g. ``git archive da7d4f8 | tar -x -C DIR``)
side by side, alternating runs so background load affects both alike. Each ``metaloop fit`` runs
in its own process on one thread (``OMP_NUM_THREADS=1``, the recipes' ``threads: 1``), without
validation and test. Two rates per run:

- *excluding start-up*: ``(N2 - N1) / (T2 - T1)`` from two runs of N1 and N2 meta-steps (process
  start, imports, config, Lightning's set-up and the first steps cancel out); the same arithmetic
  for any checkout, so old and new are measured alike;
- *including start-up*: ``N2 / T2``, the whole process.

The hand-written loops run the same MAML step, drawing their tasks inline with ``torch.rand`` (what a
user writes: the target of issue 21) or sampling the same tasks as the fit (the same
:class:`~metaloop.tasks.TaskStream`): ``torch.func.vmap`` over tasks of ``inner.steps`` SGD steps by
``torch.func.grad``, one backward of the mean query loss, one Adam step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metaloop.nn import MLP
from metaloop.tasks import SinusoidTasks, TaskStream

ROOT = Path(__file__).resolve().parents[1]
SINUSOID = ["--config", "maml_sinusoid.yaml", "inner.steps=5"]
OMNIGLOT = ["--config", "maml_omniglot.yaml"]
_QUIET = ["task.num_val_tasks=0", "task.num_test_tasks=0", "trainer.val_check_interval=1000000"]


def fit_seconds(args: list[str], steps: int, code: Path | None = None) -> tuple[float, float | None]:
    """Returns the wall seconds of one ``metaloop fit ARGS trainer.max_steps=steps`` process, and its own training rate.

    ``code`` is another checkout's root, put first on ``PYTHONPATH`` (its configs and recipes come with it);
    the rate is ``results.json``'s ``meta_steps_per_s`` where the checkout writes one.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    with tempfile.TemporaryDirectory() as run:
        command = [sys.executable, "-m", "metaloop", "fit", *args, *_QUIET, f"trainer.max_steps={steps}", f"hydra.run.dir={run}"]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=run, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        results = Path(run) / "results.json"  # older checkouts write none
        record = json.loads(results.read_text()) if results.is_file() else {}
    return seconds, record.get("meta_steps_per_s")


def fit_rates(args: list[str], short: int, long: int, repeats: int, codes: dict[str, Path | None]) -> dict[str, dict[str, float]]:
    """Returns per checkout: meta-steps/s excluding start-up, including it, and the run's own timer (medians over ``repeats``)."""
    samples: dict[str, dict[str, list[float]]] = {name: {"excl": [], "incl": [], "timer": []} for name in codes}
    for _ in range(repeats):
        for name, code in codes.items():  # alternate checkouts: background load affects both alike
            t_short, _ = fit_seconds(args, short, code)
            t_long, timer = fit_seconds(args, long, code)
            samples[name]["excl"].append((long - short) / (t_long - t_short))
            samples[name]["incl"].append(long / t_long)
            if timer is not None:
                samples[name]["timer"].append(timer)
    return {name: {k: statistics.median(v) if v else float("nan") for k, v in s.items()} for name, s in samples.items()}


def _hand_written_maml_step(inner_steps: int, seed: int) -> Callable[[Tensor, Tensor, Tensor, Tensor], None]:
    """Returns a hand-written MAML meta-step on the 1-40-40-1 MLP: ``torch.func.vmap`` over tasks of ``inner_steps`` SGD
    steps (lr 0.01) by ``torch.func.grad``, second order, one backward of the mean query loss, one Adam step (lr 1e-3)."""
    torch.manual_seed(seed)
    model = MLP()
    names = [n for n, _ in model.named_parameters()]
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def task_loss(params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        def support(p: dict[str, Tensor]) -> Tensor:
            return nn.functional.mse_loss(functional_call(model, p, (sx,)), sy)

        for _ in range(inner_steps):
            g = grad(support)(params)
            params = {n: params[n] - 0.01 * g[n] for n in names}
        return nn.functional.mse_loss(functional_call(model, params, (qx,)), qy)

    def meta_step(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> None:
        outer.zero_grad()
        params = dict(model.named_parameters())
        vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy).mean().backward()
        outer.step()

    return meta_step


def _rate(meta_step: Callable[[int], None], steps: int) -> float:
    """Returns meta-steps/s of ``meta_step(1) .. meta_step(steps)``, after ``meta_step(0)`` as a warm-up."""
    meta_step(0)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        meta_step(i)
    return steps / (time.perf_counter() - start)


def hand_written_sinusoid(steps: int, inner_steps: int = 5, presampled: bool = False, seed: int = 0) -> float:
    """Returns meta-steps/s of a hand-written MAML loop on maml_sinusoid.yaml's tasks (one thread).

    ``presampled`` draws all meta-batches before the clock starts (the loop's math alone).
    """
    step = _hand_written_maml_step(inner_steps, seed)
    stream = iter(TaskStream(SinusoidTasks(10, 10), "train", 25, seed))
    batches = [next(stream) for _ in range(steps + 1)] if presampled else None
    return _rate(lambda i: step(*(batches[i] if batches is not None else next(stream))), steps)


def hand_written_inline_sinusoid(steps: int, inner_steps: int = 5, seed: int = 0) -> float:
    """Returns meta-steps/s of the loop a user writes by hand, drawing its tasks inline with ``torch.rand`` (one thread).

    25 tasks of 10 support and 10 query points, amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]; the
    step of :func:`_hand_written_maml_step`.
    """
    step = _hand_written_maml_step(inner_steps, seed)
    tasks, points = 25, 10

    def meta_step(i: int) -> None:
        amplitude = 0.1 + 4.9 * torch.rand(tasks, 1, 1)
        phase = torch.pi * torch.rand(tasks, 1, 1)
        x = 10 * torch.rand(tasks, 2 * points, 1) - 5
        y = amplitude * torch.sin(x - phase)
        step(x[:, :points], y[:, :points], x[:, points:], y[:, points:])

    return _rate(meta_step, steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer meta-steps and repeats")
    parser.add_argument("--base", type=Path, default=None, help="another checkout of metaloop to time side by side")
    parser.add_argument("--only", choices=["sinusoid", "omniglot"], action="append")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    codes: dict[str, Path | None] = {"this checkout": None}
    if args.base is not None:
        codes = {f"base ({args.base.name})": args.base.resolve(), **codes}
    repeats = args.repeats or (1 if args.quick else 3)
    lines = ["| workload | implementation | meta-steps/s excl. start-up | incl. start-up | run's own timer |", "|---|---|---:|---:|---:|"]
    parts = args.only or ["sinusoid", "omniglot"]
    if "sinusoid" in parts:
        short, long = (50, 250) if args.quick else (200, 1200)
        runs, hand, pre, inline = [], [], [], []
        for _ in range(repeats):  # the hand-written loops between the fits: the same background load
            runs.append(fit_rates(SINUSOID, short, long, 1, codes))
            inline.append(hand_written_inline_sinusoid(long - short))
            hand.append(hand_written_sinusoid(long - short))
            pre.append(hand_written_sinusoid(long - short, presampled=True))
        rates = {name: {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]} for name in codes}
        for name, r in rates.items():
            lines.append(f"| sinusoid inner.steps=5 | `metaloop fit` ({name}) | {r['excl']:.1f} | {r['incl']:.1f} | {r['timer']:.1f} |")
        ratio = {name: r["timer"] / statistics.median(inline) for name, r in rates.items()}
        lines.append(f"| sinusoid inner.steps=5 | hand-written vmap loop, tasks drawn inline with torch.rand | {statistics.median(inline):.1f} | | |")
        lines.append(f"| sinusoid inner.steps=5 | hand-written vmap loop, tasks sampled in the loop (TaskStream) | {statistics.median(hand):.1f} | | |")
        lines.append(f"| sinusoid inner.steps=5 | hand-written vmap loop, tasks sampled beforehand | {statistics.median(pre):.1f} | | |")
        print("\n".join(lines), flush=True)
        for name, r in ratio.items():
            print(f"`metaloop fit` ({name}) training meta-steps/s (its own timer) / the inline hand-written loop: {r:.2f}x")
    if "omniglot" in parts:
        short, long = (1, 3) if args.quick else (2, 8)
        rates = fit_rates(OMNIGLOT, short, long, repeats, codes)
        for name, r in rates.items():
            lines.append(f"| omniglot 5w1s meta-batch 32 | `metaloop fit` ({name}) | {r['excl']:.3f} | {r['incl']:.3f} | {r['timer']:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
