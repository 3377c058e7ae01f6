"""Second-order MAML on the Omniglot conv-4 (BatchNorm on batch statistics): vmapped with exact BatchNorm vs task by task.

``OMP_NUM_THREADS=2 python -m benchmarks.batched_second_order [--tasks 16] [--steps 2] [--repeats 3] [--device cpu]``:
times :meth:`~metaloop.algorithms.MetaLightningModule.meta_gradient` (the body of ``training_step``) for
``batch_tasks="sequential"`` and ``"vmap"`` in alternation (background load hits both alike), prints milliseconds
per meta-step (median) and the ratio, and checks the two meta-gradients agree (float32, relative 1e-3).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from benchmarks.workloads import omniglot_workload
from metaloop.algorithms import Classification, InnerOptions, MetaLightningModule
from metaloop.nn import Conv4
from metaloop.tasks import Task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--first-order", action="store_true", help="first-order MAML instead (for comparison)")
    args = parser.parse_args(argv)
    w = omniglot_workload(args.tasks, args.steps)
    batch = Task(*(t.to(args.device) for t in (w.support_x, w.support_y, w.query_x, w.query_y)))
    modules, times, grads = {}, {"sequential": [], "vmap": []}, {}
    for mode in times:
        torch.manual_seed(0)
        modules[mode] = MetaLightningModule(Conv4(5), Classification(), InnerOptions(steps=args.steps, batch_tasks=mode, first_order=args.first_order), functools.partial(torch.optim.SGD, lr=0.4), functools.partial(torch.optim.Adam, lr=1e-3)).to(args.device)
    for repeat in range(args.repeats + 1):  # the first round warms up
        for mode, module in modules.items():
            module.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            module.meta_gradient(batch)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if repeat:
                times[mode].append(time.perf_counter() - start)
            grads[mode] = torch.cat([p.grad.flatten() for p in module.parameters()])
    error = ((grads["vmap"] - grads["sequential"]).norm() / grads["sequential"].norm()).item()
    seq, vm = (statistics.median(times[m]) * 1e3 for m in ("sequential", "vmap"))
    order = "first" if args.first_order else "second"
    print(f"conv-4 {order}-order MAML, meta-batch {args.tasks}, {args.steps} inner steps, {args.device}, "
          f"{torch.get_num_threads()} threads: task by task {seq:.0f} ms, vmapped {vm:.0f} ms per meta-step: "
          f"{seq / vm:.2f}x; relative difference of the meta-gradients {error:.1e}")
    assert error < 1e-3, error  # float32 rounding; tests/nn/test_plain_norms.py checks 1e-10 in float64


if __name__ == "__main__":
    main()
