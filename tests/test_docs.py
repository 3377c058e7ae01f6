"""The documentation site builds with warnings as errors, and its examples run.

Code blocks in ``docs/*.md`` and ``README.md`` are read in page order. A comment on the line before
a fence says how the tests use the block:

- no comment: a ``python`` block runs (the blocks of a page run in order, in one namespace, in a fresh
  folder); a ``bash`` block's ``metaloop`` commands are checked as ``metaloop`` checks them before
  running (recipe, every job's composed configuration, plugins, checkpoints);
- ``<!-- run: tiny -->``: a ``bash`` block whose ``metaloop`` commands run, in page order, with a budget
  of two meta-steps on two tasks (later blocks use what they write);
- ``<!-- file: PATH -->``: the block is written to ``PATH`` in the page's folder before later blocks run;
- ``<!-- norun -->``: shown only (a few; :func:`test_few_examples_are_left_out` keeps them few).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("**/*.md")) + [ROOT / "README.md"]
MARKER = re.compile(r"^<!--\s*(norun|run: tiny|file: \S+)\s*-->$")
# two meta-steps on two-task meta-batches (as TINY in tests/cli/cli_helpers.py)
TINY = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "task.meta_batch_size=2",
    "task.eval_meta_batch_size=2",
    "task.num_val_tasks=2",
    "task.num_test_tasks=2",
    "~callbacks.progress_bar",
]
PAGE_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page: its language, code, the line its code starts on, and its marker."""

    page: Path
    lang: str
    code: str
    line: int
    marker: str

    @property
    def origin(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Returns the fenced code blocks of ``page`` (Markdown), each with the marker comment just before its fence."""
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```\s*\{?\s*\.?([\w-]*)", lines[i])
        if not match:
            i += 1
            continue
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        found.append(Block(page, match.group(1), "\n".join(lines[i + 1:end]) + "\n", i + 2, marker.group(1) if marker else ""))
        i = end + 1
    return found


def commands(block: Block) -> list[tuple[dict[str, str], list[str]]]:
    """Returns the ``metaloop`` commands of a bash block as (environment assignments, arguments after ``metaloop``).

    Continuation lines are joined and comments dropped; ``.venv/bin/metaloop``, ``python -m metaloop`` and
    ``torchrun ... -m metaloop`` count as ``metaloop``.
    """
    found = []
    for line in block.code.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|;|\|\|", line):
            words = [os.path.expandvars(w) for w in shlex.split(part, comments=True)]  # as the shell expands $HOME
            env = {}
            while words and re.match(r"^[A-Z_]+=", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            for i, word in enumerate(words):
                if Path(word).name == "metaloop" and (i == 0 or words[i - 1] == "-m"):
                    found.append((env, words[i + 1:]))
                    break
    return found


def _steps(page: Path) -> list[dict[str, object]]:
    """Returns what running ``page`` does, in order: files to write, Python code, ``metaloop`` commands."""
    steps: list[dict[str, object]] = []
    for block in blocks(page):
        if block.marker.startswith("file: "):
            steps.append({"kind": "file", "path": block.marker[len("file: "):], "text": block.code})
        elif block.lang == "python" and block.marker != "norun":
            # padded so that a traceback names the page's own line numbers
            steps.append({"kind": "python", "origin": str(block.page.relative_to(ROOT)), "code": "\n" * (block.line - 1) + block.code})
        elif block.lang == "bash" and block.marker == "run: tiny":
            steps += [{"kind": "metaloop", "origin": block.origin, "env": env, "argv": [*argv, *TINY]} for env, argv in commands(block)]
    return steps


# Runs one page's steps in a fresh process (examples may install import hooks, change torch's defaults).
DRIVER = """
import json, os, pathlib, sys
from metaloop.cli import main
namespace = {"__name__": "__docs__"}
for step in json.loads(pathlib.Path(sys.argv[1]).read_text()):
    if step["kind"] == "file":
        path = pathlib.Path(step["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(step["text"])
    elif step["kind"] == "python":
        exec(compile(step["code"], step["origin"], "exec"), namespace)
    else:
        os.environ.update(step["env"])
        try:
            main(step["argv"])
        except SystemExit as exit:
            if exit.code not in (0, None):
                sys.exit(f"{step['origin']}: metaloop {' '.join(step['argv'])} failed: {exit.code}")
"""

RUNNABLE = [p for p in PAGES if _steps(p)]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_examples_run(page, tmp_path):
    """Every Python block of the page runs without error, in order, after the files and tiny runs before it."""
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps(_steps(page)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    env.pop("METALOOP_CONFIG_PATH", None)
    done = subprocess.run([sys.executable, "-c", DRIVER, str(steps)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)
    assert done.returncode == 0, f"{page.relative_to(ROOT)}'s examples failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_few_examples_are_left_out():
    """At most one Python block in ten is marked ``norun``, and every marker is one the tests know."""
    python = [b for p in PAGES for b in blocks(p) if b.lang == "python"]
    left_out = [b.origin for b in python if b.marker == "norun"]
    assert len(python) >= 10
    assert len(left_out) <= len(python) // 10, f"{len(left_out)} of {len(python)} Python examples do not run: {left_out}"
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.strip().startswith("<!--") and any(w in line for w in ("run", "file:")):
                assert MARKER.match(line.strip()), f"{page.relative_to(ROOT)}:{number}: unknown marker {line.strip()!r}"


CHECKED = [(b, argv) for p in PAGES for b in blocks(p) if b.lang == "bash" and not b.marker for _, argv in commands(b)]


@pytest.mark.parametrize("block, argv", CHECKED, ids=[f"{b.origin} {' '.join(a[:3])}" for b, a in CHECKED])
def test_commands_are_accepted(block, argv, tmp_path, monkeypatch, capsys):
    """Every ``metaloop`` command in the docs passes the checks ``metaloop`` makes before it runs anything.

    Checkpoints the command names are stood in for by checkpoints holding no weights and no stored configuration
    (the checks read them: a resume compares its settings with a stored configuration, when there is one).
    """
    from metaloop.cli import COMMANDS, UsageError, _hydra_argv, main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METALOOP_CONFIG_PATH", raising=False)
    assert argv, f"{block.origin}: a bare metaloop"
    if argv[0] not in COMMANDS:
        main(argv)  # metaloop recipes, metaloop --help: they only print
        assert capsys.readouterr().out
        return
    values = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    ckpt = values.get("ckpt_path")
    if ckpt == "last":
        ckpt = str(Path(values["hydra.run.dir"]) / "checkpoints" / "last.ckpt")
    if ckpt not in (None, "none", "null"):
        Path(ckpt).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {}, "global_step": 0}, ckpt)
    try:
        _hydra_argv(argv[0], argv[1:])
    except UsageError as err:
        pytest.fail(f"{block.origin}: metaloop {' '.join(argv)} is refused: {err}")


@pytest.mark.slow
def test_site_builds_with_warnings_as_errors(tmp_path):
    """``mkdocs build --strict`` succeeds: every docstring parses, every link and anchor resolves, and the generated
    reference holds every typed key and config group option."""
    from metaloop.cli.schema import KEYS

    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    reference = (site / "configuration" / "index.html").read_text()
    for key in KEYS:
        assert f"<code>{key}</code>" in reference, f"{key} is missing from the configuration reference"
    for option in (ROOT / "configs").glob("*/*.yaml"):
        if option.parent.name != "hydra":
            assert f"<code>{option.parent.name}={option.stem}</code>" in reference, option
    for page in ("api/lightning", "results/omniglot", "benchmarks/speed", "guarantees"):
        assert (site / page / "index.html").is_file(), page
    for page in (site / "api").glob("*/index.html"):
        html = page.read_text()
        # docstrings read as Markdown: Sphinx roles rewritten, >>> examples in Examples sections (not nested quotes)
        assert ":class:" not in html and ":func:" not in html, page
        assert "&gt;&gt;&gt;" not in html.replace('<span class="gp">&gt;&gt;&gt; </span>', ""), page


def test_readme_is_a_front_page():
    """README.md is at most ~150 lines, keeps the two commands and the docs' build command, and every page of the
    docs it links to exists."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "bash scripts/setup.sh && .venv/bin/metaloop fit --config maml_omniglot.yaml" in text
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest -n 2 -q" in text
    assert "pip install -e '.[docs]'" in text and "mkdocs serve" in text
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert len(links) >= 8
    for link in links:
        assert (ROOT / link).is_file(), link
