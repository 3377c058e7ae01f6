"""One meta-step of MetaLightningModule under DDP on 2 CPU processes (gloo); rank 0 saves the updated parameters.

Run by ``test_ddp.py`` as ``python ddp_worker.py OUT.pt``: Lightning's ``ddp`` launcher re-runs this script for
rank 1, which cannot happen inside pytest. :func:`build` and :func:`union_batch` are shared with the test's
single-process reference run.
"""

from __future__ import annotations

import functools
import os
import sys

import lightning
import torch

from metaloop.algorithms import InnerOptions
from metaloop.lightning import MLP, MetaDataModule, MetaLightningModule, PerElement, Regression, Shared
from metaloop.tasks import SinusoidTasks, Task, sample_meta_batch

META_BATCH = 3
SEED = 0
CASES = {
    # the sequential path (one backward per task, no all-reduce before the last) with Meta-SGD and Meta-Curvature
    "sequential": {"batch_tasks": "sequential", "learnable": {"lr": PerElement()}, "metacurvature": True},
    # the vmap path (one backward) with a learned shared inner learning rate
    "vmap": {"batch_tasks": "vmap", "learnable": {"lr": Shared()}, "metacurvature": False},
}


def build(case: str) -> MetaLightningModule:
    """Returns a freshly initialised module for ``case`` (the same weights in every process)."""
    options = CASES[case]
    torch.manual_seed(0)
    if options["metacurvature"]:
        from metaloop.transforms import MetaCurvatureTransform, TransformOptimizer

        inner = functools.partial(TransformOptimizer, transform=MetaCurvatureTransform, lr=0.05)
    else:
        inner = functools.partial(torch.optim.SGD, lr=0.05)
    return MetaLightningModule(MLP([1, 8, 8, 1]), Regression(), InnerOptions(steps=2, batch_tasks=options["batch_tasks"]), inner, functools.partial(torch.optim.SGD, lr=0.1), learnable=options["learnable"])


def tasks() -> SinusoidTasks:
    return SinusoidTasks(k_shots=5, k_queries=5)


def union_batch() -> Task:
    """Returns the first training meta-batches of ranks 0 and 1 as one meta-batch."""
    parts = [sample_meta_batch(tasks(), "train", SEED, range(META_BATCH), stream=rank) for rank in (0, 1)]
    return Task(*(torch.cat(fields) for fields in zip(*parts)))


def main(out: str) -> None:
    torch.set_num_threads(1)
    results = {}
    for case in CASES:
        module = build(case)
        datamodule = MetaDataModule(tasks(), meta_batch_size=META_BATCH, num_val_tasks=0, num_test_tasks=0, seed=SEED)
        trainer = lightning.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module, datamodule)
        results[case] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        # the next Trainer joins the process group this one started instead of launching new processes
        os.environ.setdefault("LOCAL_RANK", "0")
    if trainer.global_rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
