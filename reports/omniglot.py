"""Omniglot few-shot classification: every Omniglot recipe at 5-way 1-shot, 5-way 5-shot and 20-way 1-shot.

Each recipe is trained 1-shot with its own ``task.n_ways`` (or each of ``--train-ways``; ``--also-20way`` adds a 20-way model) on the
recipe's held-out character split (70/15/15 percent of the characters, dealt with seed 0, each
rotation a class), then its last checkpoint is tested with ``metaloop test`` on fixed test tasks of
each setting. A setting is tested on the model trained with its number of ways when there is one,
else on the 5-way model (a head trained for other ways starts from zeros, see
``MetaLightningModule.adapt``; ProtoNets and MetaOptNet have no head to resize).

Every measured row is kept in ``reports/omniglot.json`` with its budget, device and wall time, so runs
made on different machines (a CPU budget here, a GPU budget there) land in one table; a rerun replaces
the rows of the recipes and settings it measured. Writes ``reports/omniglot.md`` and
``reports/omniglot.png`` (validation accuracy against meta-steps, of the runs of this invocation).

    python -m reports.omniglot --steps 300 --meta-batch 8 --recipes maml_omniglot       # a CPU budget
    python -m reports.omniglot --device gpu --minutes 5 --steps 20000 --also-20way maml_omniglot --jobs 13
    python -m reports.omniglot --steps 60000 --device gpu --full --root ~/data/omniglot   # the papers' protocol
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from reports import RECIPE_DIR, REPORT_DIR, RUN_DIR, cpu_name, max_time, metaloop_run, parallel, plot_curves, published_command, run_info, table, write_report

SETTINGS = {"5-way 1-shot": (5, 1), "5-way 5-shot": (5, 5), "20-way 1-shot": (20, 1)}
# The recipes in the order of the table; any other recipes/*_omniglot.yaml may be named with --recipes.
RECIPES = [
    "maml_omniglot", "maml_omniglot_20way", "fomaml_omniglot", "anil_omniglot", "boil_omniglot", "metasgd_omniglot", "metacurvature_omniglot",
    "mamlpp_omniglot", "imaml_omniglot", "reptile_omniglot", "cavia_omniglot", "protonet_omniglot", "metaoptnet_omniglot",
]
# Published test accuracy in percent, (mean, 95% half-width or None), on the full Omniglot background set
# (1,200 training characters): anchors to read ours against, not targets on the minimal splits.
PUBLISHED: dict[str, dict[str, tuple[float, float | None]]] = {
    # Finn et al. (2017) table 1 (MAML and its first-order approximation)
    "maml_omniglot": {"5-way 1-shot": (98.7, 0.4), "5-way 5-shot": (99.9, 0.1), "20-way 1-shot": (95.8, 0.3)},
    "maml_omniglot_20way": {"20-way 1-shot": (95.8, 0.3)},
    "fomaml_omniglot": {"5-way 1-shot": (98.3, 0.5), "5-way 5-shot": (99.2, 0.2), "20-way 1-shot": (89.4, 0.5)},
    # Raghu et al. (2020) table 2 (ANIL, 20-way only)
    "anil_omniglot": {"20-way 1-shot": (96.2, 0.5)},
    # Li et al. (2017) table 2 (Meta-SGD)
    "metasgd_omniglot": {"5-way 1-shot": (99.53, 0.26), "5-way 5-shot": (99.93, 0.09), "20-way 1-shot": (95.93, 0.38)},
    # Antoniou et al. (2019) table 1 (MAML++)
    "mamlpp_omniglot": {"5-way 1-shot": (99.47, None), "5-way 5-shot": (99.93, None), "20-way 1-shot": (97.65, 0.05)},
    # Rajeswaran et al. (2019) table 2 (iMAML, Hessian-free)
    "imaml_omniglot": {"5-way 1-shot": (99.50, 0.26), "5-way 5-shot": (99.74, 0.11), "20-way 1-shot": (96.18, 0.36)},
    # Nichol et al. (2018) table 1 (Reptile, transductive)
    "reptile_omniglot": {"5-way 1-shot": (97.68, 0.04), "5-way 5-shot": (99.48, 0.06), "20-way 1-shot": (89.43, 0.14)},
    # Snell et al. (2017) table 1 (Prototypical Networks, trained 60-way)
    "protonet_omniglot": {"5-way 1-shot": (98.8, None), "5-way 5-shot": (99.7, None), "20-way 1-shot": (96.0, None)},
}
TARGETS = {("maml_omniglot", "5-way 1-shot"): 95.0, (None, "20-way 1-shot"): 90.0}  # None: the best recipe


def budget_label(info: dict[str, Any], meta_batch: int, device: str) -> str:
    """Returns "STEPS x META_BATCH, MIN min (DEVICE)" of a finished fit's ``results.json``."""
    minutes = info.get("timings", {}).get("fit", 0.0) / 60
    return f"{info.get('global_step', 0):,} × {meta_batch}, {minutes:.1f} min ({device})"


def recipe_ways(recipe: str) -> int:
    """Returns the ``task.n_ways`` a recipe file sets (5 when it sets none: the task's default)."""
    import yaml

    return int(((yaml.safe_load((RECIPE_DIR / f"{recipe}.yaml").read_text()) or {}).get("task") or {}).get("n_ways", 5))


def load_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Returns the stored rows ``{"recipe|setting": row}`` of ``path`` (empty when it does not exist)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def render(rows: dict[str, dict[str, Any]], test_tasks: int) -> str:
    """Returns the Markdown table of ``rows`` (recipes in :data:`RECIPES` order, then settings) and the targets."""
    order = {name: i for i, name in enumerate(RECIPES)}
    settings = list(SETTINGS)

    def key(row: dict[str, Any]) -> tuple[int, str, int]:
        return order.get(row["recipe"], len(order)), row["recipe"], settings.index(row["setting"])

    lines = []
    for row in sorted(rows.values(), key=key):
        published = PUBLISHED.get(row["recipe"], {}).get(row["setting"])
        anchor = "—" if published is None else f"{published[0]}" + ("" if published[1] is None else f" ± {published[1]}")
        lines.append([
            row["recipe"], row["setting"], row["trained"], row["budget"], f"{row['acc']:.1f} ± {row['ci']:.1f}", anchor,
            "—" if published is None else f"{row['acc'] - published[0]:+.1f}",
        ])
    header = ["recipe", "test setting", "trained as", "budget: meta-steps × tasks, fit time", f"test accuracy % ({test_tasks} tasks, 95% CI)", "published (full set)", "gap"]
    goals = []
    for (recipe, setting), goal in TARGETS.items():
        candidates = [r for r in rows.values() if r["setting"] == setting and recipe in (None, r["recipe"])]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r["acc"])
        who = recipe or f"best recipe ({best['recipe']})"
        goals.append(f"- {who}, {setting}: {best['acc']:.1f}% against the target {goal:.0f}%: {'met' if best['acc'] >= goal else 'not met'}.")
    return table(header, lines) + ("\n\nTargets:\n" + "\n".join(goals) if goals else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipes = sorted({*RECIPES, *(p.stem for p in RECIPE_DIR.glob("*_omniglot.yaml"))} & {p.stem for p in RECIPE_DIR.glob("*.yaml")})
    parser.add_argument("--steps", type=int, default=300, help="meta-steps per fit (the papers: 60000)")
    parser.add_argument("--minutes", type=float, default=None, help="a wall-time budget per fit (trainer.max_time); it ends at --steps or here")
    parser.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default: the recipe's)")
    parser.add_argument("--recipes", nargs="+", default=[r for r in RECIPES if r in recipes], choices=recipes)
    parser.add_argument("--train-ways", type=int, nargs="+", default=None, choices=[5, 20], help="a model per number of ways (1-shot; default: the recipe's task.n_ways)")
    parser.add_argument("--also-20way", nargs="*", default=[], metavar="RECIPE", help="recipes that also train a 20-way model")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="test settings")
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--val-tasks", type=int, default=32)
    parser.add_argument("--val-every", type=int, default=None, help="meta-steps between validations (default: --steps / 5)")
    parser.add_argument("--jobs", type=int, default=1, help="fits at a time, one CPU thread each")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--full", action="store_true", help="the full 1,623 characters (downloaded into --root)")
    parser.add_argument("--root", default=None, help="folder of the official Omniglot zips (with --full)")
    parser.add_argument(
        "--override", nargs="*", default=[],
        help="extra overrides of the fits, e.g. trainer.precision=bf16-mixed; RECIPE:KEY=VALUE overrides RECIPE's fits and tests",
    )
    parser.add_argument("--runs", type=Path, default=RUN_DIR / "omniglot", help="where the run folders go")
    parser.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    parser.add_argument("--render-only", action="store_true", help="rewrite omniglot.md from omniglot.json (rows merged from other machines); run nothing")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    data = ["task.full=true", "task.download=true", f"task.root={args.root or 'null'}"] if args.full else []
    common = [f"trainer={args.device}", *data]
    fit = [
        *common, *max_time(args.minutes), *(o for o in args.override if not _scoped(o)),
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.val_every or max(1, args.steps // 5)}",
        f"task.num_val_tasks={args.val_tasks}",
        "task.k_shots=1",
        "test_after_fit=false",
        *([f"task.meta_batch_size={args.meta_batch}"] if args.meta_batch else []),
    ]
    fits = [
        (recipe, ways) for recipe in args.recipes
        for ways in sorted({*(args.train_ways or [recipe_ways(recipe)]), *([20] if recipe in args.also_20way else [])})
    ]
    trained = {(recipe, ways) for recipe, ways in fits}
    device = "GPU" if args.device == "gpu" else f"{cpu_name()}, 1 thread"  # metaloop_run gives each fit one thread

    def train_and_test(recipe: str, ways: int) -> list[dict[str, Any]]:
        run_dir = args.runs / f"{recipe}_{ways}way"
        scoped = [o.split(":", 1)[1] for o in args.override if _scoped(o) and o.split(":", 1)[0] == recipe]
        metaloop_run("fit", recipe, run_dir, [*fit, f"task.n_ways={ways}", *scoped])
        info = run_info(run_dir)
        rows = []
        for setting in args.settings:
            test_ways, shots = SETTINGS[setting]
            if test_ways != ways and (recipe, test_ways) in trained:
                continue  # tested on the model trained with its ways
            test_dir = run_dir / f"test_{test_ways}way_{shots}shot"
            try:
                metrics = metaloop_run("test", recipe, test_dir, [
                    *common, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"task.num_test_tasks={args.test_tasks}",
                    # the model as trained (task.n_ways sizes its head); the test tasks' ways and shots
                    f"task.n_ways={ways}",
                    f"task.datamodule.tasks.n_ways={test_ways}", f"task.datamodule.tasks.k_shots={shots}", *scoped,
                ])
            except RuntimeError as error:  # one setting the model cannot take does not drop the others
                print(f"reports.omniglot: {error}", file=sys.stderr)
                failed.append(f"{recipe} ({ways}-way) tested at {setting}")
                continue
            rows.append({
                "recipe": recipe, "setting": setting, "trained": f"{ways}-way 1-shot",
                "budget": budget_label(info, _meta_batch(run_dir), device),
                "acc": 100 * metrics["test/acc_post"], "ci": 100 * metrics["test/acc_post_ci95"],
                "command": command,
            })
        return rows

    command = published_command("omniglot", argv)
    store = args.report_dir / "omniglot.json"

    def report(results: list[list[dict[str, Any]] | None]) -> None:
        rows = load_rows(store)
        for measured in results:
            for row in measured or []:
                rows[f"{row['recipe']}|{row['setting']}"] = row
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(rows, indent=1) + "\n")
        commands = sorted({row["command"] for row in rows.values()})
        data_name = "full Omniglot (1,623 characters)" if args.full else "the bundled minimal splits (242 characters)"
        body = (
            render(rows, args.test_tasks)
            + f"\n\nData: {data_name}; each character's 4 rotations are classes; 15% of the characters held out for test."
            + " The papers train 60,000 meta-steps with meta-batch 32 (20-way: 16) on 1,200 training characters"
            + " (ProtoNets: 60-way episodes; Reptile: 100,000 steps)."
            + " A row's budget is the meta-steps its fit took, the tasks per meta-step and the fit's wall time."
            + "\n\nRows come from these commands (each keeps the rows of the others):\n"
            + "\n".join(f"- `{c}`" for c in commands)
            + "\n\n![validation accuracy](omniglot.png)"
        )
        finished = {f"{r} ({w}-way)": args.runs / f"{r}_{w}way" for (r, w), res in zip(fits, results) if res is not None}
        if finished:
            plot_curves(finished, "acc", args.report_dir / "omniglot.png", "validation accuracy (trained setting)")
        write_report(args.report_dir / "omniglot.md", "Omniglot few-shot classification", body, command, time.perf_counter() - start)

    if args.render_only:
        report([])
        return
    failed: list[str] = []
    jobs = [lambda recipe=recipe, ways=ways: _guarded(train_and_test, recipe, ways) for recipe, ways in fits]
    results = parallel(jobs, args.jobs, progress=report)
    failed += [f"{r} ({w}-way) fit" for (r, w), res in zip(fits, results) if res is None]
    if failed:
        sys.exit(f"reports.omniglot: these runs failed (their logs are in {args.runs}): {', '.join(failed)}")


def _scoped(override: str) -> bool:
    """Returns whether ``override`` is ``RECIPE:KEY=VALUE`` (a colon before the first ``=``)."""
    return ":" in override.split("=", 1)[0]


def _guarded(job: Any, *args: Any) -> list[dict[str, Any]] | None:
    """Returns ``job(*args)``, or None after printing the error: one failed recipe does not stop the others."""
    try:
        return job(*args)
    except Exception as error:  # noqa: BLE001 - the report goes on; main exits non-zero
        print(f"reports.omniglot: {error}", file=sys.stderr)
        return None


def _meta_batch(run_dir: Path) -> int:
    """Returns ``task.meta_batch_size`` of a run folder's composed config."""
    from omegaconf import OmegaConf

    return int(OmegaConf.load(run_dir / ".hydra" / "config.yaml").task.meta_batch_size)


if __name__ == "__main__":
    main()
