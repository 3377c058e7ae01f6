"""Sinusoid regression at 5, 10 and 20 shots: MAML, Meta-SGD, iMAML and CAVIA, against Li et al. (2017), table 1.

Trains each recipe (``maml_sinusoid.yaml``, ``metasgd_sinusoid.yaml``, ``imaml_sinusoid.yaml``,
``cavia_sinusoid.yaml``) once per K (one model per K, as in the paper: the recipe's ``task.k_shots``
sets the support size of training, validation and test tasks) and scores each on 100 fixed test tasks
after the recipe's test-time inner steps: the mean query MSE with its 95% interval. Every measured row
is kept in ``reports/sinusoid.json`` with its command, so a rerun of some recipes keeps the others'
rows. Writes ``reports/sinusoid.md`` and ``reports/sinusoid.png`` (validation MSE, this invocation's runs).

    python -m reports.sinusoid --steps 15000 --jobs 2      # the paper: --steps 70000
    python -m reports.sinusoid --steps 25000 --recipes imaml_sinusoid cavia_sinusoid --jobs 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from reports import RECIPE_DIR, REPORT_DIR, RUN_DIR, max_time, metaloop_run, parallel, plot_curves, published_command, run_info, table, write_report

# Li, Zhou, Chen & Li (2017), table 1: (mean, 95% half-width) of the test MSE after one step, by K
PUBLISHED = {
    "maml_sinusoid": {5: (1.13, 0.18), 10: (0.77, 0.11), 20: (0.48, 0.08)},
    "metasgd_sinusoid": {5: (0.90, 0.16), 10: (0.53, 0.09), 20: (0.31, 0.05)},
}
RECIPES = ["maml_sinusoid", "metasgd_sinusoid", "imaml_sinusoid", "cavia_sinusoid", "reptile_sinusoid"]


def target(recipe: str, shots: int) -> float | None:
    """Returns the MSE a run must reach: Meta-SGD's published interval's top, MAML's 5-shot mean; None if none is set."""
    if recipe not in PUBLISHED:
        return None
    mean, half = PUBLISHED[recipe][shots]
    if recipe == "metasgd_sinusoid":
        return mean + half
    return mean if shots == 5 else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15000, help="meta-steps per run (the paper: 70000)")
    parser.add_argument("--minutes", type=float, default=None, help="a wall-time budget per run (trainer.max_time); it ends at --steps or here")
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20])
    available = [r for r in RECIPES if (RECIPE_DIR / f"{r}.yaml").is_file()]
    parser.add_argument("--recipes", nargs="+", default=available, choices=available)
    parser.add_argument("--test-tasks", type=int, default=100)
    parser.add_argument("--val-tasks", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--runs", type=Path, default=RUN_DIR / "sinusoid", help="where the run folders go")
    parser.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    runs = {(recipe, k): args.runs / f"{recipe}_k{k}" for recipe in args.recipes for k in args.shots}
    overrides = [
        f"trainer={args.device}",
        *max_time(args.minutes),
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={max(1, args.steps // 10)}",
        f"task.num_val_tasks={args.val_tasks}",
        f"task.num_test_tasks={args.test_tasks}",
    ]
    jobs = [
        lambda recipe=recipe, k=k, run_dir=run_dir: metaloop_run("fit", recipe, run_dir, [*overrides, f"task.k_shots={k}"])
        for (recipe, k), run_dir in runs.items()
    ]
    command = published_command("sinusoid", argv)

    store = args.report_dir / "sinusoid.json"

    def report(results: list[dict[str, float] | None]) -> None:
        stored = json.loads(store.read_text()) if store.is_file() else {}
        for (recipe, k), metrics in zip(runs, results):
            if metrics is not None:
                stored[f"{recipe}|{k}"] = {
                    "recipe": recipe, "k": k, "steps": run_info(runs[recipe, k])["global_step"], "mse": metrics["test/loss_post"],
                    "ci": metrics["test/loss_post_ci95"], "command": command,
                }
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(stored, indent=1) + "\n")
        order = {r: i for i, r in enumerate(RECIPES)}
        rows = []
        for row in sorted(stored.values(), key=lambda r: (order.get(r["recipe"], len(order)), r["k"])):
            recipe, k, ours = row["recipe"], row["k"], row["mse"]
            published, goal = PUBLISHED.get(recipe, {}).get(k), target(recipe, k)
            rows.append([
                recipe, str(k), f"{row['steps']:,}", f"{ours:.3f} ± {row['ci']:.3f}",
                "—" if published is None else f"{published[0]:.2f} ± {published[1]:.2f}", "—" if goal is None else f"≤ {goal:.2f}",
                "—" if goal is None else ("yes" if ours <= goal else "no"),
            ])
        header = ["recipe", "K", "meta-steps", f"test MSE, {args.test_tasks} tasks (95% CI)", "Li et al. 2017", "target", "met"]
        body = (
            table(header, rows)
            + f"\n\nK support and 10 query points per task; MAML and Meta-SGD take one inner step at test, iMAML, CAVIA"
            + f" and Reptile their recipes' test steps (`inner.eval_steps`); the paper trains {70000:,} meta-steps."
            + " Target: Meta-SGD within or below its published interval; MAML at most 1.13 at 5 shots."
            + " iMAML (Rajeswaran et al. 2019), CAVIA (Zintgraf et al. 2019) and Reptile (Nichol et al. 2018) published"
            + " no numbers in this protocol."
            + "\n\nRows come from these commands (each keeps the rows of the others):\n"
            + "\n".join(f"- `{c}`" for c in sorted({row["command"] for row in stored.values()}))
            + "\n\n![validation MSE](sinusoid.png)"
        )
        finished = {f"{r} K={k}": d for ((r, k), d), m in zip(runs.items(), results) if m is not None}
        plot_curves(finished, "loss", args.report_dir / "sinusoid.png", "validation MSE", log_y=True)
        title = "Sinusoid regression (Li et al. 2017, table 1)"
        write_report(args.report_dir / "sinusoid.md", title, body, command, time.perf_counter() - start)

    parallel(jobs, args.jobs, progress=report)


if __name__ == "__main__":
    main()
