"""The configuration's schema: every key typed, unknown keys refused, each bad value reported in one line.

:func:`check_command_line` composes the run (each value of a sweep too) with Hydra's compose API
*before* Hydra starts, so a bad value is reported before any run folder or file is written.
What is checked:

- the recipe files: YAML syntax (file, line and column), a defaults list that builds on ``config``,
  and every key a recipe sets exists in the base configuration, the chosen group option, or the
  arguments of the ``_target_`` it sits under (a typo such as ``inner: {lrr: 5.0}`` or
  ``module: {msl_anealing: 3}`` is refused naming file and line, as Hydra refuses it on the command line);
- values: the typed keys of :func:`typed_keys` (ranges and choices), and every other leaf has the type of
  its default (a boolean stays a boolean: ``inner.first_order=no`` is refused, not read as true); a
  number is finite (``inner.lr=nan`` or ``inf`` is refused, in every value of a sweep too);
- constructor arguments: a key under a ``_target_`` must be a parameter of that callable (of a class's
  constructors along its bases, while they pass ``**kwargs`` on).

A key's type, range and choices are written once, as a type hint: ``inner.*`` are the fields of
:class:`~metaloop.algorithms.options.InnerOptions`, and the keys under a ``_target_`` (``module.*``,
``model.*``, ...) the hinted parameters of its constructor (:func:`metaloop.typed.keys_of`), so a learner's
new option is checked, and listed in the reference, without an edit here. :data:`KEYS` holds only the keys
the command line itself owns, which no constructor takes.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml

from metaloop.lightning.precision import ACCEPTED_PRECISIONS, MemoryFormat
from metaloop.typed import Hint, Key, accepts_none, constructors, keys_of, parameter_hints

__all__ = [
    "ConfigError", "KEYS", "Key", "check_command_line", "check_config", "check_recipe_chain", "check_recipe_keys",
    "inner_keys", "target_keys", "typed_keys",
]

_HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")
_INSPECTION_FLAGS = ("--cfg", "-c", "--info", "-i", "--hydra-help", "--resolve")
_INSTANTIATE_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
# groups whose leaves are not type-checked against their defaults: Hydra's own, and those whose keys are
# constructor arguments typed by their target's hints (a default's type says less than the hint)
_SKIPPED_ROOTS = {"hydra", "module", "callbacks", "logger"}


class ConfigError(ValueError):
    """A configuration mistake, reported as one line naming the key, the value and what is accepted."""


def _int(minimum: int | None = None, optional: bool = False, hint: str = "") -> Key:
    return Key("int", minimum=minimum, optional=optional, hint=hint)


_MEMORY_FORMAT = Annotated[MemoryFormat, Hint("channels_last is faster for conv nets on GPUs and bf16 CPUs")]

#: The keys the command line owns: the run's own settings, the trainer's (stricter than Lightning's hints:
#: the task stream is endless, float16 is refused) and the task's values, which its datamodule's
#: constructors read through interpolation. Every other typed key is derived (:func:`typed_keys`).
KEYS: dict[str, Key] = {
    "seed": _int(),
    "threads": _int(0, hint="0 keeps torch's default"),
    "ckpt_path": Key("str", optional=True, hint="a checkpoint file, 'last', or 'none' for no checkpoint"),
    "resume_changes": Key("choice", choices=("refuse", "allow"), hint="allow: resume with other experiment settings on purpose"),
    "test_after_fit": Key("bool"),
    "command": Key("choice", choices=("fit", "validate", "test")),
    "recipe": Key("str"),
    "memory_format": Key.of(_MEMORY_FORMAT),
    "trainer.precision": Key(
        "choice", choices=ACCEPTED_PRECISIONS,
        hint="auto: bf16-mixed where bfloat16 is fast, else 32-true; 16-mixed is refused: the inner loop's gradients "
        "are not loss-scaled and underflow in float16",
    ),
    "trainer.max_steps": _int(1, hint="meta-steps; the task stream is endless, so a run needs an end"),
    "trainer.val_check_interval": _int(1, hint="meta-steps between validations and checkpoints"),
    "trainer.max_time": Key("str", optional=True, hint="a wall-clock limit DD:HH:MM:SS, e.g. 00:00:05:00"),
    "trainer.log_every_n_steps": _int(1),
    "trainer.num_nodes": _int(1),
    "trainer.num_sanity_val_steps": _int(-1),
    "trainer.strategy.timeout_s": Key(
        "number", minimum=1, hint="seconds a DDP rank waits for the others in a collective before the run stops"
    ),
    "optimized_metric": Key("str", optional=True, hint="a metric the job logs, e.g. val/loss_post"),
    "sweep.continue_on_failure": Key("bool"),
    "sweep.devices_per_job": _int(1, optional=True),
    "sweep.group": Key("str", hint="the name that groups a sweep's jobs in experiment trackers; empty outside a sweep"),
    "sweep.max_pending_min": Key("number", minimum=0, optional=True, hint="launcher=submitit_slurm: minutes a job may wait in the queue"),
    "task.n_ways": _int(2, optional=True),
    "task.eval_n_ways": _int(2, optional=True, hint="ways of validation and test tasks; null: task.n_ways"),
    "task.within": Key("str", optional=True, hint="a grouping of the dataset's classes, e.g. alphabet (Omniglot): each task's classes from one group"),
    "task.k_shots": _int(1),
    "task.k_queries": _int(1),
    "task.meta_batch_size": _int(1),
    "task.eval_meta_batch_size": _int(1),
    "task.num_val_tasks": _int(0),
    "task.num_test_tasks": _int(0),
    "task.full": Key("bool"),
    "task.download": Key("bool"),
    "task.root": Key("str", optional=True),
}


def inner_keys() -> dict[str, Key]:
    """Returns the keys of the configuration's ``inner:`` node: the fields of :class:`~metaloop.algorithms.options.InnerOptions`.

    Examples:
        >>> inner_keys()["inner.steps"].check("inner.steps", -1)
        'inner.steps=-1 is not accepted (it is below 0); use a whole number >= 0 (inner steps per task in meta-training)'
    """
    from metaloop.algorithms.options import InnerOptions

    return keys_of(InnerOptions, "inner.")


def _resolve(target: Any) -> Any | None:
    """Returns the object at import path ``target`` (a class or function), or None if it cannot be imported."""
    if not isinstance(target, str) or "${" in target:
        return None
    module_name, _, attr = target.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj


def _nodes(node: Any, prefix: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yields ``(prefix, mapping)`` for ``node`` and every mapping below it, parents first, ``prefix`` being its keys' dotted prefix.

    Hydra's own keys (``_target_``, ``_args_``, ...) are not descended into.
    """
    if not isinstance(node, Mapping):
        return
    yield prefix, node
    for key, value in node.items():
        if key not in _INSTANTIATE_KEYS:
            yield from _nodes(value, f"{prefix}{key}.")


def target_keys(node: Any, prefix: str = "") -> dict[str, Key]:
    """Returns the typed keys of every ``_target_`` node in ``node``: its constructor's hinted parameters, by dotted name.

    ``module: {_target_: metaloop.algorithms.MAMLPlusPlus}`` gives ``module.msl_anneal_steps`` (an int >= 0)
    and the other keyword options of MAML++ and its bases (:func:`metaloop.typed.keys_of`).
    """
    keys: dict[str, Key] = {}
    for path, mapping in _nodes(node, prefix):
        obj = _resolve(mapping.get("_target_"))
        if obj is not None:
            try:
                keys.update(keys_of(obj, path))
            except (ValueError, TypeError):
                pass  # a builtin without a signature: nothing to check from it
    return keys


_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def _read_by_arguments(node: Any) -> dict[str, str]:
    """Returns {key: argument} for each key that a ``_target_``'s argument reads by interpolation (``lr: ${inner.lr}``)
    where that argument's hint does not accept null (the first such argument, parents first)."""
    found: dict[str, str] = {}
    for path, mapping in _nodes(node):
        obj = _resolve(mapping.get("_target_"))
        if obj is None:
            continue
        try:
            hints = parameter_hints(obj)
        except (ValueError, TypeError):
            hints = {}
        for key, value in mapping.items():
            match = _INTERPOLATION.match(value) if isinstance(value, str) else None
            if match and key in hints and not accepts_none(hints[key]):
                found.setdefault(match.group(1), f"{path}{key}")
    return found


def typed_keys(cfg: Mapping[str, Any]) -> dict[str, Key]:
    """Returns every typed key of the configuration ``cfg`` (composed, unresolved): :data:`KEYS`, :func:`inner_keys`
    and the :func:`target_keys` of its ``_target_`` nodes (the command line's own :data:`KEYS` win).

    A key that may be null is not when an argument that does not accept null reads it (``inner.lr``, which
    ``inner_optim.lr: ${inner.lr}`` passes to ``torch.optim.SGD``).
    """
    tree = {k: v for k, v in cfg.items() if k != "hydra"}
    keys = {**target_keys(tree), **inner_keys(), **KEYS}
    for name, argument in _read_by_arguments(tree).items():
        key = keys.get(name)
        if key is not None and key.optional and name not in KEYS:  # the command line's own keys say what they accept
            reason = f"{argument} reads it and does not accept null"
            keys[name] = dataclasses.replace(key, optional=False, hint=f"{key.hint}; {reason}" if key.hint else reason)
    return keys


# the most values a recipe file may hold with its YAML aliases expanded (recipes hold a few hundred)
MAX_YAML_VALUES = 100_000
# leaves whose default's type does not say what they accept (Lightning takes several forms)
_FREE_FORM = {"trainer.devices", "trainer.accelerator", "trainer.strategy"}


# -- recipe files ---------------------------------------------------------------------------
def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Returns the parsed YAML file and its node tree; raises ConfigError naming file, line and column.

    Also refused, naming the file: text that is not UTF-8, and aliases that expand to more than
    :data:`MAX_YAML_VALUES` values (a "billion laughs" bomb of 1 KB would exhaust memory when
    the recipe's keys are indexed and composed).
    """
    from metaloop.cli import UsageError, config_text

    try:
        text = config_text(path)
    except UsageError as err:
        raise ConfigError(str(err)) from None
    try:
        node = yaml.compose(text)
        if _expands_beyond(node, MAX_YAML_VALUES):
            raise ConfigError(
                f"{path}: its YAML aliases (*name) expand to more than {MAX_YAML_VALUES:,} values; write the values "
                "out, or use Hydra's ${...} interpolation"
            )
        return yaml.safe_load(text), node
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem})") from err


def _expands_beyond(node: yaml.Node | None, limit: int) -> bool:
    """True if the YAML node tree, each alias expanded, has more than ``limit`` nodes (counting stops there)."""
    pending, count = [node] if node is not None else [], 0
    while pending:
        count += 1
        if count > limit:
            return True
        current = pending.pop()
        if isinstance(current, yaml.MappingNode):
            pending.extend(part for pair in current.value for part in pair)
        elif isinstance(current, yaml.SequenceNode):
            pending.extend(current.value)
    return False


def _key_lines(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path))
    return lines


def _defaults_entries(defaults: Any) -> list[str]:
    """Returns the names of the configs a defaults list builds on (entries that are not group choices)."""
    return [entry for entry in defaults or [] if isinstance(entry, str) and entry != "_self_" and "/" not in entry]


@dataclass(frozen=True)
class RecipeFile:
    """A recipe in the chain of ``--config``: its path, its own keys (with their lines), and what it builds on."""

    path: Path
    body: dict[str, Any]
    lines: dict[tuple[str, ...], int]


def check_recipe_chain(path: Path, search: Sequence[Path]) -> list[RecipeFile]:
    """Returns the recipe at ``path`` and the recipes it builds on, after checking each file's YAML and defaults.

    ``search`` lists the folders where a name in a defaults list is looked up (``configs/``, ``recipes/``).

    Raises:
        ConfigError: malformed YAML (file, line, column), a defaults list that is missing or does not lead
            to ``config``, or a name in it that is not found.
    """
    chain: list[RecipeFile] = []
    current: Path | None = path
    seen: set[Path] = set()
    while current is not None:
        if current in seen:
            raise ConfigError(f"{current} builds on itself through its defaults list")
        seen.add(current)
        data, node = _read_yaml(current)
        if not isinstance(data, dict) or "defaults" not in data:
            raise ConfigError(
                f"{current} has no defaults list; a recipe builds on metaloop's base config: start it with "
                "'defaults: [config, _self_]' (or name another recipe instead of config)"
            )
        parents = _defaults_entries(data["defaults"])
        body = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
        chain.append(RecipeFile(current, body, _key_lines(node)))
        if "config" in parents:
            return chain
        if not parents:
            raise ConfigError(
                f"{current}'s defaults list does not include config; add '- config' as its first entry "
                "(defaults: [config, _self_]) so that the recipe builds on metaloop's base configuration"
            )
        current = _find(parents[0], [current.parent, *search])
        if current is None:
            raise ConfigError(f"{chain[-1].path} builds on {parents[0]!r}, which is in none of {[str(s) for s in search]}")
    return chain


def _find(name: str, folders: Sequence[Path]) -> Path | None:
    for folder in folders:
        candidate = folder / (name if name.endswith(".yaml") else f"{name}.yaml")
        if candidate.is_file():
            return candidate
    return None


# -- composed configuration ------------------------------------------------------------------
def _leaves(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*prefix, str(key)))
    else:
        yield prefix, node


def _get(tree: Any, path: Sequence[str]) -> tuple[bool, Any]:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def _arguments(target: Any) -> tuple[list[str], bool] | None:
    """Returns (the parameter names, whether it takes any keyword) of the callable at import path ``target``, or None if unknown.

    A class's are those of its constructors along its bases, while they pass ``**kwargs`` on.
    """
    obj = _resolve(target)
    if obj is None:
        return None
    try:
        signatures = [inspect.signature(f) for f in constructors(obj)] or [inspect.signature(obj)]
    except (ValueError, TypeError):
        return None
    names = [n for s in signatures for n, p in s.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"]
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in signatures[-1].parameters.values())
    return list(dict.fromkeys(names)), var_keyword


def _not_an_argument(target: Any, key: str, name: str) -> str | None:
    """Returns the problem of setting ``key`` (named ``name`` in the message) under ``_target_: target``, or None."""
    found = _arguments(target)
    if found is None or key in _INSTANTIATE_KEYS:
        return None
    names, var_keyword = found
    if key in names or var_keyword:
        return None
    accepted = ", ".join(sorted(n for n in names if n != "params"))
    return f"{name} is not an argument of {target} (it takes: {accepted})"


def _check_targets(node: Any, problems: list[str]) -> None:
    for prefix, mapping in _nodes(node):
        if "_target_" in mapping:
            for key in mapping:
                problem = _not_an_argument(mapping["_target_"], key, f"{prefix}{key}")
                if problem:
                    problems.append(problem)


def check_recipe_keys(recipes: Sequence[RecipeFile], reference: dict[str, Any]) -> None:
    """Raises :class:`ConfigError` naming file and line of each key a recipe sets that ``reference`` lacks.

    ``reference`` is the base configuration with the recipe's own group options and no recipe values.
    A key under a ``_target_`` must be an argument of that target (its value is checked by :func:`check_config`).
    """
    problems: list[str] = []
    for recipe in recipes:
        for path, _ in _leaves(recipe.body):
            _check_recipe_key(recipe, path, reference, problems)
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))


def check_config(cfg: dict[str, Any], reference: dict[str, Any]) -> None:
    """Raises :class:`ConfigError` with every problem of the composed ``cfg`` (unresolved, as plain containers).

    ``reference`` is the base configuration with the same group options and no recipe values: the
    types of the defaults, for the keys :func:`typed_keys` does not type.
    """
    problems: list[str] = []
    keys = typed_keys(cfg)
    for path, value in _leaves(cfg):
        name = ".".join(path)
        if not path or path[0] == "hydra" or _is_interpolation(value):
            continue
        rule = keys.get(name)
        if rule is None and path[0] not in _SKIPPED_ROOTS:
            rule = _rule_from_default(path, reference)
        if rule is not None:
            problem = rule.check(name, value)
            if problem:
                problems.append(problem)
    _check_targets({k: v for k, v in cfg.items() if k != "hydra"}, problems)
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _rule_from_default(path: tuple[str, ...], reference: dict[str, Any]) -> Key | None:
    if ".".join(path) in _FREE_FORM:
        return None
    found, default = _get(reference, path)
    if not found or default is None or _is_interpolation(default):
        return None
    if isinstance(default, bool):
        return Key("bool")
    if isinstance(default, int):
        return Key("int")
    if isinstance(default, float):
        return Key("number")
    return None


def _check_recipe_key(recipe: RecipeFile, path: tuple[str, ...], reference: dict[str, Any], problems: list[str]) -> None:
    if not path or path[0] == "hydra":
        return
    for depth in range(1, len(path) + 1):
        found, node = _get(reference, path[:depth])
        if not found:
            parent_found, parent = _get(reference, path[: depth - 1])
            line = recipe.lines.get(path[:depth])
            where = f"{recipe.path}:{line}" if line else str(recipe.path)
            name = ".".join(path[:depth])
            if parent_found and parent is None:
                return  # a group chosen as null (scheduler: null) that the recipe fills in
            known = ", ".join(sorted(parent)) if parent_found and isinstance(parent, dict) else ""
            problems.append(f"{where}: {name} is not a configuration key" + (f" ({'.'.join(path[:depth - 1]) or 'the config'} has: {known})" if known else ""))
            return
        if isinstance(node, dict) and "_target_" in node and depth < len(path):
            # a constructor argument: one the target's constructors take (its value is checked by check_config)
            if path[depth] not in node:
                line = recipe.lines.get(path[: depth + 1])
                problem = _not_an_argument(node["_target_"], path[depth], ".".join(path[: depth + 1]))
                if problem:
                    problems.append(f"{f'{recipe.path}:{line}' if line else recipe.path}: {problem}")
            return


# -- the command line -----------------------------------------------------------------------
def hydra_overrides(args: Sequence[str]) -> tuple[list[str], bool]:
    """Returns (the ``KEY=VALUE`` overrides in Hydra's arguments ``args``, whether a flag only inspects the config)."""
    overrides, inspecting, skip = [], False, False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            flag = arg.split("=", 1)[0]
            inspecting = inspecting or flag in _INSPECTION_FLAGS
            skip = "=" not in arg and flag in _HYDRA_FLAGS_WITH_VALUE
            continue
        overrides.append(arg)
    return overrides, inspecting


def _job_overrides(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """Returns the override lists to check: the first job, plus each other value of every sweep override."""
    if not multirun:
        return [list(overrides)]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    first, variants = [], []
    for override, text in zip(parsed, overrides):
        if not override.is_sweep_override():
            first.append(text)
            continue
        key = override.get_key_element()
        values = _sweep_values(override)
        if not values:
            continue  # a sweep the sweeper samples from (e.g. Optuna's tag()): checked by each job
        first.append(f"{key}={values[0]}")
        variants.extend((len(first) - 1, f"{key}={v}") for v in values[1:])
    jobs = [first]
    for index, text in variants:
        job = list(first)
        job[index] = text
        jobs.append(job)
    return jobs


def _sweep_values(override: Any) -> list[str]:
    """Returns the values a sweep override takes: each choice or range value, an interval's two ends."""
    from hydra.core.override_parser.types import IntervalSweep
    from hydra.errors import HydraException

    try:
        return list(override.sweep_string_iterator())
    except HydraException:
        sweep = override.value()
        if isinstance(sweep, IntervalSweep):
            return [str(sweep.start), str(sweep.end)]
        return []


def check_command_line(
    folder: Path,
    name: str,
    args: Sequence[str],
    search: Sequence[Path],
    config_folder: Path,
    multirun: bool,
    to_error: Callable[[str], Exception],
) -> dict[str, Any] | None:
    """Returns the first job's composed config (plain, unresolved, with ``hydra``) after checking every job.

    Raises ``to_error(message)`` for the first bad job, before any file exists. ``folder``/``name``: the
    primary config; ``search``: the config search path; ``config_folder``: the folder of ``config.yaml``
    and the groups. Sweeps are checked value by value. Returns None for flags that only inspect the
    config (``--cfg``, ``--info``), which are not checked.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides, inspecting = hydra_overrides(args)
    if inspecting:
        return None
    try:
        recipes = check_recipe_chain(folder / f"{name}.yaml", search) if name != "config" or folder != config_folder else []
    except ConfigError as err:
        raise to_error(str(err)) from err
    searchpath = "hydra.searchpath=[" + ",".join(f"'file://{p}'" for p in search) + "]"
    try:
        jobs = _job_overrides(overrides, multirun)
    except HydraException as err:
        raise to_error(str(err).splitlines()[0]) from err
    first: dict[str, Any] | None = None
    def composed_with(job: Sequence[str]) -> tuple[Any, dict[str, Any]]:
        """Returns the composed config of ``job`` and the base config with its group choices."""
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
                composed = compose(name, overrides=[searchpath, *job], return_hydra_config=True)
            choices = {g: c for g, c in composed.hydra.runtime.choices.items() if not g.startswith("hydra/") and c is not None}
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(config_folder), version_base="1.3"):
                reference = compose("config", overrides=[searchpath, *(f"{g}={c}" for g, c in choices.items())])
        except (HydraException, OmegaConfBaseException) as err:
            raise to_error(_first_line(err)) from err
        except UnicodeDecodeError as err:  # a group option that is not UTF-8; Hydra does not say which file
            raise to_error(_not_utf8([folder, *search])) from err
        finally:
            GlobalHydra.instance().clear()
        return composed, OmegaConf.to_container(reference, resolve=False)

    if recipes:
        # the recipe's keys are checked against its own group options (a command line may swap a group)
        try:
            check_recipe_keys(recipes, composed_with([])[1])
        except ConfigError as err:
            raise to_error(str(err)) from err
    for job in jobs:
        composed, reference = composed_with(job)
        cfg = OmegaConf.to_container(composed, resolve=False)
        if first is None:
            first = dict(cfg)
        cfg.pop("hydra", None)
        try:
            check_config(cfg, reference)
        except ConfigError as err:
            raise to_error(str(err) + (f" [sweep job {' '.join(job)}]" if len(jobs) > 1 else "")) from err
    return first


def _not_utf8(folders: Sequence[Path]) -> str:
    """Returns the problem of the first YAML file under ``folders`` that is not UTF-8 text."""
    from metaloop.cli import UsageError, config_text

    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                config_text(path)
            except UsageError as err:
                return str(err)
    return "a config file is not UTF-8 text; save it as UTF-8"


def _first_line(err: Exception) -> str:
    """Returns Hydra's multi-line message as one line (options listed after their heading), without the search path."""
    text = str(err).split("Config search path")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("object_type=")]
    if not lines:
        return type(err).__name__
    message = lines[0]
    for previous, line in zip(lines, lines[1:]):
        if previous.endswith((":", ".")):
            message += " " + line
        else:  # an option after an option (one word each), else a new sentence
            message += (", " if " " not in previous and " " not in line else "; ") + line
    return message
