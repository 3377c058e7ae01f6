"""The contract of every learner: built from its recipe, trained by ``metaloop fit``, reloaded, adapted.

One row per registered learner (each Omniglot recipe; their modules cover every ``configs/module`` option)
and one for a user's own learner: the algorithm ``docs/extending.md`` writes from scratch, whose Python file,
module YAML and recipe this test reads from that page into a folder on ``METALOOP_CONFIG_PATH``. Each row
trains two meta-steps on small tasks, reloads ``RUN/checkpoints/last.ckpt`` with ``Class.load_from_checkpoint``
(the saved weights, exactly), and adapts the reloaded learner to a task of the run's task source with
``.adapt((x, y))``, for the trained number of ways and, where the learner takes any, for fewer.
A new learner adds a row.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_class
from test_docs import TINY, blocks

from metaloop.cli import config_dir, main, recipe_dir
from metaloop.lightning import load_tasks
from metaloop.lightning.targets import TargetNotAllowed
from metaloop.tasks import Task, sample_task

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "extending.md"
# small tasks and short adaptation, on top of two meta-steps of two tasks
SMALL = [*TINY, "task.k_queries=2", "inner.eval_steps=1", "trainer.precision=32-true", "~callbacks.learning_curve"]


@dataclass(frozen=True)
class Learner:
    """A row: the recipe that builds the learner, its class, the recipe's own shrinking, and whether it adapts to other ways."""

    recipe: str
    cls: str
    overrides: tuple[str, ...] = ()
    any_ways: bool = True  # False: tasks keep the trained ways (a head that does not adapt, or has learned transforms)
    user: bool = False  # the learner of docs/extending.md, in a user's folder


MAML = "metaloop.algorithms.MetaLightningModule"
LEARNERS = [
    Learner("maml_omniglot", MAML),
    Learner("fomaml_omniglot", MAML),
    Learner("anil_omniglot", MAML, ("inner.steps=1",)),  # 20-way
    Learner("boil_omniglot", MAML, any_ways=False),
    Learner("metasgd_omniglot", MAML),
    Learner("metacurvature_omniglot", MAML, any_ways=False),  # the head's learned transforms are sized for 5 ways
    Learner("imaml_omniglot", MAML, ("inner.steps=2",)),
    Learner("protonet_omniglot", "metaloop.algorithms.PrototypicalModule"),
    Learner("metaoptnet_omniglot", "metaloop.algorithms.PrototypicalModule"),
    Learner("cavia_omniglot", "metaloop.algorithms.CaviaModule", any_ways=False),
    Learner("mamlpp_omniglot", "metaloop.algorithms.MAMLPlusPlus", ("inner.steps=2",)),
    Learner("reptile_omniglot", "metaloop.algorithms.ReptileModule", ("inner.steps=2",)),
    Learner("tempered_omniglot", "mymeta.algorithms.TemperedMAML", user=True),
]


def write_example(folder: Path) -> None:
    """Writes the files of ``docs/extending.md`` (its ``<!-- file: PATH -->`` blocks) into ``folder``, as a reader would."""
    for block in blocks(EXAMPLE):
        if block.marker.startswith("file: "):
            path = folder / block.marker[len("file: "):]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.code)


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A user's folder holding the docs' example: its package importable, its configs on ``METALOOP_CONFIG_PATH``."""
    folder = tmp_path / "user"
    write_example(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("METALOOP_CONFIG_PATH", str(folder / "experiments"))
    yield folder
    for name in [n for n in sys.modules if n == "mymeta" or n.startswith("mymeta.")]:
        del sys.modules[name]


def fit(recipe: str, run: Path, overrides: tuple[str, ...]) -> None:
    try:
        main(["fit", "--config", f"{recipe}.yaml", *SMALL, *overrides, f"hydra.run.dir={run}"])
    except SystemExit as exit:
        pytest.fail(f"metaloop fit --config {recipe}.yaml exited with {exit.code!r}")


def fewer_ways(task: Task, ways: int) -> Task:
    """Returns the task's first ``ways`` classes (labels ``0 .. ways - 1``): a task with fewer ways."""
    support, query = task.support_y < ways, task.query_y < ways
    return Task(task.support_x[support], task.support_y[support], task.query_x[query], task.query_y[query])


@pytest.mark.slow
@pytest.mark.parametrize("learner", LEARNERS, ids=[row.recipe for row in LEARNERS])
def test_a_learner_trains_reloads_and_adapts(learner, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    allow = ["mymeta."] if learner.user else []
    if learner.user:
        request.getfixturevalue("user_folder")
    run = tmp_path / "run"
    try:
        fit(learner.recipe, run, learner.overrides)
    finally:
        torch.set_num_threads(threads)
    checkpoint = run / "checkpoints" / "last.ckpt"

    cls = get_class(learner.cls)
    if learner.user:  # a stored configuration builds a user's class only when told to
        with pytest.raises(TargetNotAllowed, match="mymeta.algorithms.TemperedMAML"):
            cls.load_from_checkpoint(checkpoint)
    reloaded = cls.load_from_checkpoint(checkpoint, allow=allow)
    assert type(reloaded) is cls
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == 2
    state = reloaded.state_dict()
    assert state.keys() == saved["state_dict"].keys()
    for key, value in saved["state_dict"].items():
        assert torch.equal(state[key], value), key

    tasks = load_tasks(checkpoint, allow=allow).tasks
    task = sample_task(tasks, "test", seed=0, index=0)
    predict = reloaded.adapt((task.support_x, task.support_y))
    assert predict(task.query_x).shape == (len(task.query_x), tasks.n_ways)
    if learner.any_ways:
        small = fewer_ways(task, 3)
        predict = reloaded.adapt((small.support_x, small.support_y), n_ways=3)
        assert predict(small.query_x).shape == (len(small.query_x), 3)


def test_every_omniglot_recipe_and_every_module_option_has_a_row():
    """A new recipe or learner config adds a row: each ``recipes/*_omniglot.yaml`` and each ``configs/module`` target."""
    rows = {row.recipe for row in LEARNERS if not row.user}
    assert rows == {p.stem for p in recipe_dir().glob("*_omniglot.yaml")}
    targets = {yaml.safe_load(p.read_text())["_target_"] for p in (config_dir() / "module").glob("*.yaml")}
    assert targets <= {row.cls for row in LEARNERS}


def test_the_user_learner_is_the_docs_worked_example(tmp_path):
    """The user's row runs the page's own files: a Python file, a module YAML naming its class, and a recipe picking it."""
    write_example(tmp_path)
    module = yaml.safe_load((tmp_path / "experiments" / "module" / "tempered_maml.yaml").read_text())
    assert module["_target_"] == "mymeta.algorithms.TemperedMAML"
    assert "class TemperedMAML(MetaLightningModule)" in (tmp_path / "mymeta" / "algorithms.py").read_text()
    assert "override module: tempered_maml" in (tmp_path / "experiments" / "tempered_omniglot.yaml").read_text()
