"""Fixtures for the Lightning tests: one CPU thread (tiny models on a shared machine)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Runs each test on one intra-op thread: small models are faster so, and other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
