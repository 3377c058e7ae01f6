"""What a checkpoint's stored configuration means for a new command: settings compared and adopted as data, never as code.

``metaloop fit`` stores its resolved configuration in every checkpoint (``metaloop_config``, see
:mod:`metaloop.lightning.runs`). A command that starts from a checkpoint compares it, key by key, with the
configuration it composed:

- a resumed fit refuses settings that change the experiment (:func:`experiment_changes`) unless
  ``resume_changes=allow``; allowed changes are printed and recorded in the resume's ``.hydra/`` record;
- an evaluation (``validate``, ``test``) takes the experiment's settings from the checkpoint: the config
  options whose targets the checkpoint names (:func:`group_overrides`) and its values (:func:`value_overrides`),
  as Hydra overrides; a key the command line sets itself wins, and is reported.

Only values cross over. A ``_target_`` stored in a checkpoint is never instantiated: it only selects one of the
config options the user already has (metaloop's ``configs/`` and ``$METALOOP_CONFIG_PATH``), whose own
``_target_`` builds the object.

Run keys (:func:`is_run_key`) say how, where and how long a command runs, not what is learned: the number of
meta-steps, devices, logging, evaluation set sizes, data folders. They never count as changes, and an
evaluation takes them from its own command line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import yaml

__all__ = [
    "ABSENT", "RUN_KEYS", "explicit_keys", "experiment_changes", "format_changes", "group_overrides", "hydra_value",
    "is_explicit", "is_run_key", "stored_config", "value_overrides",
]

# keys (and the subtrees under them) that do not change what a run learns; the trainer's, except three
RUN_KEYS: tuple[str, ...] = (
    "command", "recipe", "ckpt_path", "resume_changes", "threads", "memory_format", "test_after_fit",
    "optimized_metric", "sweep", "callbacks", "logger", "hydra", "trainer", "task.num_val_tasks", "task.num_test_tasks",
    "task.eval_meta_batch_size", "task.root", "task.download", "task.datamodule.num_workers", "inner.batch_tasks",
    "module.compile",
)
_EXPERIMENT_TRAINER_KEYS = ("trainer.gradient_clip_val", "trainer.gradient_clip_algorithm", "trainer.accumulate_grad_batches")
_INSTANTIATE_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
_KEY = re.compile(r"[A-Za-z_][\w-]*")


class _Absent:
    def __repr__(self) -> str:
        return "(none)"


ABSENT: Any = _Absent()  # a key one of the two configurations does not have


def stored_config(checkpoint: Mapping[str, Any], key: str = "metaloop_config") -> dict[str, Any] | None:
    """Returns the run configuration stored in a loaded checkpoint as plain data (None if it holds none).

    The YAML text is parsed with ``yaml.safe_load``: containers, strings and numbers only.
    """
    text = checkpoint.get(key)
    if not isinstance(text, str):
        return None
    data = yaml.safe_load(text)
    return data if isinstance(data, dict) else None


def is_run_key(name: str) -> bool:
    """True for a key that says how, where or how long a command runs rather than what it learns (see :data:`RUN_KEYS`)."""
    if any(name == k or name.startswith(k + ".") for k in _EXPERIMENT_TRAINER_KEYS):
        return False
    return any(name == k or name.startswith(k + ".") for k in RUN_KEYS)


def explicit_keys(overrides: Sequence[str]) -> set[str]:
    """Returns the keys that Hydra overrides (``KEY=VALUE``, ``+KEY=...``, ``~KEY``) set, without their prefixes."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if o.split("=", 1)[0].lstrip("+~")}


def is_explicit(name: str, explicit: set[str]) -> bool:
    """True if ``name`` is one of the ``explicit`` keys or under one."""
    return any(name == k or name.startswith(k + ".") for k in explicit)


def _leaves(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yields (path, value) of every leaf; an empty mapping is a leaf."""
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            yield from _leaves(value, (*prefix, str(key)))
    elif prefix:
        yield prefix, node


def _lookup(tree: Any, path: Sequence[str]) -> Any:
    for part in path:
        if not isinstance(tree, Mapping) or part not in tree:
            return ABSENT
        tree = tree[part]
    return tree


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _covered(current: Any, path: tuple[str, ...]) -> bool:
    """True if a proper prefix of ``path`` is a leaf of ``current`` (an interpolation or a value that is not a mapping)."""
    for depth in range(1, len(path)):
        node = _lookup(current, path[:depth])
        if node is ABSENT:
            return False
        if not isinstance(node, Mapping):
            return True
    return False


def experiment_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Returns ``{key: (stored value, current value)}`` of each experiment setting ``current`` gives otherwise.

    ``stored`` is a checkpoint's resolved configuration; ``current`` the composed one, unresolved (plain
    containers). A value given by interpolation is not compared: it follows the key it names, which is. Run keys
    are left out. :data:`ABSENT` stands for a key one side lacks; a key the checkpoint lacks that is null now is
    no change (an option added since, whose null keeps the behaviour the checkpoint was fitted with).

    >>> experiment_changes({"seed": 0, "inner": {"lr": 0.4}}, {"seed": 0, "inner": {"lr": 0.1}, "threads": 4})
    {'inner.lr': (0.4, 0.1)}
    >>> experiment_changes({"task": {"n_ways": 5}}, {"task": {"n_ways": 5, "eval_n_ways": None, "within": "alphabet"}})
    {'task.within': ((none), 'alphabet')}
    """
    changes: dict[str, tuple[Any, Any]] = {}
    for path, value in _leaves({k: v for k, v in current.items() if k != "hydra"}):
        name = ".".join(path)
        if is_run_key(name) or _is_interpolation(value):
            continue
        old = _lookup(stored, path)
        if old is ABSENT and value is None:
            continue
        if isinstance(old, Mapping) and old and isinstance(value, Mapping):
            continue  # an empty mapping here, keys there: those keys are compared below
        if not _same(old, value):
            changes[name] = (old, value)
    for path, value in _leaves(stored):
        name = ".".join(path)
        if is_run_key(name) or name in changes or _covered(current, path):
            continue
        if _lookup(current, path) is ABSENT:
            changes[name] = (value, ABSENT)
    return changes


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """Returns ``changes`` as one line: ``inner.lr 0.4 -> 0.1, seed 0 -> 1``."""
    return ", ".join(f"{name} {old!r} -> {new!r}" if isinstance(old, str) or isinstance(new, str) else f"{name} {old} -> {new}"
                     for name, (old, new) in changes.items())


def hydra_value(value: Any) -> str:
    """Returns ``value`` (plain YAML data) written as a Hydra override value, types kept (a string stays quoted).

    Raises:
        ValueError: for a value a command line cannot hold safely (an interpolation, a mapping key Hydra cannot parse).

    >>> hydra_value([1, 40.5, "a'b", None, True])
    "[1,40.5,'a\\\\'b',null,true]"
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        if "${" in value:
            raise ValueError(f"{value!r} is an interpolation")
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if any(k in _INSTANTIATE_KEYS for k in value):
            raise ValueError("it names an object to build; only a config option may")
        bad = [k for k in value if not _KEY.fullmatch(str(k))]
        if bad:
            raise ValueError(f"the key {bad[0]!r} cannot be written on a command line")
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"{value!r} is not plain data")


def _targets(node: Any, shape: Any = None) -> dict[str, Any]:
    """Returns the ``_target_`` of every object a config node builds, by path: what the node is, not its values.

    ``shape``: a node as written (an option's YAML): targets under a key it interpolates (``model: ${model}``)
    are another group's and left out.
    """
    found = {}
    for path, value in _leaves(node):
        if path[-1] != "_target_":
            continue
        if shape is not None and any(_is_interpolation(_lookup(shape, path[:depth])) for depth in range(1, len(path))):
            continue
        found[".".join(path)] = value
    return found


def group_overrides(
    stored: Mapping[str, Any],
    composed: Mapping[str, Any],
    choices: Mapping[str, str | None],
    explicit: set[str],
    options: Callable[[str], Mapping[str, Any]],
) -> list[str]:
    """Returns the ``GROUP=OPTION`` overrides that make ``composed`` build the objects the checkpoint's ``stored`` config names.

    For each config group of ``choices`` (the composed group options) that is not a run key and not chosen on the
    command line (``explicit``), the stored node and the composed one are compared by their ``_target_``\\ s;
    when they differ, the option whose targets are the stored ones is chosen (of several, the one sharing the most
    keys). ``options(group)`` returns each option's node (its YAML as data).

    Raises:
        ValueError: naming the group and the stored targets when no option builds them.
    """
    overrides = []
    for group, choice in choices.items():
        if group.startswith("hydra/") or "/" in group or is_run_key(group) or group in explicit or group not in stored:
            continue
        wanted, node = stored[group], composed.get(group)
        if wanted is None:
            if node is not None:
                overrides.append(f"{group}=null")
            continue
        if node is not None and _targets(node) == _targets(wanted, node):
            continue
        keys = {path for path, _ in _leaves(wanted)}
        fitting = [
            (len(keys ^ {path for path, _ in _leaves(body)}), name)
            for name, body in options(group).items()
            if isinstance(body, Mapping) and _targets(body) == _targets(wanted, body)
        ]
        if not fitting:
            differing = {k: v for k, v in _targets(wanted, node).items() if node is None or _targets(node).get(k) != v}
            shown = ", ".join(f"{k}={v}" for k, v in (differing or _targets(wanted)).items()) or "no object"
            raise ValueError(
                f"the checkpoint's {group} builds {shown}, which none of the {group} options builds; evaluate with the "
                f"configuration the checkpoint was fitted with (its recipe and {group}=OPTION)"
            )
        best = min(fitting)[1]
        if best != choice:
            overrides.append(f"{group}={best}")
    return overrides


def value_overrides(stored: Mapping[str, Any], composed: Mapping[str, Any], explicit: set[str]) -> list[str]:
    """Returns the ``KEY=VALUE`` overrides that give ``composed`` the checkpoint's experiment values.

    Each experiment value of ``composed`` that is neither an interpolation nor set on the command line
    (``explicit``) takes the stored value; a stored value that ``composed`` lacks under a node it has is added
    (``+KEY=VALUE``). ``_target_`` and the other instantiation keys are never taken (see :func:`group_overrides`),
    nor is a key that is not a plain name: what is left differs, and the caller refuses it.

    Raises:
        ValueError: for a stored value a command line cannot hold (see :func:`hydra_value`), naming the key.
    """
    overrides = []
    current = {k: v for k, v in composed.items() if k != "hydra"}
    for name, (old, new) in experiment_changes(stored, current).items():
        path = tuple(name.split("."))
        if old is ABSENT or path[-1] in _INSTANTIATE_KEYS or is_explicit(name, explicit):
            continue
        if not all(_KEY.fullmatch(part) for part in path):
            continue
        if new is ABSENT and not isinstance(_lookup(current, path[:-1]), Mapping):
            continue
        try:
            text = hydra_value(old)
        except ValueError as err:
            raise ValueError(f"the checkpoint's {name}={old!r} cannot be passed on ({err}); set {name} on the command line") from err
        overrides.append(f"{'+' if new is ABSENT else ''}{name}={text}")
    return overrides
