"""Cross-alphabet one-shot: 20-way 1-shot classification of characters from alphabets never seen in training.

Trains each recipe (default ``maml_omniglot.yaml``, 5-way 1-shot) on the bundled minimal splits with the
characters split by alphabet: every alphabet trains but Balinese (24 characters) and Early Aramaic (22),
which are held out, and there is no validation split. Then it adapts the last checkpoint to 20-way episodes
drawn within one held-out alphabet (20 of its characters, one image each, unrotated; 5 query images per
character) and scores the query accuracy. Chance is 5%. Training may use more ways than the test
(``--train-ways 60``) and episodes within one alphabet (``--within``). Each row is kept in
``reports/cross_alphabet.json`` by its variant name, so the variants of several invocations share one table
(``reports/cross_alphabet.md``), best first.

    python -m reports.cross_alphabet --steps 150 --meta-batch 8 --episodes 600
    python -m reports.cross_alphabet --recipes protonet_omniglot --train-ways 60 --within --minutes 20 --steps 100000 --variant 60way_within
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning
import torch
from omegaconf import DictConfig

from metaloop.algorithms import MetaLightningModule
from metaloop.lightning import MeanWithConfidence
from metaloop.lightning.runs import checkpoint_config, load_run
from metaloop.lightning.targets import build
from metaloop.tasks import EpisodeSampler, Omniglot, sample_task
from reports import REPORT_DIR, RUN_DIR, cpu_name, max_time, metaloop_run, parallel, published_command, run_info, table, write_report

#: The bundled minimal splits hold eight alphabets (Greek and Latin are in both zips); two are held out.
HELD_OUT = ["Balinese", "Early_Aramaic"]
TRAIN = ["Greek", "Japanese_(katakana)", "Korean", "Latin", "Sanskrit", "Tagalog"]
WAYS = 20


def run_dataset(config: DictConfig) -> Omniglot:
    """Returns the Omniglot dataset of a ``metaloop fit`` run's stored configuration (its root and ``image_size``), to test
    the run on the images it trained on; built through the allowlist :func:`load_run` builds the module with."""
    return build(config.task.datamodule.tasks.dataset, source="the run's stored configuration", key="task.datamodule.tasks.dataset")


def evaluate(
    module: lightning.LightningModule, dataset: Omniglot, alphabet: str, episodes: int, queries: int, seed: int
) -> torch.Tensor:
    """Returns the query accuracy of each of ``episodes`` fixed 20-way 1-shot episodes within ``alphabet`` of ``dataset``.

    A :class:`MetaLightningModule` adapts with ``module.adapt(support, n_ways=20)``; a metric learner
    (ProtoNets, MetaOptNet) fits its head on the embedded support set (``module.task_metrics``).
    """
    sampler = EpisodeSampler(
        dataset, n_ways=WAYS, k_shots=1, k_queries=queries, splits={"test": [alphabet]}, split_by="alphabet"
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


def interval(accuracies: torch.Tensor) -> tuple[float, float]:
    """Returns the mean and the 95% half-width of accuracies in [0, 1], in percent."""
    metric = MeanWithConfidence()
    metric.update(accuracies)
    mean, half = metric.compute()
    return 100 * float(mean), 100 * float(half)


def percent(accuracies: torch.Tensor) -> str:
    """Returns "mean ± 95% half-width" of accuracies in [0, 1], in percent."""
    return "{:.1f} ± {:.1f}".format(*interval(accuracies))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["maml_omniglot"], help="the recipes to train on the alphabet split")
    parser.add_argument("--steps", type=int, default=150, help="meta-steps (a finished run folder is loaded, not retrained)")
    parser.add_argument("--minutes", type=float, default=None, help="a wall-time budget per fit (trainer.max_time)")
    parser.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default: the recipe's)")
    parser.add_argument("--train-ways", type=int, default=5, help="ways of the training tasks (1-shot); the test is 20-way")
    parser.add_argument("--within", action="store_true", help="training tasks draw their characters from one alphabet, as the test does")
    parser.add_argument("--variant", default="", help="a name for this training setting, added to each recipe's row name")
    parser.add_argument("--override", nargs="*", default=[], help="extra overrides of the fits, e.g. trainer.precision=bf16-mixed")
    parser.add_argument("--episodes", type=int, default=600, help="test episodes, shared evenly by the held-out alphabets")
    parser.add_argument("--queries", type=int, default=5, help="query images per character")
    parser.add_argument("--jobs", type=int, default=1, help="fits at a time")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--runs", type=Path, default=RUN_DIR / "cross_alphabet", help="where the run folders go")
    parser.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    parser.add_argument("--render-only", action="store_true", help="rewrite cross_alphabet.md from cross_alphabet.json; run nothing")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    splits = f"train:[{','.join(repr(a) for a in TRAIN)}],test:[{','.join(repr(a) for a in HELD_OUT)}]"
    fit = [
        f"trainer={args.device}",
        *max_time(args.minutes),
        *args.override,
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={max(1, args.steps // 5)}",
        *([] if args.meta_batch is None else [f"task.meta_batch_size={args.meta_batch}"]),
        f"task.n_ways={args.train_ways}",
        "task.k_shots=1",
        *(["task.within=alphabet"] if args.within else []),
        # no validation split: every alphabet but the held-out ones trains, and the last checkpoint is tested
        "task.num_val_tasks=0",
        "task.num_test_tasks=0",
        "test_after_fit=false",
        "task.datamodule.tasks.split_by=alphabet",
        # a mapping of alphabets replaces the recipe's list of fractions: delete the key, then add it
        "~task.datamodule.tasks.splits",
        f"+task.datamodule.tasks.splits={{{splits}}}",
    ]
    groups = Omniglot().class_groups["alphabet"]
    command = published_command("cross_alphabet", argv)
    trained_as = f"{args.train_ways}-way 1-shot" + (", within one alphabet" if args.within else "") + "".join(f", {o}" for o in args.override)

    def train_and_score(recipe: str) -> dict[str, Any]:
        name = f"{recipe}{'_' + args.variant if args.variant else ''}"
        run_dir = args.runs / name
        metaloop_run("fit", recipe, run_dir, fit)
        info = run_info(run_dir)
        torch.set_num_threads(1)
        module = load_run(run_dir, map_location="cuda" if args.device == "gpu" else "cpu")
        config = checkpoint_config(run_dir / "checkpoints" / "last.ckpt")
        dataset = run_dataset(config)
        scores = {a: evaluate(module, dataset, a, args.episodes // len(HELD_OUT), args.queries, seed=0) for a in HELD_OUT}
        everything = torch.cat(list(scores.values()))
        batch = config.task.meta_batch_size
        fit_min = info["timings"].get("fit", 0) / 60
        return {
            "name": name, "recipe": recipe, "trained": trained_as,
            "budget": f"{info['global_step']:,} × {batch}, {fit_min:.1f} min ({'GPU' if args.device == 'gpu' else cpu_name() + ', 1 thread'})",
            "alphabets": {a: percent(acc) for a, acc in scores.items()}, "all": percent(everything),
            "mean": interval(everything)[0], "ci": interval(everything)[1], "command": command,
        }

    store = args.report_dir / "cross_alphabet.json"

    def report(results: list[dict[str, Any] | None]) -> None:
        rows = json.loads(store.read_text()) if store.is_file() else {}
        rows.update({row["name"]: row for row in results if row is not None})
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(rows, indent=1) + "\n")
        header = ["variant", "recipe", "trained as", "budget: meta-steps × tasks, fit time",
                  *(f"{a} ({groups.count(a)} characters)" for a in HELD_OUT), f"both ({args.episodes} episodes)"]
        ordered = sorted(rows.values(), key=lambda row: -row["mean"])
        body = (
            table(header, [[r["name"], r["recipe"], r["trained"], r["budget"], *(r["alphabets"][a] for a in HELD_OUT), f"**{r['all']}**"] for r in ordered])
            + f"\n\n20-way 1-shot accuracy % (95% CI). Chance: {100 / WAYS:.0f}%. Every recipe trains with rotations as classes on"
            + f" every bundled alphabet but the held-out ones ({', '.join(TRAIN)} train), without a validation split, and its last"
            + f" checkpoint is tested on 20 characters of one held-out alphabet ({', '.join(HELD_OUT)}), one image each,"
            + f" {args.queries} query images per character, unrotated (Lake et al.'s within-alphabet one-shot task)."
            + " A learner with an inner loop adapts with `module.adapt(support, n_ways=20)` from a zero 20-way head;"
            + " ProtoNets and MetaOptNet fit their head on the embedded support set."
            + "\n\nRows come from these commands (each keeps the rows of the others):\n"
            + "\n".join(f"- `{c}`" for c in sorted({r["command"] for r in rows.values()}))
        )
        title = "Cross-alphabet 20-way one-shot (Omniglot, unseen alphabets)"
        write_report(args.report_dir / "cross_alphabet.md", title, body, command, time.perf_counter() - start)

    if args.render_only:
        report([])
        return
    parallel([lambda recipe=recipe: train_and_score(recipe) for recipe in args.recipes], args.jobs, progress=report)


if __name__ == "__main__":
    main()
