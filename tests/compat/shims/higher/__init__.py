"""A package named ``higher`` served by metaloop, for running higher's own test suite against metaloop.

Put ``tests/compat/shims`` first on ``PYTHONPATH`` (see ``scripts/peer_tests_higher.sh``); every
name is metaloop's, re-exported under higher's module layout.
"""

from metaloop import create_diff_optim, get_diff_optim, innerloop_ctx, monkeypatch, register_optim

from higher import optim, patch, utils

__all__ = ["innerloop_ctx", "monkeypatch", "get_diff_optim", "create_diff_optim", "register_optim", "optim", "patch", "utils"]
