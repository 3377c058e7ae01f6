"""MAML meta-steps/s and peak memory on one device: metaloop, higher and plain PyTorch, float32 and bf16-mixed, NCHW and channels-last.

Run ``python -m benchmarks.gpu --out DIR`` on a CUDA machine (about a minute on an H100/H200;
``--quick`` for fewer steps), or ``--device cpu --quick`` anywhere to check that it runs. It writes
``DIR/gpu.md`` (a Markdown table) and ``DIR/gpu.json``. Workloads, as the recipes run them:

- Omniglot conv-4 MAML, 5-way 1-shot, 15 queries, meta-batch 32, one inner SGD step (lr 0.4);
- sinusoid MAML, 1-40-40-1 MLP, 10 + 10 points, meta-batch 25, ``inner.steps=5`` SGD (lr 0.01).

Implementations: metaloop's :class:`~metaloop.algorithms.MetaLightningModule` (``training_step``
through a ``lightning.Trainer`` with the precision given to the Trainer, ``batch_tasks`` sequential,
vmap and fold: tasks folded into channels, ``metaloop.algorithms.folding``), higher's ``innerloop_ctx`` (skipped if not installed) and plain PyTorch (a
``functional_call`` + ``autograd.grad`` task loop, and a ``torch.func.vmap`` loop), the last two under
``torch.autocast`` for bf16. metaloop's vmap rows are second-order MAML like the others (BatchNorm
computed with plain operations under vmap, :func:`metaloop.nn.exact_norms`, since PyTorch's own rule is
wrong at second order: ``benchmarks/vmap_batchnorm_bug.py``); "plain PyTorch vmap" runs on the MLP
only, for the same reason. Each row: one warm-up meta-step, then the
median of ``--steps`` timed ones (the device synchronised after each); peak memory is
``torch.cuda.max_memory_allocated`` over the row (CPU: not measured). A row that fails records its
error and the others go on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning
import torch

from benchmarks.workloads import (
    IMPLEMENTATIONS,
    Workload,
    fit_step_seconds,
    lightning_module,
    omniglot_workload,
    sinusoid_workload,
)
from metaloop.lightning.precision import to_memory_format
from metaloop.tasks import Task


def on_device(w: Workload, device: torch.device, channels_last: bool) -> Workload:
    """Returns ``w`` with its model and tasks on ``device``, images (and conv weights) channels-last if asked."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = w.model.to(device).to(memory_format=fmt)
    moved = {f: to_memory_format(getattr(w, f).to(device), fmt) for f in ("support_x", "support_y", "query_x", "query_y")}
    return dataclasses.replace(w, model=model, **moved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Synchronize(lightning.Callback):
    """Waits for the device at the end of each meta-step, so a step's time holds its kernels."""

    def on_train_batch_end(self, trainer: lightning.Trainer, *args: object) -> None:
        _sync(trainer.strategy.root_device)


@contextlib.contextmanager
def _peak_memory(device: torch.device, out: dict) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def loop_seconds(step: Callable[[], None], w: Workload, device: torch.device, bf16: bool, steps: int) -> list[float]:
    """Returns the seconds of ``steps`` meta-steps of a hand-written or higher loop (after one warm-up), under autocast for bf16."""
    times = []
    for i in range(steps + 1):
        w.model.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            step()
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return times


def metaloop_seconds(w: Workload, batch_tasks: str, device: torch.device, bf16: bool, channels_last: bool, steps: int) -> list[float]:
    """Returns the seconds of ``steps`` meta-steps of MetaLightningModule.training_step run by a Trainer on ``device``."""
    module = lightning_module(w, batch_tasks, first_order=False,
                              memory_format="channels_last" if channels_last else "contiguous")
    batch = Task(w.support_x, w.support_y, w.query_x, w.query_y)
    return fit_step_seconds(module, batch, steps, callbacks=[_Synchronize()], accelerator=device.type, devices=1,
                            precision="bf16-mixed" if bf16 else "32-true")


def rows_of(w: Workload, device: torch.device, steps: int) -> Iterator[dict]:
    """Yields one result row per implementation, precision and memory format of workload ``w``."""
    conv = any(isinstance(m, torch.nn.Conv2d) for m in w.model.modules())
    for channels_last in ((False, True) if conv else (False,)):
        for bf16 in (False, True):
            impls: dict[str, Callable[[Workload], list[float]]] = {
                "metaloop sequential": lambda v: metaloop_seconds(v, "sequential", device, bf16, channels_last, steps),
                "metaloop vmap": lambda v: metaloop_seconds(v, "vmap", device, bf16, channels_last, steps),
                "metaloop fold": lambda v: metaloop_seconds(v, "fold", device, bf16, channels_last, steps),
                "higher": lambda v: loop_seconds(IMPLEMENTATIONS["higher"](v), v, device, bf16, steps),
                "plain PyTorch": lambda v: loop_seconds(IMPLEMENTATIONS["plain PyTorch"](v), v, device, bf16, steps),
            }
            if not conv:
                impls["plain PyTorch vmap"] = lambda v: loop_seconds(IMPLEMENTATIONS["plain PyTorch vmap"](v), v, device, bf16, steps)
            for name, run in impls.items():
                row = {"workload": w.name, "impl": name, "precision": "bf16-mixed" if bf16 else "32-true",
                       "channels_last": channels_last if conv else None}
                state = {k: v.clone() for k, v in w.model.state_dict().items()}
                try:
                    with _peak_memory(device, row):
                        times = run(on_device(w, device, channels_last))
                    row["rate"] = 1 / statistics.median(times)
                except ImportError as err:
                    row["note"] = f"not installed ({err.name})"
                except Exception as err:  # noqa: BLE001 - one failing row must not lose the others
                    row["note"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    traceback.print_exc()
                w.model.load_state_dict(state)
                print(row, flush=True)
                yield row


def table(rows: list[dict]) -> str:
    """Returns the rows as Markdown, with each rate relative to plain PyTorch's in the same precision and format."""
    lines = ["| workload | implementation | precision | channels-last | meta-steps/s | vs plain PyTorch | peak MiB |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        cl = "" if r["channels_last"] is None else ("yes" if r["channels_last"] else "no")
        if "rate" not in r:
            lines.append(f"| {r['workload']} | {r['impl']} | {r['precision']} | {cl} | {r.get('note', '')} | | |")
            continue
        ref = next((q.get("rate") for q in rows if q["workload"] == r["workload"] and q["impl"] == "plain PyTorch"
                    and q["precision"] == r["precision"] and q["channels_last"] == r["channels_last"]), None)
        ratio = f"{r['rate'] / ref:.2f}x" if ref else ""
        lines.append(f"| {r['workload']} | {r['impl']} | {r['precision']} | {cl} | {r['rate']:.2f} | {ratio} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.md and gpu.json")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small meta-batches and 2 timed steps (a check that it runs)")
    parser.add_argument("--steps", type=int, default=None, help="timed meta-steps per row (default 5; --quick 2)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device is visible; pass --device cpu to check the script on CPU")
    steps = args.steps or (2 if args.quick else 5)
    torch.backends.cudnn.benchmark = True
    workloads = [omniglot_workload(4 if args.quick else 32, 1), sinusoid_workload(25, 5, "sgd")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    header = f"device: {name}, torch {torch.__version__}, lightning {lightning.__version__}, {steps} timed meta-steps per row"
    print(header, flush=True)
    rows = [row for w in workloads for row in rows_of(w, device, steps)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    text = f"{header}\n\n{table(rows)}\n"
    (args.out / "gpu.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'gpu.md'} and {args.out / 'gpu.json'}")


if __name__ == "__main__":
    main()
