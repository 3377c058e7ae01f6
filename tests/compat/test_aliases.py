"""``alias_package``: ``import learn2learn.x.y`` gives metaloop's module objects, and the shim makes it a plain import."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import metaloop.compat.learn2learn
import metaloop.compat.learn2learn.algorithms
import metaloop.compat.learn2learn.nn.metalayers
from metaloop.compat.aliases import AliasFinder, alias_package, remove_alias

SHIMS = Path(__file__).parent / "shims"
ALIAS = "l2l_alias_under_test"  # not "learn2learn", so tests never change what a real import would find


@pytest.fixture
def alias():
    yield alias_package(ALIAS, "metaloop.compat.learn2learn")
    remove_alias(ALIAS)


def test_the_alias_is_the_target_module(alias):
    assert alias is metaloop.compat.learn2learn
    assert importlib.import_module(ALIAS) is metaloop.compat.learn2learn


@pytest.mark.parametrize("sub", ["algorithms", "nn.metalayers", "nn.metalayers.metamodule", "utils.lightning", "optim.transforms"])
def test_submodules_are_the_same_objects(alias, sub):
    assert importlib.import_module(f"{ALIAS}.{sub}") is importlib.import_module(f"metaloop.compat.learn2learn.{sub}")


def test_from_imports_give_metaloop_classes_and_keep_their_identity(alias):
    namespace: dict[str, object] = {}
    exec(f"from {ALIAS}.nn.metalayers import MetaModule\nfrom {ALIAS}.algorithms import MAML", namespace)
    assert namespace["MetaModule"] is metaloop.compat.learn2learn.nn.metalayers.MetaModule
    assert namespace["MAML"] is metaloop.compat.learn2learn.algorithms.MAML
    assert namespace["MAML"].__module__ == "metaloop.compat.learn2learn.algorithms.maml"  # pickles under one name


def test_the_target_keeps_its_own_spec(alias):
    module = importlib.import_module(f"{ALIAS}.nn.kroneckers")
    assert module.__spec__.name == "metaloop.compat.learn2learn.nn.kroneckers"
    assert module.__name__ == "metaloop.compat.learn2learn.nn.kroneckers"


def test_a_missing_submodule_names_both_paths(alias):
    with pytest.raises(ModuleNotFoundError, match=rf"{ALIAS}\.gym is not provided by metaloop: metaloop\.compat\.learn2learn\.gym"):
        importlib.import_module(f"{ALIAS}.gym")


def test_remove_alias_forgets_the_alias_but_not_the_target():
    alias_package(ALIAS, "metaloop.compat.learn2learn")
    importlib.import_module(f"{ALIAS}.nn")
    remove_alias(ALIAS)
    assert not any(n == ALIAS or n.startswith(ALIAS + ".") for n in sys.modules)
    assert not any(isinstance(f, AliasFinder) and f.alias == ALIAS for f in sys.meta_path)
    assert "metaloop.compat.learn2learn.nn" in sys.modules
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(ALIAS)


def test_alias_package_twice_keeps_one_finder():
    alias_package(ALIAS, "metaloop.compat.learn2learn")
    alias_package(ALIAS, "metaloop.compat.learn2learn")
    try:
        assert sum(isinstance(f, AliasFinder) and f.alias == ALIAS for f in sys.meta_path) == 1
    finally:
        remove_alias(ALIAS)


def test_an_unknown_target_raises():
    with pytest.raises(ModuleNotFoundError):
        alias_package(ALIAS, "metaloop.compat.no_such_library")
    remove_alias(ALIAS)


def test_the_shim_on_pythonpath_makes_unchanged_learn2learn_code_run():
    """A fresh interpreter with only tests/compat/shims on PYTHONPATH: learn2learn's README example runs on metaloop."""
    code = """
import torch, learn2learn as l2l
import metaloop.compat.learn2learn as ours
from learn2learn.nn.metalayers import ParameterTransform
from learn2learn.algorithms.lightning import LightningMAML
assert l2l is ours and ParameterTransform is ours.nn.ParameterTransform and l2l.algorithms.LightningMAML is LightningMAML
maml = l2l.algorithms.MAML(torch.nn.Linear(3, 1), lr=0.1)
learner = maml.clone()
x = torch.randn(4, 3)
learner.adapt(learner(x).pow(2).mean())
learner(x).pow(2).mean().backward()
assert all(p.grad is not None for p in maml.parameters())
print("ok", l2l.__name__)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SHIMS), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "metaloop.compat.learn2learn"]
