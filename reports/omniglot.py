"""Omniglot few-shot classification: MAML, Meta-SGD, ANIL and first-order MAML against their papers.

Each recipe is trained in its own setting (``maml_omniglot.yaml`` and the others 5-way 1-shot,
``anil_omniglot.yaml`` 20-way 1-shot) on the recipe's held-out character split (70/15/15 percent of
the characters, dealt with seed 0, each rotation a class), then its last checkpoint is tested with
``metaloop test`` on fixed test tasks of each setting: 5-way 1-shot, 5-way 5-shot and 20-way 1-shot
(a head trained for other ways starts from zeros, see ``MetaLightningModule.adapt``). Writes
``reports/omniglot.md`` and ``reports/omniglot.png`` (validation accuracy against meta-steps).

    python -m reports.omniglot --steps 300 --meta-batch 8 --recipes maml_omniglot     # a CPU budget
    python -m reports.omniglot --steps 60000 --device gpu --full --root ~/data/omniglot   # the papers' protocol
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reports import REPORT_DIR, RUN_DIR, metaloop_run, parallel, plot_curves, table, write_report

SETTINGS = {"5-way 1-shot": (5, 1), "5-way 5-shot": (5, 5), "20-way 1-shot": (20, 1)}
# test accuracy in percent, (mean, 95% half-width): Finn et al. (2017) table 1 (MAML and its first-order
# approximation), Li et al. (2017) table 2 (Meta-SGD), Raghu et al. (2020) table 2 (ANIL, 20-way only)
PUBLISHED = {
    "maml_omniglot": {"5-way 1-shot": (98.7, 0.4), "5-way 5-shot": (99.9, 0.1), "20-way 1-shot": (95.8, 0.3)},
    "metasgd_omniglot": {"5-way 1-shot": (99.53, 0.26), "5-way 5-shot": (99.93, 0.09), "20-way 1-shot": (95.93, 0.38)},
    "anil_omniglot": {"20-way 1-shot": (96.2, 0.5)},
    "fomaml_omniglot": {"5-way 1-shot": (98.3, 0.5), "5-way 5-shot": (99.2, 0.2), "20-way 1-shot": (89.4, 0.5)},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="meta-steps per recipe (the papers: 60000)")
    parser.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default: the recipe's, 32 or 16)")
    parser.add_argument("--recipes", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="test settings")
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--val-tasks", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=1, help="recipes at a time, one CPU thread each")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--full", action="store_true", help="the full 1,623 characters (downloaded into --root)")
    parser.add_argument("--root", default=None, help="folder of the official Omniglot zips (with --full)")
    parser.add_argument("--runs", type=Path, default=RUN_DIR / "omniglot", help="where the run folders go")
    parser.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    data = ["task.full=true", "task.download=true", f"task.root={args.root or 'null'}"] if args.full else []
    common = [f"trainer={args.device}", *data]
    fit = [
        *common,
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={max(1, args.steps // 5)}",
        f"task.num_val_tasks={args.val_tasks}",
        "test_after_fit=false",
        *([f"task.meta_batch_size={args.meta_batch}"] if args.meta_batch else []),
    ]

    def train_and_test(recipe: str) -> dict[str, tuple[float, float]]:
        run_dir = args.runs / recipe
        metaloop_run("fit", recipe, run_dir, fit)
        results = {}
        for setting in args.settings:
            ways, shots = SETTINGS[setting]
            test_dir = run_dir / f"test_{ways}way_{shots}shot"
            metrics = metaloop_run("test", recipe, test_dir, [
                *common, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"task.num_test_tasks={args.test_tasks}",
                # the tasks' ways and shots only: the model keeps the recipe's head (task.n_ways)
                f"task.datamodule.tasks.n_ways={ways}", f"task.datamodule.tasks.k_shots={shots}",
            ])
            results[setting] = (100 * metrics["test/acc_post"], 100 * metrics["test/acc_post_ci95"])
        return results

    command = " ".join(["python -m reports.omniglot", *(sys.argv[1:] if argv is None else argv)])
    batch = f", meta-batch {args.meta_batch}" if args.meta_batch else ""

    def report(results: list[dict[str, tuple[float, float]] | None]) -> None:
        rows = []
        for recipe, accuracies in zip(args.recipes, results):
            for setting, (ours, half) in (accuracies or {}).items():
                published = PUBLISHED[recipe].get(setting)
                rows.append([
                    recipe, setting, f"{args.steps:,}{batch}", f"{ours:.1f} ± {half:.1f}",
                    "—" if published is None else f"{published[0]} ± {published[1]}",
                    "—" if published is None else f"{ours - published[0]:+.1f}",
                ])
        header = ["recipe", "test setting", "meta-steps", f"test accuracy % ({args.test_tasks} tasks, 95% CI)", "published", "gap"]
        data_name = "full Omniglot (1,623 characters)" if args.full else "the bundled minimal splits (242 characters)"
        body = (
            table(header, rows)
            + f"\n\nData: {data_name}; each character's 4 rotations are classes; 15% of the characters held out for test."
            + " The papers train 60,000 meta-steps with meta-batch 32 (20-way: 16) on 1,200 training characters."
            + " Runs already in the run folder (`--runs`) are loaded: fits resume from their last checkpoint, finished tests are read back."
            + "\n\n![validation accuracy](omniglot.png)"
        )
        finished = {r: args.runs / r for r, acc in zip(args.recipes, results) if acc is not None}
        plot_curves(finished, "acc", args.report_dir / "omniglot.png", "validation accuracy (trained setting)")
        title = "Omniglot few-shot classification"
        write_report(args.report_dir / "omniglot.md", title, body, command, time.perf_counter() - start)

    parallel([lambda recipe=recipe: train_and_test(recipe) for recipe in args.recipes], args.jobs, progress=report)


if __name__ == "__main__":
    main()
