"""The generated reference: every typed key, option, default and comment, read from the schema and the config files."""

from __future__ import annotations

import re
import shutil

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metaloop.cli import USAGE, config_dir, recipe_summaries
from metaloop.cli import schema
from metaloop.cli.reference import config_markdown, file_entries, recipes_markdown, usage_markdown


def _row(markdown: str, key: str) -> list[str]:
    """Returns the cells of the first table row whose first cell is ``key`` in code."""
    line = next(line for line in markdown.splitlines() if line.startswith(f"| `{key}` |"))
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]


def _assert_listed(markdown: str, name: str, key: schema.Key) -> None:
    cells = _row(markdown, name)
    assert cells[1] == {"number": "float"}.get(key.kind, key.kind), name
    for choice in key.choices:
        assert f"`{choice}`" in cells[2], (name, choice)
    if key.minimum is not None:
        assert f"≥ {key.minimum:g}" in cells[2], name
    assert ("or `null`" in cells[2]) == key.optional, name


def _section(markdown: str, group: str, option: str) -> str:
    """Returns the part of the reference about option ``group=option``."""
    start = markdown.index(f"#### `{group}={option}`")
    end = markdown.find("\n#### ", start + 1)
    return markdown[start:end if end > 0 else None]


def test_every_typed_key_is_listed_with_its_type_range_and_choices():
    """The command line's own keys, InnerOptions' fields, and every learner's and model's typed arguments in its option's table."""
    reference = config_markdown()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        typed = schema.typed_keys(OmegaConf.to_container(compose("config")))
    for name, key in typed.items():
        if name in schema.KEYS or name.startswith("inner."):
            _assert_listed(reference, name, key)
    derived = set()
    for option in [*(config_dir() / "module").glob("*.yaml"), *(config_dir() / "model").glob("*.yaml")]:
        group, target = option.parent.name, yaml.safe_load(option.read_text())["_target_"]
        section = _section(reference, group, option.stem)
        for name, key in schema.target_keys({group: {"_target_": target}}).items():
            if name.count(".") == 1:  # module.inner.*: the inner.* keys
                _assert_listed(section, name, key)
                derived.add(name)
    assert {"module.msl_anneal_steps", "module.inner_batch", "model.eval_stats", "model.steps"} <= derived


def test_defaults_and_descriptions_come_from_the_config_files():
    reference = config_markdown()
    assert _row(reference, "inner.steps") == [
        "`inner.steps`", "int", "≥ 0 (inner steps per task in meta-training)", "`1`", "inner steps per task in meta-training"
    ]
    # a key a group sets: its default option's value, and the options that set it
    cells = _row(reference, "task.k_queries")
    assert cells[3] == "`15`" and "`task=omniglot`" in cells[4] and "`task=sinusoid`" in cells[4]
    assert cells[5] == "query examples per class"
    # a pipe in a comment stays inside its cell
    assert _row(reference, "memory_format")[4].startswith("auto \\| channels_last \\| contiguous")


def test_a_new_key_and_option_appear_without_being_written_down(tmp_path, monkeypatch):
    """The reference is generated: a key added to the schema and an option added to a group show up."""
    folder = tmp_path / "configs"
    shutil.copytree(config_dir(), folder)
    (folder / "model" / "tiny.yaml").write_text(
        "# A tiny MLP for tests\n_target_: metaloop.lightning.MLP\nsizes: [1, 8, 1]   # layer widths\n"
    )
    monkeypatch.setitem(schema.KEYS, "model.width", schema.Key("int", minimum=2, hint="hidden units"))
    reference = config_markdown(folder)
    assert "| [`tiny`](#model-tiny) | A tiny MLP for tests |" in reference
    assert "| `model.sizes` |  |  | `[1, 8, 1]` | layer widths |" in reference
    assert _row(reference, "model.width")[1:3] == ["int", "≥ 2 (hidden units)"]


def test_file_entries_read_nested_keys_comments_and_global_packages(tmp_path):
    path = tmp_path / "launcher.yaml"
    path.write_text("# @package _global_\n# A launcher\nhydra:\n  launcher:   # the plugin's\n    n_jobs: 2   # at once\n")
    assert [(e.key, e.default, e.doc, e.mapping) for e in file_entries(path, "launcher.")] == [
        ("hydra", None, "", True),
        ("hydra.launcher", None, "the plugin's", True),
        ("hydra.launcher.n_jobs", 2, "at once", False),
    ]


def test_usage_and_recipes_are_the_commands():
    assert USAGE in usage_markdown()
    recipes = recipes_markdown()
    for name, summary in recipe_summaries().items():
        assert f"| `{name}.yaml` |" in recipes, name


def test_a_learners_options_are_listed_from_its_constructors_hints():
    """module=mamlpp's table types its own options from MAMLPlusPlus's hints; an argument the option does not set
    is listed with the constructor's default."""
    reference = config_markdown()
    mamlpp = _section(reference, "module", "mamlpp")
    assert _row(mamlpp, "module.msl_anneal_steps")[1:4] == [
        "int", "≥ 0 (meta-steps over which the multi-step loss anneals to the last step; 0: the last step's loss only)", "`5000`"
    ]
    assert _row(mamlpp, "module.lslr")[1:4] == ["bool", "", "`true`"]
    assert _row(mamlpp, "module.head")[1:4] == ["str", "or `null`", "`null`"]
    reptile = _section(reference, "module", "reptile")
    assert _row(reptile, "module.inner_batch")[1:3] == ["int", "≥ 1 or `null` (examples per inner step in training)"]
    per_step = _section(reference, "model", "conv4_per_step_bn")
    assert _row(per_step, "model.eval_stats")[1] == "choice" and "`running`, `batch`" in _row(per_step, "model.eval_stats")[2]
    assert _row(per_step, "model.steps")[1:3] == ["int", "≥ 1 (the inner steps of the per-step BatchNorm, ${inner.steps})"]
