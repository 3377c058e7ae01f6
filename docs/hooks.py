"""MkDocs hooks: the parts of the site that are generated, never copied by hand.

- ``<!-- generated: usage -->``, ``<!-- generated: recipes -->`` and ``<!-- generated: configuration -->``
  in a page are replaced by the Markdown of :mod:`metaloop.cli.reference`: the command's usage, the
  recipes' headers, and the configuration reference (the schema's types, ranges and choices, the config
  files' defaults and comments).
- The results tables that ``reports/*.py`` and ``benchmarks/*.py`` write (``reports/*.md``,
  ``benchmarks/results/*.md`` and their plots) become the pages ``results/`` and ``benchmarks/``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's metaloop, whatever the environment has installed

from metaloop.cli.reference import config_markdown, recipes_markdown, usage_markdown  # noqa: E402

GENERATED = {
    "<!-- generated: usage -->": usage_markdown,
    "<!-- generated: recipes -->": recipes_markdown,
    "<!-- generated: configuration -->": config_markdown,
}
# folder of the repository -> folder of the site, for the tables and plots the scripts write
RESULTS = {ROOT / "reports": "results", ROOT / "benchmarks" / "results": "benchmarks"}


def on_files(files: Files, config: Any) -> Files:
    """Adds the reports' and benchmarks' tables and plots as pages and images of the site."""
    for folder, site_folder in RESULTS.items():
        for path in sorted([*folder.glob("*.md"), *folder.glob("*.png")]):
            files.append(File.generated(config, f"{site_folder}/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Replaces each ``<!-- generated: ... -->`` marker with the Markdown it names."""
    for marker, render in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
