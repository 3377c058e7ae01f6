"""Every ``>>>`` example in the package's docstrings runs and prints what it shows.

Only the modules whose source holds an example are imported (``metaloop/__main__.py`` runs the command
line on import), and each must hand all its examples to :mod:`doctest`: an example the finder would not
see (in a comment, or a docstring of an object defined elsewhere) fails the count.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metaloop"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _example_lines(path: Path) -> int:
    """Returns how many examples (``>>>`` lines) the source file holds."""
    return sum(1 for line in path.read_text().splitlines() if line.lstrip().startswith(">>> "))


WITH_EXAMPLES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if _example_lines(p)}


def test_the_package_has_examples():
    """The public functions with examples (innerloop_ctx, inner_loop, task_seed, ...) are found."""
    assert {"metaloop", "metaloop.optim.loop", "metaloop.tasks.episodes", "metaloop.cli.schema"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", sorted(WITH_EXAMPLES))
def test_docstring_examples_run(name):
    """Each example of module ``name`` gives the output it shows (doctest, ELLIPSIS and NORMALIZE_WHITESPACE)."""
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module)
    found = sum(len(t.examples) for t in tests)
    assert found == _example_lines(WITH_EXAMPLES[name]), f"{name}: doctest finds {found} examples of the source's {_example_lines(WITH_EXAMPLES[name])}"
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
