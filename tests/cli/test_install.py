"""A wheel that runs anywhere: configs/ and recipes/ ship inside it; users add recipes and config groups of their own."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import TINY, cli, cli_error

import metaloop
from metaloop.cli import main

ROOT = Path(metaloop.__file__).resolve().parents[1]


def _user_folder(root: Path) -> Path:
    """Returns a folder with a recipe of its own and a new option of the ``model`` group."""
    (root / "model").mkdir(parents=True)
    (root / "model" / "tiny_mlp.yaml").write_text(
        "# A 1-8-1 MLP\n_target_: metaloop.lightning.MLP\nsizes: [1, 8, 1]\n"
    )
    (root / "my_sine.yaml").write_text(
        "# My sinusoid experiment\ndefaults:\n  - maml_sinusoid\n  - override model: tiny_mlp\n  - _self_\ninner:\n  lr: 0.02\n"
    )
    return root


def test_recipes_and_config_groups_from_a_folder_on_the_config_path(monkeypatch, capsys, tmp_path):
    folder = _user_folder(tmp_path / "mine")
    monkeypatch.setenv("METALOOP_CONFIG_PATH", str(folder))
    main(["recipes"])
    out = capsys.readouterr().out
    assert "my_sine.yaml" in out and "My sinusoid experiment" in out and "maml_omniglot.yaml" in out
    cli("fit", "--config", "my_sine.yaml", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    config = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "lr: 0.02" in config and "- 8" in config
    # a shipped recipe with the user's group option
    main(["fit", "--config", "maml_sinusoid.yaml", "model=tiny_mlp", "--cfg", "job"])
    assert "- 8" in capsys.readouterr().out
    monkeypatch.setenv("METALOOP_CONFIG_PATH", str(tmp_path / "absent"))
    assert "METALOOP_CONFIG_PATH names" in cli_error("recipes")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns metaloop's wheel, built once from this checkout."""
    out = tmp_path_factory.mktemp("dist")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    return next(out.glob("metaloop-*.whl"))


@pytest.mark.slow
def test_the_wheel_in_a_fresh_venv_runs_a_recipe_from_an_empty_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # metaloop's dependencies (torch, lightning, hydra) come from this environment, metaloop only from the wheel
    dependencies = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    Path(site, "dependencies.pth").write_text(dependencies + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METALOOP_", "PYTHONPATH", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def run(*args: str) -> str:
        done = subprocess.run([*args], cwd=empty, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    assert run(str(python), "-c", "import metaloop; print(metaloop.__file__)").startswith(site)
    assert "maml_omniglot.yaml" in run(str(venv / "bin" / "metaloop"), "recipes")
    run(str(venv / "bin" / "metaloop"), "fit", "--config", "maml_omniglot.yaml", *TINY, "hydra.run.dir=run")
    assert (empty / "run" / "checkpoints" / "last.ckpt").is_file() and (empty / "run" / "results.json").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["run"]
