"""Time per inner step: differentiable Adam vs ``torch.optim.Adam`` on the sinusoid MLP.

Run ``python -m benchmarks.step_time``. Each step is forward + gradient + update on 10 points;
the differentiable one also builds the graph for second order (``track_higher_grads=True``)
or not (``False``, test mode).
"""

from __future__ import annotations

import statistics
import time

import torch

import metaloop
from benchmarks.workloads import sinusoid_mlp


def _median_us(fn, steps: int = 200, repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        samples.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(samples)


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(10, 1), torch.randn(10, 1)
    model = sinusoid_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def torch_step() -> None:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    rows = [("torch.optim.Adam (zero_grad, backward, step)", _median_us(torch_step))]
    for track in (False, True):
        def unroll(track: bool = track) -> None:
            with metaloop.innerloop_ctx(model, opt, track_higher_grads=track) as (fmodel, diffopt):
                for _ in range(10):
                    diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y))

        per_step = _median_us(unroll, steps=20) / 10
        rows.append((f"metaloop DifferentiableAdam, track_higher_grads={track}", per_step))
    print("| inner step on the 1-40-40-1 MLP, 10 points | µs per step |\n|---|---:|")
    for label, us in rows:
        print(f"| {label} | {us:.0f} |")


if __name__ == "__main__":
    main()
