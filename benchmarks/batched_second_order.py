"""Second-order MAML on the Omniglot conv-4 (BatchNorm on batch statistics): folded and vmapped vs task by task.

``OMP_NUM_THREADS=2 python -m benchmarks.batched_second_order [--tasks 16] [--steps 2] [--repeats 3] [--device cpu]``:
times :meth:`~metaloop.algorithms.MetaLightningModule.meta_gradient` (the body of ``training_step``) for
``batch_tasks="sequential"``, ``"fold"`` (tasks folded into channels) and ``"vmap"`` (exact BatchNorm under vmap) in
alternation (background load hits all alike), prints milliseconds per meta-step (median) and each batched path's
speed-up over task by task, and checks the meta-gradients agree (float32, relative 1e-3; the tests check 1e-10 in
float64: tests/algorithms/test_folding.py, tests/nn/test_plain_norms.py).
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
    modules, times, grads = {}, {"sequential": [], "fold": [], "vmap": []}, {}
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
    seq = statistics.median(times["sequential"]) * 1e3
    order = "first" if args.first_order else "second"
    print(f"conv-4 {order}-order MAML, meta-batch {args.tasks}, {args.steps} inner steps, {args.device}, "
          f"{torch.get_num_threads()} threads: task by task {seq:.0f} ms per meta-step")
    for mode in ("fold", "vmap"):
        error = ((grads[mode] - grads["sequential"]).norm() / grads["sequential"].norm()).item()
        ms = statistics.median(times[mode]) * 1e3
        print(f"  {mode:>4}: {ms:.0f} ms, {seq / ms:.2f}x task by task; relative difference of the meta-gradients {error:.1e}")
        assert error < 1e-3, (mode, error)


if __name__ == "__main__":
    main()
