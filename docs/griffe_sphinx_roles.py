"""A griffe extension for the API reference: Sphinx roles in docstrings become Markdown code.

metaloop's docstrings name other objects as Sphinx does (``:class:`~metaloop.tasks.Task```, which
Sphinx shows as ``Task``); mkdocstrings would print the role's markup. Each role becomes inline code
of the name Sphinx would show.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrites ``:role:`target``` as ```target``` (``:role:`~a.b``` as ```b```) in every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
