"""Cross-alphabet one-shot: 20-way 1-shot classification of characters from alphabets never seen in training.

Trains each recipe (default ``maml_omniglot.yaml``, 5-way 1-shot) on the bundled minimal splits with the
characters split by alphabet: five alphabets train, Greek validates, and Balinese (24 characters) and
Early Aramaic (22) are held out. Then, through ``MetaLightningModule.adapt(support, n_ways=20)``, it
adapts each trained model to 20-way episodes drawn within one held-out alphabet (20 of its characters,
one image each, unrotated; 5 query images per character) and scores the query accuracy. Chance is 5%.
Writes ``reports/cross_alphabet.md`` and ``reports/cross_alphabet.png`` (validation accuracy).

    python -m reports.cross_alphabet --steps 150 --meta-batch 8 --episodes 600
    python -m reports.cross_alphabet --recipes maml_omniglot protonet_omniglot --device gpu --minutes 5 --steps 20000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metaloop.algorithms import MetaLightningModule
from metaloop.lightning.checkpoint import load_checkpoint
from metaloop.lightning import MeanWithConfidence
from metaloop.tasks import EpisodeSampler, Omniglot, sample_task
from reports import REPORT_DIR, RUN_DIR, max_time, metaloop_run, parallel, plot_curves, run_info, table, write_report

SPLITS = {
    "train": ["Japanese_(katakana)", "Korean", "Latin", "Sanskrit", "Tagalog"],
    "val": ["Greek"],
    "test": ["Balinese", "Early_Aramaic"],
}
WAYS = 20


def load_module(run_dir: Path, device: str) -> lightning.LightningModule:
    """Returns the module of a ``metaloop fit`` run folder: built from its Hydra config, weights from its last checkpoint."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    module = instantiate(cfg.module, _convert_="partial")
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # weights_only: a checkpoint runs no code
    module.load_state_dict(checkpoint["state_dict"])
    return module.to(device).eval()


def evaluate(module: lightning.LightningModule, alphabet: str, episodes: int, queries: int, seed: int) -> torch.Tensor:
    """Returns the query accuracy of each of ``episodes`` fixed 20-way 1-shot episodes within ``alphabet``.

    A :class:`MetaLightningModule` adapts with ``module.adapt(support, n_ways=20)``; a metric learner
    (ProtoNets, MetaOptNet) fits its head on the embedded support set (``module.task_metrics``).
    """
    sampler = EpisodeSampler(
        Omniglot(), n_ways=WAYS, k_shots=1, k_queries=queries, splits={"test": [alphabet]}, split_by="alphabet"
    )
    accuracies = []
    for index in range(episodes):
        support_x, support_y, query_x, query_y = (t.to(module.device) for t in sample_task(sampler, "test", seed, index))
        if isinstance(module, MetaLightningModule):
            fmodel = module.adapt((support_x, support_y), n_ways=WAYS)
            with torch.no_grad():
                accuracies.append((fmodel(query_x).argmax(-1) == query_y).float().mean().cpu())
        else:
            with torch.no_grad():
                accuracies.append(module.task_metrics(support_x, support_y, query_x, query_y)["acc"].float().cpu())
    return torch.stack(accuracies)


def percent(accuracies: torch.Tensor) -> str:
    """Returns "mean ± 95% half-width" of accuracies in [0, 1], in percent."""
    interval = MeanWithConfidence()
    interval.update(accuracies)
    mean, half = interval.compute()
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["maml_omniglot"], help="the recipes to train on the alphabet split")
    parser.add_argument("--steps", type=int, default=150, help="meta-steps (a finished run folder is loaded, not retrained)")
    parser.add_argument("--minutes", type=float, default=None, help="a wall-time budget per fit (trainer.max_time)")
    parser.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default: the recipe's)")
    parser.add_argument("--train-ways", type=int, default=5, help="ways of the training tasks (1-shot)")
    parser.add_argument("--override", nargs="*", default=[], help="extra overrides of the fits, e.g. trainer.precision=bf16-mixed")
    parser.add_argument("--episodes", type=int, default=600, help="test episodes, shared evenly by the held-out alphabets")
    parser.add_argument("--queries", type=int, default=5, help="query images per character")
    parser.add_argument("--val-tasks", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=1, help="fits at a time")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--runs", type=Path, default=RUN_DIR / "cross_alphabet", help="where the run folders go")
    parser.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    splits = ",".join(f"{split}:[{','.join(repr(a) for a in names)}]" for split, names in SPLITS.items())
    fit = [
        f"trainer={args.device}",
        *max_time(args.minutes),
        *args.override,
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={max(1, args.steps // 5)}",
        *([] if args.meta_batch is None else [f"task.meta_batch_size={args.meta_batch}"]),
        f"task.n_ways={args.train_ways}",
        "task.k_shots=1",
        f"task.num_val_tasks={args.val_tasks}",
        "task.num_test_tasks=0",
        "task.datamodule.tasks.split_by=alphabet",
        # a mapping of alphabets replaces the recipe's list of fractions: delete the key, then add it
        "~task.datamodule.tasks.splits",
        f"+task.datamodule.tasks.splits={{{splits}}}",
    ]
    groups = Omniglot().class_groups["alphabet"]

    def train_and_score(recipe: str) -> tuple[list[list[str]], str]:
        run_dir = args.runs / recipe
        metaloop_run("fit", recipe, run_dir, fit)
        info = run_info(run_dir)
        torch.set_num_threads(1)
        module = load_module(run_dir, "cuda" if args.device == "gpu" else "cpu")
        scores = {a: evaluate(module, a, args.episodes // len(SPLITS["test"]), args.queries, seed=0) for a in SPLITS["test"]}
        rows = [[recipe, a, str(groups.count(a)), str(len(acc)), percent(acc)] for a, acc in scores.items()]
        everything = torch.cat(list(scores.values()))
        rows.append([recipe, "all held-out", str(sum(groups.count(a) for a in scores)), str(len(everything)), percent(everything)])
        how = (
            f"adapted with `module.adapt(support, n_ways={WAYS})` ({module.inner.eval_steps} inner steps from a zero {WAYS}-way head)"
            if isinstance(module, MetaLightningModule) else "its head fitted on the embedded support set"
        )
        fit_min = info["timings"].get("fit", 0) / 60
        batch = OmegaConf.load(run_dir / ".hydra" / "config.yaml").task.meta_batch_size
        note = f"- `{recipe}`: {info['global_step']:,} meta-steps of {batch} tasks ({fit_min:.1f} min on the {args.device.upper()}); {how}."
        return rows, note

    command = " ".join(["python -m reports.cross_alphabet", *(sys.argv[1:] if argv is None else argv)])

    def report(results: list[tuple[list[list[str]], str] | None]) -> None:
        done = [r for r in results if r is not None]
        header = ["recipe", "held-out alphabet", "characters", "episodes", f"{WAYS}-way 1-shot accuracy % (95% CI)"]
        body = (
            table(header, [row for rows, _ in done for row in rows])
            + f"\n\nChance: {100 / WAYS:.0f}%. Each recipe is trained as {args.train_ways}-way 1-shot with rotations on the"
            + f" alphabets {', '.join(SPLITS['train'])} (validation: {', '.join(SPLITS['val'])}), then tested on 20 characters"
            + f" of one held-out alphabet, one image each, {args.queries} query images per character:\n"
            + "\n".join(note for _, note in done)
            + "\n\n![validation accuracy](cross_alphabet.png)"
        )
        curves = {f"{r}, alphabet split": args.runs / r for r, res in zip(args.recipes, results) if res is not None}
        plot_curves(curves, "acc", args.report_dir / "cross_alphabet.png", "validation accuracy (Greek)")
        title = "Cross-alphabet 20-way one-shot (Omniglot, unseen alphabets)"
        write_report(args.report_dir / "cross_alphabet.md", title, body, command, time.perf_counter() - start)

    parallel([lambda recipe=recipe: train_and_score(recipe) for recipe in args.recipes], args.jobs, progress=report)


if __name__ == "__main__":
    main()
