"""Times task sampling against the MAML step it feeds; prints a Markdown table of ms per meta-batch.

Run ``python -m benchmarks.sampling`` (about 15 s on 2 CPU cores; ``--no-model-step`` skips the
slowest row). Omniglot is the bundled set, loaded through the default cache (the first run decodes
it). Every row is the median of interleaved repeats, so background load affects all alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from benchmarks.workloads import Workload, cross_entropy, omniglot_convnet, reference_impl
from metaloop.lightning import MetaDataModule
from metaloop.tasks import EpisodeSampler, Omniglot, SinusoidTasks, sample_meta_batch, sample_task, stack_tasks

META_BATCH = 32


def median_ms(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Returns each case's median wall time in ms over ``repeats`` round-robin runs (after one warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-model-step", action="store_true", help="skip timing the MAML step")
    args = parser.parse_args()

    start = time.perf_counter()
    omniglot = Omniglot()
    load_ms = (time.perf_counter() - start) * 1000
    five_way = EpisodeSampler(omniglot, n_ways=5, k_shots=1, k_queries=15, rotations=(0, 90, 180, 270))
    twenty_way = EpisodeSampler(omniglot, n_ways=20, k_shots=1, k_queries=5, rotations=(0, 90, 180, 270))
    sinusoid = SinusoidTasks(k_shots=10, k_queries=10)
    counter = iter(range(1_000_000))  # a fresh meta-batch every call

    def tasks() -> range:
        first = next(counter) * META_BATCH
        return range(first, first + META_BATCH)

    def batch(source: object) -> Callable[[], object]:
        return lambda: sample_meta_batch(source, "train", 0, tasks())

    def one_by_one() -> object:
        return stack_tasks([sample_task(five_way, "train", 0, i) for i in tasks()])

    loader = iter(MetaDataModule(five_way, meta_batch_size=META_BATCH).train_dataloader())
    cases: dict[str, Callable[[], object]] = {
        "Omniglot 5-way 1-shot 15-query, rotations (sample_meta_batch)": batch(five_way),
        "Omniglot 5-way 1-shot 15-query, rotations, task by task": one_by_one,
        "Omniglot 20-way 1-shot 5-query, rotations (sample_meta_batch)": batch(twenty_way),
        "Omniglot 5-way, MetaDataModule train loader, num_workers=0": lambda: next(loader),
        "Sinusoid K=10, 10 queries (sample_meta_batch)": batch(sinusoid),
    }
    results = median_ms(cases, args.repeats)
    if not args.no_model_step:
        tasks = sample_meta_batch(five_way, "train", 0, range(META_BATCH))
        workload = Workload("omniglot", omniglot_convnet(5), *tasks, steps=1, inner="sgd", lr=0.4, loss=cross_entropy)
        name = "MAML step it feeds: conv-4, 1 inner SGD step, second order (plain PyTorch)"
        results.update(median_ms({name: reference_impl(workload)}, max(3, args.repeats // 10)))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs;"
          f" Omniglot load {load_ms:.0f} ms; meta-batch of {META_BATCH} tasks; median of {args.repeats}\n")
    print("| case | ms per meta-batch |\n|---|---:|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
