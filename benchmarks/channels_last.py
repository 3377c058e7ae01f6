"""Channels-last vs NCHW for the Omniglot conv net's MAML meta-gradient on this machine's CPU: float32 and bf16, sequential and vmap.

Run ``OMP_NUM_THREADS=1 python -m benchmarks.channels_last`` (a few minutes; ``--tasks`` and
``--repeats`` to change). Each configuration builds a :class:`~metaloop.algorithms.MetaLightningModule`
with ``memory_format`` set and times its ``meta_gradient`` (the body of ``training_step``), under
``torch.autocast("cpu", torch.bfloat16)`` for bf16; configurations alternate (round robin) so
background load affects all alike, and the median is reported as milliseconds per task. The vmap
rows are first-order MAML (as in the measurement that chose AUTO_BATCHING; second order vmaps exactly now,
``python -m benchmarks.batched_second_order``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch

from benchmarks.workloads import omniglot_workload
from metaloop.algorithms import Classification, InnerOptions, MetaLightningModule
from metaloop.lightning.precision import bf16_fast
from metaloop.tasks import Task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    w = omniglot_workload(args.tasks, 1)
    batch = Task(w.support_x, w.support_y, w.query_x, w.query_y)
    steps, times = {}, {}
    for path in ("sequential", "vmap"):
        for bf16 in (False, True):
            for fmt in ("contiguous", "channels_last"):
                key = (path, "bf16" if bf16 else "float32", fmt)
                module = MetaLightningModule(w.model, Classification(), InnerOptions(first_order=path == "vmap", batch_tasks=path), functools.partial(torch.optim.SGD, lr=w.lr), functools.partial(torch.optim.Adam, lr=1e-3), memory_format=fmt)
                autocast = functools.partial(torch.autocast, "cpu", torch.bfloat16) if bf16 else contextlib.nullcontext

                def step(module: MetaLightningModule = module, autocast=autocast) -> None:
                    module.zero_grad(set_to_none=True)
                    with autocast():
                        module.meta_gradient(batch)

                step()  # warm-up (oneDNN primitives)
                steps[key], times[key] = step, []
    for _ in range(args.repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append((time.perf_counter() - start) / args.tasks * 1000)
    print(f"CPU bf16 hardware (AVX-512 BF16/AMX): {bf16_fast('cpu')}; torch {torch.__version__}; 1 thread; "
          f"omniglot 5-way 1-shot, 15 queries, {args.tasks} tasks, {args.repeats} repeats\n")
    print("| path | precision | NCHW ms/task | channels-last ms/task | channels-last speed-up |\n|---|---|---:|---:|---:|")
    for path in ("sequential", "vmap"):
        for precision in ("float32", "bf16"):
            nchw, cl = (path, precision, "contiguous"), (path, precision, "channels_last")
            a, b = statistics.median(times[nchw]), statistics.median(times[cl])
            print(f"| {path}{' (first-order)' if path == 'vmap' else ''} | {precision} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
