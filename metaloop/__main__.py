"""``python -m metaloop``: the ``metaloop`` command (also what ``torchrun ... -m metaloop fit ...`` runs on every rank)."""

from __future__ import annotations

from metaloop.cli import main

main()
