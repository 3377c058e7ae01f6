"""The command line and configuration reference, generated from the schema and the config files.

Nothing here is written twice: a key's type, range and choices come from :func:`metaloop.cli.schema.typed_keys`
(the command line's own keys, :class:`~metaloop.algorithms.options.InnerOptions`' fields, and the hinted
arguments of each option's ``_target_``, e.g. a learner's ``module.*`` options), or, for the other keys, from
the type of their default, as :func:`metaloop.cli.schema.check_config` checks them; its default and meaning
from the YAML file that sets it (the value and the comment on its line);
a config group's options and what each is from the option files' header comments; the commands from
:data:`metaloop.cli.USAGE`; the recipes from their headers. The documentation site renders
:func:`usage_markdown`, :func:`recipes_markdown` and :func:`config_markdown` into its pages
(``docs/hooks.py``), so a new key, option or recipe appears there without anyone writing it down.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metaloop.cli import USAGE, config_dir, recipe_summaries
from metaloop.cli.schema import _SKIPPED_ROOTS, KEYS, Key, _resolve, _rule_from_default, typed_keys
from metaloop.typed import constructors, keys_of

__all__ = ["Entry", "config_markdown", "file_entries", "header_comment", "recipes_markdown", "usage_markdown"]

_GLOBAL = "# @package _global_"
_KIND_NAMES = {"int": "int", "number": "float", "bool": "bool", "str": "str", "regex": "regex", "choice": "choice"}
_INTERNAL_GROUPS = ("hydra",)  # Hydra's own settings (job logging): not choices a user makes


@dataclass(frozen=True)
class Entry:
    """One key of a YAML config file: its dotted name, its value as written (None for a mapping) and its comment."""

    key: str
    default: Any
    doc: str
    mapping: bool = False


def header_comment(path: Path) -> str:
    """Returns the comment lines at the top of a YAML file, one per line (Hydra's ``@package`` line left out).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "sgd.yaml"
        >>> _ = path.write_text("# @package _global_\\n# Gradient descent (Finn et al. 2017)\\n#\\n# lr: MAML's\\nlr: 0.4\\n")
        >>> header_comment(path).splitlines()
        ['Gradient descent (Finn et al. 2017)', '', "lr: MAML's"]
    """
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


def _comment(text: str) -> str:
    """Returns the comment in the rest of a YAML line after its value ("" if none)."""
    _, hash_, comment = text.partition("#")
    return comment.strip() if hash_ else ""


def _entries(node: yaml.Node, lines: list[str], prefix: str) -> Iterator[Entry]:
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        name = f"{prefix}{key.value}"
        line = lines[key.start_mark.line]
        if isinstance(value, yaml.MappingNode) and not value.flow_style:
            yield Entry(name, None, _comment(line[key.end_mark.column + 1:]), mapping=True)
            yield from _entries(value, lines, f"{name}.")
            continue
        on_same_line = value.end_mark.line == key.start_mark.line
        rest = line[value.end_mark.column:] if on_same_line else line[key.end_mark.column + 1:]
        yield Entry(name, yaml.safe_load(yaml.serialize(value)), _comment(rest))


def file_entries(path: Path, prefix: str = "") -> list[Entry]:
    """Returns every key of the YAML file at ``path`` (mappings and their keys, depth first), named ``prefix + key``.

    A file that starts with ``# @package _global_`` sets keys from the root: ``prefix`` is not added.
    The ``defaults`` list is left out (see :func:`config_markdown`, which names what an option builds on).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "inner.yaml"
        >>> _ = path.write_text("steps: 1   # inner steps per task\\nimplicit:   # iMAML\\n  lam: 1.0\\n")
        >>> [(e.key, e.default, e.doc) for e in file_entries(path, "inner.")]
        [('inner.steps', 1, 'inner steps per task'), ('inner.implicit', None, 'iMAML'), ('inner.implicit.lam', 1.0, '')]
    """
    text = path.read_text()
    if text.startswith(_GLOBAL):
        prefix = ""
    node = yaml.compose(text)
    return [e for e in _entries(node, text.splitlines(), prefix) if e.key.removeprefix(prefix) != "defaults"] if node else []


def _summary(header: str) -> str:
    """Returns a header's first sentence: its first line, and the lines that continue it (starting in lower case)."""
    lines = header.splitlines() or [""]
    summary = lines[0]
    for line in lines[1:]:
        if not line or not (line[0].islower() or line[0] == "("):
            break
        summary += " " + line
    return summary


def _shown(entry: Entry) -> bool:
    """True for the keys an option's table lists: values, mappings with a comment, and ``_target_`` (not
    Hydra's other instantiation flags, which say nothing to a reader)."""
    name = entry.key.rsplit(".", 1)[-1]
    if name.startswith("_") and name != "_target_":
        return False
    return not entry.mapping or bool(entry.doc)


def _cell(text: str) -> str:
    """Returns ``text`` safe in a Markdown table cell (pipes, emphasis markers and tags escaped)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def _code(value: Any) -> str:
    """Returns a YAML value as inline code for a table cell."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (list, dict)):
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    else:
        text = str(value)
    return "`" + text.replace("|", "\\|") + "`"


def _accepted(rule: Key) -> str:
    """Returns the values a typed key accepts, for a table cell: choices, range, null, and the schema's hint."""
    parts = []
    if rule.choices:
        parts.append(", ".join(f"`{c}`" for c in rule.choices))
    if rule.minimum is not None:
        parts.append(f"≥ {rule.minimum:g}")
    if rule.optional:
        parts.append("or `null`")
    if rule.hint:
        parts.append(f"({_cell(rule.hint)})")
    return " ".join(parts)


def _type_and_accepted(name: str, keys: dict[str, Key], reference: dict[str, Any]) -> tuple[str, str]:
    """Returns (type, accepted values) of key ``name`` as :func:`metaloop.cli.schema.check_config` checks it.

    ``keys`` are the typed keys (:func:`~metaloop.cli.schema.typed_keys`); another key takes the type of its
    default in ``reference`` (a nested dict of defaults), except under the groups whose keys are arguments.
    """
    rule = keys.get(name)
    if rule is not None:
        return _KIND_NAMES[rule.kind], _accepted(rule)
    path = tuple(name.split("."))
    if path[0] in _SKIPPED_ROOTS:
        return "", "the target's argument"
    rule = _rule_from_default(path, reference)
    return (_KIND_NAMES[rule.kind], "") if rule is not None else ("", "any")


def _unset_arguments(option: _Option) -> list[tuple[str, Key, Any]]:
    """Returns (key, its type, the constructor's default) of each typed argument of the option's ``_target_`` it does not set.

    Only for metaloop's own classes (a learner's options): torch's and Lightning's are documented by them.
    """
    target = next((e.default for e in option.entries if e.key == f"{option.group}._target_"), None)
    obj = _resolve(target) if isinstance(target, str) and target.startswith("metaloop.") else None
    if obj is None:
        return []
    try:
        keys = keys_of(obj, f"{option.group}.")
        defaults = {n: p.default for f in reversed(constructors(obj)) for n, p in inspect.signature(f).parameters.items()}
    except (ValueError, TypeError):
        return []
    written = {e.key for e in option.entries}
    unset = []
    for name, key in keys.items():
        argument = name.removeprefix(f"{option.group}.")
        if "." in argument or name in written:
            continue  # a dataclass argument's fields are its own keys (module.inner.*: the inner.* keys)
        default = defaults.get(argument, inspect.Parameter.empty)
        unset.append((name, key, None if default is inspect.Parameter.empty else default))
    return unset


@dataclass(frozen=True)
class _Option:
    """One option of a config group: its file's header, keys and what it builds on."""

    group: str
    name: str
    header: str
    entries: list[Entry]
    builds_on: list[str]


def _option(group: str, path: Path) -> _Option:
    data = yaml.safe_load(path.read_text())
    defaults = data.get("defaults", []) if isinstance(data, dict) else []
    builds_on = [d if isinstance(d, str) else ", ".join(f"{k}: {v}" for k, v in d.items()) for d in defaults if d != "_self_"]
    return _Option(group, path.stem, header_comment(path), file_entries(path, f"{group}."), builds_on)


def _groups(folder: Path, order: list[str]) -> dict[str, list[_Option]]:
    """Returns each config group under ``folder`` with its options: the groups in ``order`` first, then by name."""
    found = sorted((p for p in folder.iterdir() if p.is_dir() and p.name not in _INTERNAL_GROUPS), key=lambda p: p.name)
    found.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
    return {group.name: [_option(group.name, path) for path in sorted(group.glob("*.yaml"))] for group in found}


def _default_choices(folder: Path) -> dict[str, str | None]:
    """Returns each group's default option, as ``config.yaml``'s defaults list names it."""
    defaults = yaml.safe_load((folder / "config.yaml").read_text()).get("defaults", [])
    return {k: v for d in defaults if isinstance(d, dict) for k, v in d.items() if "/" not in k and not k.startswith("override")}


def _nested(entries: list[Entry]) -> dict[str, Any]:
    """Returns the leaves of ``entries`` as a nested dict (the reference configuration a default's type is read from)."""
    tree: dict[str, Any] = {}
    for entry in entries:
        if entry.mapping:
            continue
        *parents, leaf = entry.key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = entry.default
    return tree


def config_markdown(folder: Path | None = None) -> str:
    """Returns the configuration reference as Markdown: the base keys, the typed keys the groups set, each group's options.

    ``folder`` is the folder of ``config.yaml`` and the config groups (default: :func:`metaloop.cli.config_dir`).
    """
    folder = config_dir() if folder is None else folder
    chosen = _default_choices(folder)
    groups = _groups(folder, list(chosen))
    base = file_entries(folder / "config.yaml")
    default_options = [o for g, options in groups.items() for o in options if chosen.get(g) == o.name]
    reference = _nested(base + [e for o in default_options for e in o.entries])
    keys = typed_keys(reference)
    out = [
        "## Keys of the base configuration",
        "",
        "`configs/config.yaml`: every recipe starts from these values. *Accepted* is what the command checks "
        "before anything runs; keys without a listed type take the type of their default.",
        "",
        "| Key | Type | Accepted | Default | Description |",
        "|---|---|---|---|---|",
    ]
    for entry in base:
        if entry.key.split(".")[0] in ("hydra", "callbacks") or entry.mapping and not entry.doc:
            continue
        if entry.mapping:
            out.append(f"| `{entry.key}` | | | | {_cell(entry.doc)} |")
            continue
        kind, accepted = _type_and_accepted(entry.key, keys, reference)
        out.append(f"| `{entry.key}` | {kind} | {accepted} | {_code(entry.default)} | {_cell(entry.doc)} |")
    out += [
        "",
        "## Typed keys set by config groups",
        "",
        "These keys are the command line's own (`metaloop/cli/schema.py`) and set by the options of a config group; "
        "*Default* is the value in the group's default option, else in the first option that sets the key. "
        "The arguments of a `_target_` are typed by its constructor's hints: see each option below.",
        "",
        "| Key | Type | Accepted | Default | Set by | Description |",
        "|---|---|---|---|---|---|",
    ]
    base_keys = {e.key for e in base}
    option_entries = {(o.group, o.name): {e.key: e for e in o.entries} for options in groups.values() for o in options}
    for name, rule in KEYS.items():
        if name in base_keys:
            continue
        setters = [(g, o) for (g, o), entries in option_entries.items() if name in entries]
        in_default = [(g, o) for g, o in setters if chosen.get(g) == o]
        default = _code(option_entries[in_default[0]][name].default) if in_default else (
            f"{_code(option_entries[setters[0]][name].default)} (`{setters[0][0]}={setters[0][1]}`)" if setters else "—"
        )
        doc = next((option_entries[s][name].doc for s in setters if option_entries[s][name].doc), "")
        set_by = ", ".join(f"`{g}={o}`" for g, o in setters) or "the command line"
        out.append(f"| `{name}` | {_KIND_NAMES[rule.kind]} | {_accepted(rule)} | {default} | {set_by} | {_cell(doc)} |")
    out += [
        "",
        "## Config groups",
        "",
        "Choose an option with `GROUP=OPTION` on the command line (`model=mlp`) or in a recipe's defaults list "
        "(`- override model: mlp`); set its keys with `GROUP.KEY=VALUE`. Keys under a `_target_` are the "
        "arguments of that class or function (of a class's constructors along its bases): any of its arguments "
        "may be set (`+GROUP.KEY=VALUE` for one the option does not set), an unknown one is refused, and *Type* "
        "and *Accepted* come from the constructor's type hints.",
        "",
    ]
    for group, options in groups.items():
        out += [f"### `{group}`", "", f"Default: `{group}={chosen.get(group)}`." if group in chosen else "", ""]
        out += ["| Option | What it is |", "|---|---|"]
        out += [f"| [`{o.name}`](#{group}-{o.name}) | {_cell(_summary(o.header))} |" for o in options]
        out.append("")
        for option in options:
            out += [f"#### `{group}={option.name}` {{ #{group}-{option.name} }}", ""]
            if option.header:
                out += ["  \n".join(_cell(line) for line in option.header.splitlines() if line), ""]
            if option.builds_on:
                out += ["Builds on: " + ", ".join(f"`{b}`" for b in option.builds_on) + ".", ""]
            entries = [e for e in option.entries if _shown(e)]
            unset = _unset_arguments(option)
            if not entries and not unset:
                out += ["No keys.", ""]
                continue
            option_keys = typed_keys(_nested(option.entries))
            option_tree = _nested(option.entries)
            out += ["| Key | Type | Accepted | Default | Description |", "|---|---|---|---|---|"]
            for e in entries:
                kind, accepted = ("", "") if e.mapping else _type_and_accepted(e.key, option_keys, option_tree)
                accepted = "" if accepted in ("any", "the target's argument") else accepted
                out.append(f"| `{e.key}` | {kind} | {accepted} | {'' if e.mapping else _code(e.default)} | {_cell(e.doc)} |")
            for name, rule, default in unset:
                out.append(
                    f"| `{name}` | {_KIND_NAMES[rule.kind]} | {_accepted(rule)} | {_code(default)} | "
                    f"the constructor's default, not set by this option (`+{name}=...`) |"
                )
            out.append("")
    return "\n".join(out)


def usage_markdown() -> str:
    """Returns the command line's usage (:data:`metaloop.cli.USAGE`) as a Markdown code block."""
    return "\n".join(["```text", USAGE, "```", ""])


def recipes_markdown() -> str:
    """Returns the recipes as a Markdown table: each name and the first line of its header, as ``metaloop recipes`` lists them."""
    out = ["| Recipe | What it reproduces |", "|---|---|"]
    out += [f"| `{name}.yaml` | {_cell(summary)} |" for name, summary in recipe_summaries().items()]
    return "\n".join(out) + "\n"
