"""Tasks sampled per second: learn2learn's ``Taskset`` pipelines (metaloop.compat) vs metaloop's ``EpisodeSampler``, same data.

Run ``python -m benchmarks.l2l_data`` (about 30 s on 2 CPU cores, one torch thread as metaloop runs by default). The dataset is the bundled
Omniglot (4,840 images of 242 characters, 28x28), held as float tensors for the Taskset (as
learn2learn's Omniglot benchmark holds it after ``OnDeviceDataset``) and as uint8 for the sampler.
Every task is 5-way with 1 support + 15 query samples per class (80 images). Each row is the
median over interleaved repeats of drawing ``--tasks`` tasks, so background load hits all rows alike.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.data import TensorDataset

from metaloop.compat.learn2learn.data import MetaDataset, Taskset
from metaloop.compat.learn2learn.data.transforms import ConsecutiveLabels, FusedNWaysKShots, KShots, LoadData, NWays, RemapLabels
from metaloop.compat.learn2learn.vision.transforms import RandomClassRotation
from metaloop.tasks import EpisodeSampler, Omniglot, sample_meta_batch, sample_task

WAYS, SHOTS, QUERIES, META_BATCH = 5, 1, 15, 32


def tasks_per_second(cases: dict[str, Callable[[int], object]], tasks: int, repeats: int) -> dict[str, float]:
    """Returns each case's median tasks per second; ``case(n)`` draws ``n`` tasks."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for draw in cases.values():
        draw(META_BATCH)  # warm-up
    for _ in range(repeats):
        for name, draw in cases.items():
            start = time.perf_counter()
            draw(tasks)
            times[name].append(time.perf_counter() - start)
    return {name: tasks / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=256, help="tasks drawn per timed repeat (a multiple of 32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (metaloop's default, threads=1: tiny ops lose to thread wake-ups)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    omniglot = Omniglot()
    meta = MetaDataset(TensorDataset(omniglot.images.float().div(255), omniglot.targets))
    k = SHOTS + QUERIES

    def taskset(transforms: list[object]) -> Callable[[int], object]:
        ts = Taskset(meta, transforms, num_tasks=-1)
        return lambda n: [ts.sample() for _ in range(n)]

    documented = [NWays(meta, WAYS), KShots(meta, k), LoadData(meta), RemapLabels(meta), ConsecutiveLabels(meta)]
    fused = [FusedNWaysKShots(meta, n=WAYS, k=k), LoadData(meta), RemapLabels(meta), ConsecutiveLabels(meta)]
    rotated = [*fused, RandomClassRotation(meta, [0.0, 90.0, 180.0, 270.0])]
    plain = EpisodeSampler(omniglot, n_ways=WAYS, k_shots=SHOTS, k_queries=QUERIES, splits=[1.0, 0.0, 0.0])
    turns = EpisodeSampler(omniglot, n_ways=WAYS, k_shots=SHOTS, k_queries=QUERIES, splits=[1.0, 0.0, 0.0], rotations=(0, 90, 180, 270))

    def one_by_one(sampler: EpisodeSampler) -> Callable[[int], object]:
        return lambda n: [sample_task(sampler, "train", 0, i) for i in range(n)]

    def batched(sampler: EpisodeSampler) -> Callable[[int], object]:
        return lambda n: [sample_meta_batch(sampler, "train", 0, range(i, i + META_BATCH)) for i in range(0, n, META_BATCH)]

    cases = {
        "l2l Taskset: NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels (the documented pipeline)": taskset(documented),
        "l2l Taskset: FusedNWaysKShots, LoadData, RemapLabels, ConsecutiveLabels": taskset(fused),
        "l2l Taskset: FusedNWaysKShots ... + RandomClassRotation (learn2learn's Omniglot benchmark)": taskset(rotated),
        "EpisodeSampler, task by task (sample_task)": one_by_one(plain),
        "EpisodeSampler, task by task, class rotations": one_by_one(turns),
        f"EpisodeSampler, meta-batches of {META_BATCH} (sample_meta_batch)": batched(plain),
        f"EpisodeSampler, meta-batches of {META_BATCH}, class rotations": batched(turns),
    }
    results = tasks_per_second(cases, args.tasks, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; bundled Omniglot"
          f" ({len(omniglot)} images, {len(meta.labels)} classes); {WAYS}-way {SHOTS}+{QUERIES} per class;"
          f" median of {args.repeats} x {args.tasks} tasks\n")
    print("| sampler | tasks / s |\n|---|---:|")
    for name, rate in results.items():
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
