"""The ``metaloop`` command: compose a recipe with Hydra, then fit, validate or test it with Lightning.

A recipe is a Hydra primary config whose defaults list starts from ``config`` (``configs/config.yaml``)
and overrides options and values (see :data:`USAGE`). The command line becomes Hydra's: the recipe's
folder is the config folder, ``configs/`` and ``recipes/`` are on the search path, and ``command=`` /
``recipe=`` are set from the subcommand and the recipe's name, so Lightning's DDP launcher, which re-runs
the process with Hydra's arguments, composes the same run on every rank.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metaloop.cli.folders import RunFolder

__all__ = [
    "COMMANDS", "USAGE", "UsageError", "config_dir", "config_text", "main", "recipe_dir", "recipe_summaries", "run",
    "user_config_path",
]

COMMANDS = ("fit", "validate", "test")
USAGE = """\
usage: metaloop recipes | {fit,validate,test} [--config RECIPE] [-m] [--help] [KEY=VALUE ...]

  metaloop recipes                                   # the recipes, one line each
  metaloop fit --config maml_omniglot.yaml           # a recipe from recipes/ (or a path to a YAML file)
  metaloop fit --config maml_omniglot.yaml inner.steps=5 trainer.max_steps=2000 task.n_ways=20
  metaloop fit -m --config maml_omniglot.yaml inner.lr=0.1,0.4 seed=0,1,2    # a sweep
  metaloop fit --config maml_omniglot.yaml hydra.run.dir=runs/a ckpt_path=last   # resume runs/a
  metaloop test --config maml_omniglot.yaml ckpt_path=runs/a/checkpoints/last.ckpt
  metaloop fit --help                                # the config groups and their options"""
_LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "parallel": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
}
_SWEEPER_PLUGINS = {"optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "metaloop[sweepers]")}
# logger=OPTION: the module its Lightning logger needs and the extra that installs it (named when the logger cannot be built)
_LOGGER_PACKAGES = {
    "tensorboard": ("tensorboard", "metaloop[tensorboard]"),
    "mlflow": ("mlflow", "metaloop[mlflow]"),
    "wandb": ("wandb", "metaloop[wandb]"),
}

# Lightning warnings that do not apply to meta-learning runs: the task stream is an endless IterableDataset
# with a length, and manual optimisation checkpoints after the step by design.
_NOISE = (
    r"Your `IterableDataset` has `__len__` defined",
    r"Using ModelCheckpoint with manual optimization",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class UsageError(Exception):
    """A mistake on the command line or in the configuration, reported as one message before any training."""


def _checkout_dir(env: str, name: str) -> Path:
    override = os.environ.get(env)
    if override:
        folder = Path(override).expanduser()
    else:
        # a wheel ships the folder inside the package (metaloop/configs); a checkout has it beside the package
        package = _package_root() / "metaloop" / name
        folder = package if package.is_dir() else _package_root() / name
    if not folder.is_dir():
        raise UsageError(
            f"metaloop's {name}/ folder was not found in the installed package or at {folder}; reinstall metaloop "
            f"(pip install metaloop-*.whl, or pip install -e . in a checkout), or set {env} to the folder"
        )
    return folder.resolve()


def _package_root() -> Path:
    import metaloop

    return Path(metaloop.__file__).resolve().parents[1]


def user_config_path() -> list[Path]:
    """Returns the folders of ``$METALOOP_CONFIG_PATH`` (separated by ``os.pathsep``): the user's recipes and config groups.

    Each folder's YAML files are recipes (``--config NAME.yaml``, listed by ``metaloop recipes``); its
    subfolders add options to config groups (``model/resnet.yaml`` is ``model=resnet``). They are
    searched before metaloop's own ``configs/`` and ``recipes/``.
    """
    folders = [Path(p).expanduser() for p in os.environ.get("METALOOP_CONFIG_PATH", "").split(os.pathsep) if p]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise UsageError(f"METALOOP_CONFIG_PATH names {', '.join(missing)}, which is not a folder; fix or unset it")
    return [f.resolve() for f in folders]


def config_dir() -> Path:
    """Returns the folder of ``config.yaml`` and the config groups: ``$METALOOP_CONFIG_DIR`` or the checkout's ``configs/``."""
    folder = _checkout_dir("METALOOP_CONFIG_DIR", "configs")
    if not (folder / "config.yaml").is_file():
        raise UsageError(f"{folder} holds no config.yaml; point METALOOP_CONFIG_DIR at metaloop's configs/ folder")
    return folder


def recipe_dir() -> Path:
    """Returns the folder of the recipes: ``$METALOOP_RECIPE_DIR`` or the checkout's ``recipes/``."""
    return _checkout_dir("METALOOP_RECIPE_DIR", "recipes")


def config_text(path: Path) -> str:
    """Returns the text of a YAML recipe or config file.

    Raises:
        UsageError: the file is not UTF-8 text (the message names it).
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None


def _first_comment(path: Path) -> str:
    """Returns the text of the first comment line of a YAML file ("" if it has none; the problem if it is unreadable)."""
    try:
        text = config_text(path)
    except UsageError as err:
        return f"(unreadable: {err})"
    for line in text.splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
        if line.strip() and not line.startswith("#"):
            break
    return ""


def recipe_summaries() -> dict[str, str]:
    """Returns each recipe's name and the first line of its header comment, sorted by name (the user's first, see :func:`user_config_path`)."""
    summaries: dict[str, str] = {}
    for folder in [*user_config_path(), recipe_dir()]:
        for path in sorted(folder.glob("*.yaml")):
            summaries.setdefault(path.stem, _first_comment(path))
    return dict(sorted(summaries.items()))


def _resolve_recipe(config: str | None) -> tuple[Path, str]:
    """Returns (config folder, config name) of ``--config``: a recipe name, a recipe file name, or a path."""
    if config is None:
        return config_dir(), "config"
    path = Path(config).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve().parent, path.stem
    for folder in [*user_config_path(), recipe_dir()]:
        for candidate in (folder / config, folder / f"{config}.yaml"):
            if candidate.is_file() and candidate.suffix == ".yaml":
                return candidate.parent, candidate.stem
    available = ", ".join(recipe_summaries()) or "(none)"
    raise UsageError(f"unknown recipe {config!r}; the recipes are: {available} (or give a path to a YAML file)")


def _group_options() -> dict[str, dict[str, str]]:
    """Returns each config group's options with the first line of their comment."""
    root = config_dir()
    return {
        group.name: {path.stem: _first_comment(path) for path in sorted(group.glob("*.yaml"))}
        for group in sorted(p for p in root.iterdir() if p.is_dir())
    }


def _print_recipes() -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table("recipe", "what it reproduces", box=None, title="recipes (metaloop fit --config NAME.yaml)")
    for name, summary in recipe_summaries().items():
        table.add_row(f"{name}.yaml", escape(summary))
    Console().print(table)


def _print_help(command: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.print(
        f"usage: metaloop {command} [--config RECIPE] [-m|--multirun] [KEY=VALUE ...]\n\n"
        f"{'Fits' if command == 'fit' else 'Evaluates'} a recipe (a name from recipes/, or a path to a YAML file; "
        "default: configs/config.yaml) with Hydra overrides, e.g.\n"
        "  inner.steps=5 inner.lr=0.1 trainer.max_steps=2000 task.n_ways=20 model=mlp learnable=per_param_lr\n"
        "  seed=0,1,2 with -m runs a sweep; ckpt_path=last resumes the run in hydra.run.dir; --cfg job prints the config.\n",
        markup=False,
    )
    table = Table("group", "option", "", box=None, title="config groups (GROUP=OPTION)")
    for group, options in _group_options().items():
        for i, (option, doc) in enumerate(options.items()):
            table.add_row(group if i == 0 else "", option, escape(doc))
    console.print(table)
    _print_recipes()


def _split_args(args: Sequence[str]) -> tuple[str | None, bool, bool, list[str]]:
    """Returns (--config value, multirun, help, remaining Hydra arguments)."""
    config, multirun, show_help, rest = None, False, False, []
    items = iter(args)
    for arg in items:
        if arg == "--config":
            config = next(items, None)
            if config is None:
                raise UsageError("--config needs a recipe name or path, e.g. --config maml_omniglot.yaml")
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("-h", "--help"):
            show_help = True
        else:
            rest.append(arg)
    return config, multirun, show_help, rest


def _hydra_argv(command: str, args: Sequence[str]) -> tuple[list[str], RunFolder | None] | None:
    """Returns Hydra's command line for ``metaloop COMMAND ARGS`` and the folder to hold, or None after printing help.

    Everything is checked here, before any file is written: the configuration (each job of a sweep), the
    checkpoint a command starts from, and what it stores: a resumed fit refuses other experiment settings
    unless ``resume_changes=allow``; an evaluation takes its experiment settings from the checkpoint
    (:mod:`metaloop.cli.stored_config`), as overrides added to the command line.
    """
    # imported here: `metaloop recipes` and `--help` need neither torch nor Lightning
    from metaloop.cli.launch import process_rank
    from metaloop.cli.folders import record_subdir, resolve_ckpt_path
    from metaloop.cli.schema import check_command_line, hydra_overrides
    from metaloop.cli.stored_config import explicit_keys, stored_config
    from metaloop.lightning.checkpoint import CheckpointError, load_checkpoint

    config, multirun, show_help, overrides = _split_args(args)
    if show_help:
        _print_help(command)
        return None
    folder, name = _resolve_recipe(config)
    _check_launcher(overrides)
    # the user's folders first; configs/ for the groups and config.yaml; recipes/ so that a recipe elsewhere can
    # build on a shipped one
    search = [*user_config_path(), config_dir(), recipe_dir()]
    searchpath = "hydra.searchpath=[" + ",".join(f"'file://{p}'" for p in search) + "]"

    def composed_with(folder: Path, name: str, adopted: Sequence[str]) -> dict[str, Any] | None:
        job = [f"command={command}", f"recipe={name}", *overrides, *adopted]
        return check_command_line(folder, name, job, search, config_dir(), multirun, UsageError)

    adopted: list[str] = []
    composed = composed_with(folder, name, adopted)
    run_folder = _run_folder(command, composed, multirun)
    # a sweep's jobs are checked one by one (see run); a resumed fit's checkpoint is checked on rank 0 only (ranks that
    # torchrun or SLURM start side by side may not know rank 0's timestamped folder; each rank's run resolves it)
    if composed is not None and not multirun and (command != "fit" or process_rank() == 0):
        fixed = run_folder.path if run_folder is not None and not run_folder.fresh else None
        try:
            # a remote checkpoint is downloaded once here; run() finds the same file (deleted when the command ends)
            ckpt_path = resolve_ckpt_path(command, composed.get("ckpt_path"), fixed)
            stored = None if ckpt_path is None else stored_config(load_checkpoint(ckpt_path))
        except CheckpointError as err:
            raise UsageError(str(err)) from err
        if stored is not None and command == "fit":
            _check_resume(stored, composed, ckpt_path)
        elif stored is not None:
            if config is None and _recipe_named(stored.get("recipe")) is not None:
                folder, name = _recipe_named(stored.get("recipe"))  # type: ignore[misc]
                composed = composed_with(folder, name, adopted)
            explicit = explicit_keys(hydra_overrides(overrides)[0])
            for adopt in (_adopted_groups, _adopted_values):  # groups first: they decide which values there are
                more = adopt(stored, composed, explicit)
                if more:
                    adopted += more
                    composed = composed_with(folder, name, adopted)
            run_folder = _run_folder(command, composed, multirun)
    argv = ["--config-dir", str(folder), "--config-name", name, searchpath, f"command={command}", f"recipe={name}"]
    if composed is not None:
        subdir = record_subdir(command, composed.get("ckpt_path"))
        if subdir is not None:
            argv.append(f"hydra.output_subdir={subdir}")
    if multirun and run_folder is not None:
        from metaloop.cli.sweep import SWEEP_ID

        # the sweep's jobs record it, so that its table reads its own jobs only
        argv.append(f"++hydra.job.env_set.{SWEEP_ID}={uuid.uuid4().hex}")
    return argv + list(overrides) + adopted + (["--multirun"] if multirun else []), run_folder


def _check_resume(stored: dict[str, Any], current: dict[str, Any], ckpt_path: Any) -> dict[str, tuple[Any, Any]]:
    """Returns the experiment settings ``current`` changes from the checkpoint's; raises :class:`UsageError` unless allowed."""
    from metaloop.cli.stored_config import experiment_changes, format_changes

    changes = experiment_changes(stored, current)
    if changes and current.get("resume_changes") != "allow":
        raise UsageError(
            f"resuming {ckpt_path} with other experiment settings than it was fitted with: {format_changes(changes)}; "
            "resume with the checkpoint's settings, or add resume_changes=allow to change them on purpose (the "
            "changes are printed and recorded in the resume's .hydra/ record)"
        )
    return changes


def _recipe_named(name: Any) -> tuple[Path, str] | None:
    """Returns (folder, name) of the recipe a checkpoint names (a bare name in the recipe folders only), or None."""
    if not isinstance(name, str) or not name or name != Path(name).name or name.startswith("."):
        return None
    for folder in [*user_config_path(), recipe_dir()]:
        if (folder / f"{name}.yaml").is_file():
            return folder, name
    return None


def _option_nodes(group: str) -> dict[str, Any]:
    """Returns each option of config ``group`` (the user's first) as data: the node it sets, by option name."""
    import yaml

    options: dict[str, Any] = {}
    for root in [*user_config_path(), config_dir()]:
        for path in sorted((root / group).glob("*.yaml")) if (root / group).is_dir() else []:
            text = path.read_text()
            package = next((line.split("@package", 1)[1].strip() for line in text.splitlines() if line.startswith("# @package")), None)
            body = yaml.safe_load(text) or {}
            if package == "_global_":
                body = body.get(group) if isinstance(body, dict) else None
            elif package not in (None, group):
                continue
            options.setdefault(path.stem, body)
    return options


def _adopted_groups(stored: dict[str, Any], composed: dict[str, Any] | None, explicit: set[str]) -> list[str]:
    from metaloop.cli.stored_config import group_overrides

    if composed is None:
        return []
    choices = composed.get("hydra", {}).get("runtime", {}).get("choices", {})
    try:
        return group_overrides(stored, composed, choices, explicit, _option_nodes)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _adopted_values(stored: dict[str, Any], composed: dict[str, Any] | None, explicit: set[str]) -> list[str]:
    from metaloop.cli.stored_config import value_overrides

    if composed is None:
        return []
    try:
        return value_overrides(stored, composed, explicit)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _run_folder(command: str, composed: dict[str, Any] | None, multirun: bool) -> RunFolder | None:
    """Returns the folder the command runs in (a sweep: the sweep's folder), as planned; None for ``--cfg`` and the like."""
    from metaloop.cli.folders import RunFolder

    if composed is None:
        return None
    kind = "sweep" if multirun else "run"
    text = str(composed.get("hydra", {}).get(kind, {}).get("dir", "") or "")
    path = _resolved_folder(composed, kind)
    if path is None:
        return None
    ckpt_path = composed.get("ckpt_path")
    resumes = ckpt_path == "last" or (not multirun and _inside(ckpt_path, path / "checkpoints"))
    return RunFolder(path, kind, fresh="${now:" in text, new_run=command == "fit" and not resumes)


def _resolved_folder(composed: dict[str, Any], kind: str) -> Path | None:
    """Returns ``hydra.<kind>.dir`` with its interpolations resolved now, or None when only Hydra's runtime can (``${hydra:...}``)."""
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    setup_globals()  # the ${now:...} resolver
    try:
        value = OmegaConf.select(OmegaConf.create(composed), f"hydra.{kind}.dir", throw_on_resolution_failure=True)
    except (OmegaConfBaseException, ValueError, KeyError):
        return None
    return Path(str(value)) if value else None


def _inside(ckpt_path: Any, folder: Path) -> bool:
    """True if ``ckpt_path`` is a local file in ``folder``."""
    if not isinstance(ckpt_path, str) or ckpt_path in ("last", "none") or "://" in ckpt_path:
        return False
    return Path(ckpt_path).expanduser().resolve().parent == folder.expanduser().resolve()


def _installed(module: str) -> bool:
    """True if ``module`` can be imported (a missing parent package counts as not installed)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _check_launcher(overrides: Sequence[str]) -> None:
    """Raises :class:`UsageError` for a launcher or sweeper option on the command line whose Hydra plugin is not installed."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "hydra/sweeper" and value in _SWEEPER_PLUGINS:
            module, package, extra = _SWEEPER_PLUGINS[value]
            if not _installed(module):
                raise UsageError(
                    f"hydra/sweeper={value} needs the Hydra plugin {package}, which is not installed; "
                    f"pip install '{extra}' (or pip install {package})"
                )
        if key.lstrip("+~") == "launcher" and value in _LAUNCHER_PLUGINS:
            module, package = _LAUNCHER_PLUGINS[value]
            if not _installed(module):
                raise UsageError(
                    f"launcher={value} needs the Hydra plugin {package}, which is not installed; "
                    f"pip install 'metaloop[launchers]' (or pip install {package}), or use launcher=basic"
                )


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the ``metaloop`` command line (``argv`` defaults to ``sys.argv[1:]``); exits non-zero on errors."""
    from metaloop.cli.folders import removing_downloads

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with removing_downloads():
            _main(args)
    except UsageError as err:
        sys.exit(f"metaloop: error: {err}")


def _main(args: list[str]) -> None:
    """Runs one ``metaloop`` command line; raises :class:`UsageError` for a mistake in it."""
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    if args[0] == "recipes":
        _print_recipes()
        return
    folder: RunFolder | None = None
    if args[0] in COMMANDS:
        prepared = _hydra_argv(args[0], args[1:])
        if prepared is None:
            return
        hydra_args, folder = prepared
    elif args[0].startswith("-"):
        # Hydra's own command line: how Lightning's DDP launcher re-runs this process, and how a sweep runs a job
        hydra_args = args
    else:
        raise UsageError(f"unknown command {args[0]!r}; use one of: recipes, {', '.join(COMMANDS)}")
    from metaloop.cli.stored_config import hydra_value

    with _holding(folder) as path:
        if folder is not None and path is not None:
            # the folder as created and locked: a new timestamped one may have a suffix; DDP ranks re-run this
            at = len(hydra_args) - (hydra_args[-1] == "--multirun")
            hydra_args = [*hydra_args[:at], f"{folder.key}={hydra_value(str(path))}", *hydra_args[at:]]
        _run_hydra(hydra_args)


@contextlib.contextmanager
def _holding(folder: RunFolder | None) -> Iterator[Path | None]:
    """Yields the folder ``folder`` plans, created and locked for the block; a folder that cannot be used is a :class:`UsageError`.

    Only rank 0 holds a folder (None otherwise): Lightning's DDP launcher re-runs rank 0's command line with
    ``hydra.run.dir`` set to the folder rank 0 holds, and ranks other than 0 write no files.
    """
    from metaloop.cli.launch import process_rank

    if folder is None or process_rank() != 0:
        yield None
        return
    from metaloop.cli.folders import RunFolderError, hold_run_folder

    try:
        with hold_run_folder(folder) as path:
            yield path
    except RunFolderError as err:
        raise UsageError(str(err)) from err


def _register_launchers() -> None:
    """Registers metaloop's Hydra launcher (``launcher=submitit_slurm``): Hydra's scan of ``hydra_plugins`` misses it in an editable install."""
    if _installed("hydra_plugins.hydra_submitit_launcher"):
        from hydra.core.plugins import Plugins
        from hydra_plugins.metaloop_launcher.slurm_launcher import SlurmLauncher

        Plugins.instance().register(SlurmLauncher)


def _run_hydra(hydra_args: list[str]) -> None:
    import hydra
    import lightning  # noqa: F401  (adds console handlers to its loggers on import; Hydra's job_logging replaces them)
    from hydra.core.global_hydra import GlobalHydra

    from metaloop.cli.launch import process_rank

    GlobalHydra.instance().clear()
    _register_launchers()
    if process_rank() != 0:
        # ranks other than 0 (Lightning's DDP children, torchrun, SLURM tasks) write no files: the run folder is rank 0's
        hydra_args = [*hydra_args, "hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]
    program = sys.argv[0]
    saved = sys.argv
    # Hydra reads sys.argv; Lightning's DDP launcher re-runs it, so it must hold Hydra's arguments
    sys.argv = [program, *hydra_args]
    try:
        hydra.main(version_base="1.3", config_path=None, config_name=None)(_task)()
    finally:
        sys.argv = saved


class RunFailed(Exception):
    """A run that started and failed (a non-finite loss, a SIGTERM): reported in one message, exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _task(cfg: Any) -> float | dict[str, float] | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from metaloop.cli.sweep import run_job

        return run_job(cfg)
    try:
        return run(cfg)
    except UsageError as err:
        sys.exit(f"metaloop: error: {err}")
    except RunFailed as err:
        if err.code == 1:
            sys.exit(f"metaloop: error: {err}")
        if str(err):  # empty: a DDP rank other than 0 that stopped with the others; rank 0 reports it
            print(f"metaloop: error: {err}", file=sys.stderr)
        sys.exit(err.code)


def _outer_optimizer(module: Any) -> Any:
    configured = module.configure_optimizers()
    return configured["optimizer"] if isinstance(configured, dict) else configured


def _non_finite_message(err: Exception, cfg: Any, run_dir: Path) -> str:
    step = getattr(err, "step", 0)
    lrs = [f"inner.lr={cfg.inner.lr}"] + ([f"outer_optim.lr={cfg.outer_optim.lr}"] if "lr" in cfg.outer_optim else [])
    kept = run_dir / "checkpoints"
    return (
        f"the run diverged: {err}. Likely cause: a learning rate too large ({', '.join(lrs)}); lower it. "
        f"Checkpoints up to meta-step {max(step - 1, 0)} are kept in {kept}; resume from the last finite one with "
        f"hydra.run.dir={run_dir} ckpt_path=last"
    )


def _non_finite_evaluation_message(err: Any, cfg: Any, run_dir: Path, checkpoint_step: int | None) -> str:
    """Returns the one-line report of a NaN or infinite evaluation (:class:`~metaloop.lightning.callbacks.NonFiniteEvaluation`)."""
    stage = "validation" if err.stage == "val" else "test"
    figures = ", ".join(f"{k}={v}" for k, v in err.bad.items())
    weights = f"meta-step {err.step}" if cfg.command == "fit" else f"the checkpoint of meta-step {checkpoint_step}"
    # NaN after adaptation from finite figures before it: the evaluation's inner loop diverged
    adapted = all(k.endswith("_post") and math.isfinite(err.metrics.get(k[: -len("_post")] + "_pre", math.nan)) for k in err.bad)
    if adapted:
        cause = (
            f"the inner loop diverges on the {stage} tasks (inner.lr={cfg.inner.lr} for inner.eval_steps="
            f"{cfg.inner.eval_steps} steps); lower inner.lr or inner.eval_steps"
        )
    else:
        cause = "the model's outputs on the evaluation tasks are not finite; check the task's data and the model"
    kept = f"; the finite weights trained so far are kept in {run_dir / 'checkpoints'}" if cfg.command == "fit" else ""
    return (
        f"the {stage} of {weights} is not finite ({figures}): no figures are reported. Likely cause: {cause}{kept}"
    )


def run(cfg: Any) -> dict[str, float]:
    """Returns the final metrics after running ``cfg.command`` (fit, validate or test) on the composed config ``cfg``.

    Everything is built and checked before the Trainer starts: a configuration error raises
    :class:`UsageError` with the offending value, and no checkpoint is written or touched. A checkpoint
    downloaded for ``ckpt_path=http(s)://...`` is deleted when the command ends, however it ends.
    """
    from metaloop.cli.folders import removing_downloads

    with removing_downloads():
        return _run(cfg)


def _run(cfg: Any) -> dict[str, float]:
    import lightning
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from metaloop.cli.launch import check_scale_out
    from metaloop.cli.report import LogRunConfig, log_results, print_summary, write_evaluation, write_results
    from metaloop.cli.folders import resolve_ckpt_path
    from metaloop.lightning.callbacks import (
        ContinueSchedule, MetaStepTimer, NonFiniteError, NonFiniteEvaluation, ValidateFinalStep, check_evaluation,
    )
    from metaloop.lightning.checkpoint import CheckpointError, CheckpointSaveError, SafeCheckpointIO, check_fits, load_checkpoint
    from metaloop.lightning.precision import auto_precision
    from metaloop.lightning.runs import SaveRunConfig

    composed = OmegaConf.to_container(cfg, resolve=False)  # as composed: instantiate() resolves nodes in place
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise UsageError(
            f"{str(err).splitlines()[0]} (at {getattr(err, 'full_key', '?')}); set it on the command line, "
            "e.g. task.source=mypackage.tasks.linear_tasks for task=custom"
        ) from err
    check_scale_out(cfg)
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if str(cfg.trainer.get("precision")) == "auto":  # Lightning has no "auto" precision: resolve it for the accelerator
        cfg.trainer.precision = auto_precision(str(cfg.trainer.get("accelerator", "auto")))
    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        datamodule = instantiate(cfg.task.datamodule, _convert_="partial")
        module = instantiate(cfg.module, _convert_="partial")
        module.check_datamodule(datamodule, cfg.command)
        callbacks = [instantiate(c) for c in cfg.callbacks.values()] if cfg.get("callbacks") else []
        final_validation = ValidateFinalStep()  # the reported validation is of the final weights
        callbacks += [SaveRunConfig(OmegaConf.to_yaml(cfg, resolve=True)), ContinueSchedule(), final_validation]
        callbacks.append(LogRunConfig(OmegaConf.to_container(cfg, resolve=True)))
        logger = instantiate(cfg.logger) if cfg.get("logger") else False
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=[SafeCheckpointIO()])
    except InstantiationException as err:
        raise UsageError(_instantiation_message(err)) from err
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:
        raise UsageError(str(err)) from err
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    checkpoint_step: int | None = None
    try:
        ckpt_path = resolve_ckpt_path(cfg.command, cfg.ckpt_path, run_dir)
        if ckpt_path is not None:
            checkpoint = load_checkpoint(ckpt_path)
            _compare_stored_config(cfg, composed, checkpoint, str(cfg.ckpt_path), run_dir)
            optimizer = _outer_optimizer(module) if cfg.command == "fit" else None
            check_fits(module, checkpoint, str(cfg.ckpt_path), optimizer)
            checkpoint_step = checkpoint.get("global_step")
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        outputs = getattr(trainer, cfg.command)(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except NonFiniteEvaluation as err:
        raise RunFailed(_non_finite_evaluation_message(err, cfg, run_dir, checkpoint_step)) from err
    except NonFiniteError as err:
        raise RunFailed(_non_finite_message(err, cfg, run_dir)) from err
    except CheckpointSaveError as err:
        resume = f"; resume with hydra.run.dir={run_dir} ckpt_path=last" if (run_dir / "checkpoints" / "last.ckpt").is_file() else ""
        raise RunFailed(f"{err}{resume}") from err
    except SIGTERMException as err:
        if not trainer.is_global_zero:
            raise RunFailed("", code=143) from err
        last = run_dir / "checkpoints" / "last.ckpt"
        raise RunFailed(
            f"stopped by SIGTERM at meta-step {trainer.global_step}; "
            + (f"the weights of that step are in {last}: resume with hydra.run.dir={run_dir} ckpt_path=last" if cfg.command == "fit" and last.is_file() else "nothing was saved"),
            code=143,
        ) from err
    except Exception as err:
        failure = getattr(trainer.strategy, "failure", None)  # a DDP rank's line: which rank failed, and why
        if failure is None:
            raise
        raise RunFailed(failure) from err
    timings[cfg.command] = time.perf_counter() - start
    validated = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    try:
        if cfg.command == "fit" and cfg.test_after_fit and datamodule.num_test_tasks and not trainer.interrupted:
            start = time.perf_counter()
            outputs = trainer.test(module, datamodule=datamodule, verbose=False)
            timings["test"] = time.perf_counter() - start
        results = {**validated, **{k: float(v) for output in outputs or [] for k, v in output.items()}}
        # the callback fails a non-finite evaluation as it happens; this holds without it (~callbacks.finite)
        step = trainer.global_step if cfg.command == "fit" else checkpoint_step or 0
        for stage in ("val", "test"):
            check_evaluation(results, stage, step)
    except NonFiniteEvaluation as err:
        raise RunFailed(_non_finite_evaluation_message(err, cfg, run_dir, checkpoint_step)) from err
    if trainer.is_global_zero:
        rate = next((c.rate for c in trainer.callbacks if isinstance(c, MetaStepTimer) and c.steps), None)
        if cfg.command == "fit":
            evaluated = f"meta-step {trainer.global_step}" + (
                f" (validation of meta-step {final_validation.step})"
                if final_validation.step not in (None, trainer.global_step) else ""
            )
        else:
            evaluated = f"{ckpt_path} (meta-step {checkpoint_step})" if ckpt_path else "the untrained model (ckpt_path=none)"
        print_summary(cfg, trainer, results, timings, run_dir, evaluated)
        if cfg.command == "fit":
            write_results(results, trainer.global_step, timings, run_dir, rate, final_validation.step)
        else:
            write_evaluation(cfg.command, results, ckpt_path, checkpoint_step, timings, run_dir)
        log_results(trainer.loggers, results, trainer.global_step, rate if cfg.command == "fit" else None)
    return results


def _compare_stored_config(cfg: Any, current: Any, checkpoint: dict[str, Any], ckpt_path: str, run_dir: Path) -> None:
    """Compares ``cfg`` (``current``: as composed, unresolved) with the configuration ``checkpoint`` stores; says (and records) what differs, or refuses.

    A resumed fit changes experiment settings only with ``resume_changes=allow``: the changes are printed and
    written to ``resume_changes.yaml`` in the resume's ``.hydra/`` record. An evaluation may differ from the
    checkpoint only in keys its command line sets (each is printed); :func:`_hydra_argv` has already taken the
    others from the checkpoint, so this guards sweep jobs, which are composed job by job.
    """
    import logging

    import yaml
    from hydra.core.hydra_config import HydraConfig

    from metaloop.cli.launch import process_rank
    from metaloop.cli.stored_config import experiment_changes, explicit_keys, format_changes, is_explicit, stored_config

    stored = stored_config(checkpoint)
    if stored is None:
        return
    log = logging.getLogger(__name__)
    if cfg.command == "fit":
        changes = _check_resume(stored, current, ckpt_path)
        if changes and process_rank() == 0:
            log.info(f"resuming with changed experiment settings (resume_changes=allow): {format_changes(changes)}")
            subdir = HydraConfig.get().output_subdir
            if subdir is not None:
                record = {k: {"checkpoint": _plain(old), "now": _plain(new)} for k, (old, new) in changes.items()}
                (run_dir / subdir).mkdir(parents=True, exist_ok=True)
                (run_dir / subdir / "resume_changes.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        return
    changes = experiment_changes(stored, current)
    explicit = explicit_keys(HydraConfig.get().overrides.task)
    unexplained = {k: v for k, v in changes.items() if not is_explicit(k, explicit)}
    if unexplained:
        raise UsageError(
            f"this {cfg.command} differs from the configuration {ckpt_path} was fitted with: "
            f"{format_changes(unexplained)}; set these keys to the checkpoint's values on the command line (or to "
            "other values on purpose)"
        )
    if changes and process_rank() == 0:
        log.info("evaluating with " + "; ".join(
            f"{k}={new!r} instead of the checkpoint's {old!r}" for k, (old, new) in changes.items()
        ))


def _plain(value: Any) -> Any:
    from metaloop.cli.stored_config import ABSENT

    return None if value is ABSENT else value


def _instantiation_message(err: Exception) -> str:
    """Returns the root cause of a Hydra instantiation error, with the config key Hydra names."""
    from hydra.errors import InstantiationException

    # the first error below Hydra's wrappers: the constructor's own message (not the OSError it wraps)
    cause: BaseException = err
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    first = str(err).splitlines()[0]
    key = first[first.find("full_key:"):] if "full_key:" in first else ""
    message = str(cause) if cause is not err else first
    missing = [option for option, (module, _) in _LOGGER_PACKAGES.items() if module in message.lower()]
    if isinstance(cause, ModuleNotFoundError) and missing:
        message += f" (logger={missing[0]} needs `pip install '{_LOGGER_PACKAGES[missing[0]][1]}'`; or use logger=csv)"
    return f"{message}" + (f" [{key}]" if key else "")
