"""``python -m metaloop.cli``: the ``metaloop`` command."""

from __future__ import annotations

from metaloop.cli import main

main()
