"""Fixtures for the CLI tests: each test runs in its own folder, on one CPU thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Runs each test in ``tmp_path`` (Hydra writes outputs/ and multirun/ there) and restores torch's threads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)
