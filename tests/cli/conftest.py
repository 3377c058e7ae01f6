"""Fixtures for the CLI tests: each test runs in its own folder, on one CPU thread."""

from __future__ import annotations

import os

import pytest
import torch
from cli_helpers import SMALL_EVAL, TINY, cli


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Runs each test in ``tmp_path`` (Hydra writes outputs/ and multirun/ there) and restores torch's threads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A sinusoid run of 2 meta-steps (maml_sinusoid, TINY budget, small evaluation sets): its folder, once per test module."""
    run = tmp_path_factory.mktemp("trained") / "run"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cli("fit", "--config", "maml_sinusoid.yaml", *TINY, *SMALL_EVAL, f"hydra.run.dir={run}")
    return run
