"""Peak autograd memory and time of one meta-gradient: unrolled vs truncated vs implicit, at 5 to 50 inner steps.

Run ``python -m benchmarks.meta_grad_modes`` (``--out FILE`` also writes the Markdown table).
The workload is one Omniglot-shaped task (5-way 1-shot, 15 queries, random 28x28 images) on a
4-block conv net (32 filters, BatchNorm with batch statistics) adapted by SGD (lr 0.1); one
meta-gradient is the inner loop plus the query loss's backward to the initial weights, by
:func:`metaloop.optim.loop.inner_loop` (unrolled, or ``truncate=5``) and
:func:`metaloop.optim.implicit.implicit_inner_loop` (``lam=2``, conjugate gradient with 5
Hessian-vector products). Each configuration runs in a fresh process; see :func:`worker` for
what the memory columns count. Time is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from benchmarks.memory import GraphMemory
from metaloop.optim import OPTIMIZERS
from metaloop.optim.hyperparams import per_parameter
from metaloop.optim.implicit import ImplicitOptions, conjugate_gradient, implicit_inner_loop
from metaloop.optim.loop import inner_loop

STEPS = (5, 10, 20, 50)
TRUNCATE = 5
CG_ITERATIONS = 5


def conv_net(filters: int = 32, ways: int = 5) -> nn.Module:
    """Returns a 4-block conv net for 28x28 images (conv, BatchNorm with batch statistics, ReLU, max-pool)."""
    blocks: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        blocks += [nn.Conv2d(channels, filters, 3, padding=1), nn.BatchNorm2d(filters, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels = filters
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(filters, ways))


class CountingSolver:
    """Conjugate gradient that counts its Hessian-vector products (a user solver, as ImplicitOptions accepts)."""

    def __init__(self) -> None:
        self.products = 0

    def __call__(self, matvec: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], *, maxiter: int, tol: float) -> list[Tensor]:
        def counted(v: list[Tensor]) -> list[Tensor]:
            self.products += 1
            return matvec(v)

        return conjugate_gradient(counted, b, maxiter=maxiter, tol=tol)


def query_loss(mode: str, steps: int, model: nn.Module, task: tuple[Tensor, ...], solver: CountingSolver) -> Tensor:
    """Returns one task's query loss after adaptation in ``mode``, with the graph its meta-gradient needs."""
    sx, sy, qx, qy = task
    weights = dict(model.named_parameters())
    (hp,) = per_parameter(torch.optim.SGD([torch.zeros(1)], lr=0.1).param_groups[0])
    kwargs = dict(rule=OPTIMIZERS[torch.optim.SGD], hparams={n: hp for n in weights}, steps=steps)

    def support_loss(w: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, w, (sx,)), sy)

    if mode == "implicit":
        options = ImplicitOptions(lam=2.0, solver=solver, maxiter=CG_ITERATIONS, tol=0.0)
        adapted = implicit_inner_loop(support_loss, weights, options=options, **kwargs)
    else:
        adapted = inner_loop(support_loss, weights, truncate=TRUNCATE if mode == "truncated" else None, **kwargs)
    return nn.functional.cross_entropy(functional_call(model, adapted, (qx,)), qy)


def worker(mode: str, steps: int, repeats: int, threads: int) -> dict:
    """Returns one configuration's figures, measured in this (fresh) process.

    ``graph_mb``: the peak bytes autograd saves in the forward pass (inner loop and query loss),
    exact, by :class:`~benchmarks.memory.GraphMemory` (torch.func, which the implicit backward
    uses, refuses saved-tensor hooks, so the backward is not metered this way). ``rss_mb``: the
    rise of the process's peak resident memory over one whole meta-gradient, backward included
    (coarser: it includes allocator slack). ``seconds``: the median of ``repeats`` meta-gradients.
    """
    torch.set_num_threads(threads)
    model, task = workload()
    params = list(model.parameters())
    solver = CountingSolver()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    meter = GraphMemory()
    with meter.track():
        loss = query_loss(mode, steps, model, task, solver)
    torch.autograd.grad(loss, params)
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # kB on Linux
    del loss
    hvps = solver.products
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.autograd.grad(query_loss(mode, steps, model, task, solver), params)
        seconds.append(time.perf_counter() - start)
    return {"mode": mode, "steps": steps, "graph_mb": meter.peak / 2**20, "rss_mb": rss,
            "seconds": statistics.median(seconds), "hvps": hvps}


def workload() -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Returns the seeded conv net and one 5-way 1-shot task with 15 queries per class."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    task = (torch.rand(5, 1, 28, 28, generator=gen), torch.arange(5),
            torch.rand(75, 1, 28, 28, generator=gen), torch.arange(5).repeat_interleave(15))
    return conv_net(), task


def measure(mode: str, steps: int, repeats: int, threads: int) -> dict:
    """Returns :func:`worker`'s figures from a fresh Python process (so that peak memory starts clean)."""
    command = [sys.executable, "-m", "benchmarks.meta_grad_modes", "--worker", mode, str(steps),
               "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """Returns the rows as a Markdown table, with memory and time relative to the unrolled loop at the same steps."""
    unrolled = {r["steps"]: r for r in rows if r["mode"] == "unrolled"}
    lines = ["| inner steps | meta-gradient | forward graph MB | vs unrolled | peak RSS rise MB | s per meta-gradient "
             "| vs unrolled | HVPs |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = unrolled[r["steps"]]
        label = {"unrolled": "unrolled", "truncated": f"truncated (last {TRUNCATE})",
                 "implicit": f"implicit (CG, {CG_ITERATIONS} iterations)"}[r["mode"]]
        lines.append(f"| {r['steps']} | {label} | {r['graph_mb']:.1f} | {r['graph_mb'] / base['graph_mb']:.2f}x "
                     f"| {r['rss_mb']:.0f} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f}x | {r['hvps']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) to this file")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats, args.threads)))
        return
    rows = [measure(mode, steps, args.repeats, args.threads)
            for steps in args.steps for mode in ("unrolled", "truncated", "implicit")]
    header = (f"machine: {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
              "one 5-way 1-shot task, 4-block conv net (32 filters), inner SGD lr 0.1")
    report = f"{header}\n\n{table(rows)}\n"
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python -m benchmarks.meta_grad_modes", *(sys.argv[1:] if argv is None else argv)])
        args.out.write_text(f"# Meta-gradient modes: memory and time\n\nCommand: `{command}`\n\n{report}")


if __name__ == "__main__":
    main()
