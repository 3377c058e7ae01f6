"""Cross-alphabet one-shot: 20-way 1-shot classification of characters from alphabets never seen in training.

Trains a recipe (default ``maml_omniglot.yaml``, 5-way 1-shot) on the bundled minimal splits with the
characters split by alphabet: five alphabets train, Greek validates, and Balinese (24 characters) and
Early Aramaic (22) are held out. Then, through ``MetaLightningModule.adapt(support, n_ways=20)``, it
adapts the trained model to 20-way episodes drawn within one held-out alphabet (20 of its characters,
one image each, unrotated; 5 query images per character) and scores the query accuracy. Chance is 5%.
Writes ``reports/cross_alphabet.md`` and ``reports/cross_alphabet.png`` (validation accuracy).

    python -m reports.cross_alphabet --steps 150 --meta-batch 8 --episodes 600
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metaloop.lightning import MetaLightningModule
from metaloop.lightning.checkpoint import load_checkpoint
from metaloop.lightning.module import MeanWithConfidence
from metaloop.tasks import EpisodeSampler, Omniglot, sample_task
from reports import REPORT_DIR, RUN_DIR, metaloop_run, plot_curves, table, write_report

SPLITS = {
    "train": ["Japanese_(katakana)", "Korean", "Latin", "Sanskrit", "Tagalog"],
    "val": ["Greek"],
    "test": ["Balinese", "Early_Aramaic"],
}
WAYS = 20


def load_module(run_dir: Path, device: str) -> MetaLightningModule:
    """Returns the module of a ``metaloop fit`` run folder: built from its Hydra config, weights from its last checkpoint."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    module = instantiate(cfg.module, _convert_="partial")
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # weights_only: a checkpoint runs no code
    module.load_state_dict(checkpoint["state_dict"])
    return module.to(device).eval()


def evaluate(module: MetaLightningModule, alphabet: str, episodes: int, queries: int, seed: int) -> torch.Tensor:
    """Returns the query accuracy of each of ``episodes`` fixed 20-way 1-shot episodes within ``alphabet``."""
    sampler = EpisodeSampler(
        Omniglot(), n_ways=WAYS, k_shots=1, k_queries=queries, splits={"test": [alphabet]}, split_by="alphabet"
    )
    accuracies = []
    for index in range(episodes):
        support_x, support_y, query_x, query_y = (t.to(module.device) for t in sample_task(sampler, "test", seed, index))
        fmodel = module.adapt((support_x, support_y), n_ways=WAYS)
        with torch.no_grad():
            accuracies.append((fmodel(query_x).argmax(-1) == query_y).float().mean().cpu())
    return torch.stack(accuracies)


def percent(accuracies: torch.Tensor) -> str:
    """Returns "mean ± 95% half-width" of accuracies in [0, 1], in percent."""
    interval = MeanWithConfidence()
    interval.update(accuracies)
    mean, half = interval.compute()
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="maml_omniglot", help="the recipe to train on the alphabet split")
    parser.add_argument("--steps", type=int, default=150, help="meta-steps (a finished run folder is loaded, not retrained)")
    parser.add_argument("--meta-batch", type=int, default=8, help="tasks per meta-step")
    parser.add_argument("--episodes", type=int, default=600, help="test episodes, shared evenly by the held-out alphabets")
    parser.add_argument("--queries", type=int, default=5, help="query images per character")
    parser.add_argument("--val-tasks", type=int, default=32)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--runs", type=Path, default=RUN_DIR / "cross_alphabet", help="where the run folder goes")
    parser.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    run_dir = args.runs / args.recipe
    splits = ",".join(f"{split}:[{','.join(repr(a) for a in names)}]" for split, names in SPLITS.items())
    metaloop_run("fit", args.recipe, run_dir, [
        f"trainer={args.device}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={max(1, args.steps // 5)}",
        f"task.meta_batch_size={args.meta_batch}",
        f"task.num_val_tasks={args.val_tasks}",
        "task.num_test_tasks=0",
        "task.datamodule.tasks.split_by=alphabet",
        # a mapping of alphabets replaces the recipe's list of fractions: delete the key, then add it
        "~task.datamodule.tasks.splits",
        f"+task.datamodule.tasks.splits={{{splits}}}",
    ])
    torch.set_num_threads(1)
    module = load_module(run_dir, "cuda" if args.device == "gpu" else "cpu")
    groups = Omniglot().class_groups["alphabet"]
    scores = {a: evaluate(module, a, args.episodes // len(SPLITS["test"]), args.queries, seed=0) for a in SPLITS["test"]}
    rows = [[a, str(groups.count(a)), str(len(acc)), percent(acc)] for a, acc in scores.items()]
    everything = torch.cat(list(scores.values()))
    rows.append(["all held-out", str(sum(groups.count(a) for a in scores)), str(len(everything)), percent(everything)])

    header = ["held-out alphabet", "characters", "episodes", f"{WAYS}-way 1-shot accuracy % (95% CI)"]
    body = (
        table(header, rows)
        + f"\n\nChance: {100 / WAYS:.0f}%. Model: `{args.recipe}.yaml` (trained as 5-way 1-shot with rotations) for"
        + f" {args.steps:,} meta-steps of {args.meta_batch} tasks on the alphabets {', '.join(SPLITS['train'])}"
        + f" (validation: {', '.join(SPLITS['val'])}); adapted with `module.adapt(support, n_ways={WAYS})`"
        + f" ({module.eval_inner_steps} inner steps from a zero {WAYS}-way head), {args.queries} query images per character."
        + "\n\n![validation accuracy](cross_alphabet.png)"
    )
    curve = {f"{args.recipe}, alphabet split": run_dir}
    plot_curves(curve, "acc", args.report_dir / "cross_alphabet.png", "validation accuracy (5-way 1-shot, Greek)")
    command = " ".join(["python -m reports.cross_alphabet", *(sys.argv[1:] if argv is None else argv)])
    title = "Cross-alphabet 20-way one-shot (Omniglot, unseen alphabets)"
    write_report(args.report_dir / "cross_alphabet.md", title, body, command, time.perf_counter() - start)


if __name__ == "__main__":
    main()
