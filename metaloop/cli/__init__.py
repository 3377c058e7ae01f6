"""The ``metaloop`` command: compose a recipe with Hydra, then fit, validate or test it with Lightning.

A recipe is a Hydra primary config whose defaults list starts from ``config`` (``configs/config.yaml``)
and overrides options and values (see :data:`USAGE`). The command line becomes Hydra's: the recipe's
folder is the config folder, ``configs/`` and ``recipes/`` are on the search path, and ``command=`` /
``recipe=`` are set from the subcommand and the recipe's name, so Lightning's DDP launcher, which re-runs
the process with Hydra's arguments, composes the same run on every rank.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "COMMANDS", "USAGE", "UsageError", "config_dir", "main", "recipe_dir", "recipe_summaries", "run", "user_config_path",
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


def _first_comment(path: Path) -> str:
    """Returns the text of the first comment line of a YAML file ("" if it has none)."""
    for line in path.read_text().splitlines():
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


def _hydra_argv(command: str, args: Sequence[str]) -> tuple[list[str], Path | None] | None:
    """Returns Hydra's command line for ``metaloop COMMAND ARGS`` and the run folder to lock, or None after printing help."""
    # imported here: `metaloop recipes` and `--help` need neither torch nor Lightning
    from metaloop.cli.runs import record_subdir, resolve_ckpt_path
    from metaloop.cli.schema import check_command_line
    from metaloop.lightning.checkpoint import CheckpointError

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
    argv = ["--config-dir", str(folder), "--config-name", name, searchpath, f"command={command}", f"recipe={name}"]
    composed = check_command_line(
        folder, name, [f"command={command}", f"recipe={name}", *overrides], search, config_dir(), multirun, UsageError
    )
    if composed is not None:
        subdir = record_subdir(command, composed.get("ckpt_path"))
        if subdir is not None:
            argv.append(f"hydra.output_subdir={subdir}")
    lock = _folder_to_lock(composed, multirun)
    if composed is not None and not multirun:
        try:
            resolve_ckpt_path(command, composed.get("ckpt_path"), lock, fetch=False)
        except CheckpointError as err:
            raise UsageError(str(err)) from err
    return argv + list(overrides) + (["--multirun"] if multirun else []), lock


def _folder_to_lock(composed: dict[str, Any] | None, multirun: bool) -> Path | None:
    """Returns the run folder this process must hold: a single run's fixed ``hydra.run.dir`` on rank 0, else None."""
    from metaloop.cli.launch import process_rank

    if composed is None or multirun or process_rank() != 0:
        return None
    run_dir = str(composed.get("hydra", {}).get("run", {}).get("dir", ""))
    # a timestamped default folder is new for each run; only a folder named by the user can be shared
    return Path(run_dir) if run_dir and "${" not in run_dir else None


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
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(USAGE)
            return
        if args[0] == "recipes":
            _print_recipes()
            return
        lock: Path | None = None
        if args[0] in COMMANDS:
            prepared = _hydra_argv(args[0], args[1:])
            if prepared is None:
                return
            hydra_args, lock = prepared
        elif args[0].startswith("-"):
            # Hydra's own command line: how Lightning's DDP launcher re-runs this process
            hydra_args = args
        else:
            raise UsageError(f"unknown command {args[0]!r}; use one of: recipes, {', '.join(COMMANDS)}")
        with _holding(lock):
            _run_hydra(hydra_args)
    except UsageError as err:
        sys.exit(f"metaloop: error: {err}")


@contextlib.contextmanager
def _holding(folder: Path | None) -> Iterator[None]:
    """Holds the run folder's lock for the block (nothing for None); a folder in use is a :class:`UsageError`."""
    if folder is None:
        yield
        return
    from metaloop.cli.runs import RunFolderBusy, lock_run_folder

    try:
        with lock_run_folder(folder):
            yield
    except RunFolderBusy as err:
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


def run(cfg: Any) -> dict[str, float]:
    """Returns the final metrics after running ``cfg.command`` (fit, validate or test) on the composed config ``cfg``.

    Everything is built and checked before the Trainer starts: a configuration error raises
    :class:`UsageError` with the offending value, and no checkpoint is written or touched.
    """
    import lightning
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from metaloop.cli.launch import check_scale_out
    from metaloop.cli.report import LogRunConfig, log_results, print_summary, write_results
    from metaloop.cli.runs import resolve_ckpt_path
    from metaloop.lightning.callbacks import MetaStepTimer, NonFiniteError
    from metaloop.lightning.checkpoint import CheckpointError, SafeCheckpointIO, check_fits, load_checkpoint
    from metaloop.lightning.precision import auto_precision
    from metaloop.lightning.runs import SaveRunConfig

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
        callbacks.append(SaveRunConfig(OmegaConf.to_yaml(cfg, resolve=True)))
        callbacks.append(LogRunConfig(OmegaConf.to_container(cfg, resolve=True)))
        logger = instantiate(cfg.logger) if cfg.get("logger") else False
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=[SafeCheckpointIO()])
    except InstantiationException as err:
        raise UsageError(_instantiation_message(err)) from err
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:
        raise UsageError(str(err)) from err
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        ckpt_path = resolve_ckpt_path(cfg.command, cfg.ckpt_path, run_dir)
        if ckpt_path is not None:
            optimizer = _outer_optimizer(module) if cfg.command == "fit" else None
            check_fits(module, load_checkpoint(ckpt_path), str(cfg.ckpt_path), optimizer)
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        outputs = getattr(trainer, cfg.command)(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except NonFiniteError as err:
        raise RunFailed(_non_finite_message(err, cfg, run_dir)) from err
    except SIGTERMException as err:
        last = run_dir / "checkpoints" / "last.ckpt"
        raise RunFailed(
            f"stopped by SIGTERM at meta-step {trainer.global_step}; "
            + (f"the weights of that step are in {last}: resume with hydra.run.dir={run_dir} ckpt_path=last" if cfg.command == "fit" and last.is_file() else "nothing was saved"),
            code=143,
        ) from err
    timings[cfg.command] = time.perf_counter() - start
    validated = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.command == "fit" and cfg.test_after_fit and datamodule.num_test_tasks and not trainer.interrupted:
        start = time.perf_counter()
        outputs = trainer.test(module, datamodule=datamodule, verbose=False)
        timings["test"] = time.perf_counter() - start
    results = {**validated, **{k: float(v) for output in outputs or [] for k, v in output.items()}}
    if trainer.is_global_zero:
        print_summary(cfg, trainer, results, timings, HydraConfig.get().runtime.output_dir)
        rate = next((c.rate for c in trainer.callbacks if isinstance(c, MetaStepTimer) and c.steps), None)
        write_results(results, trainer.global_step, timings, HydraConfig.get().runtime.output_dir, rate)
        log_results(trainer.loggers, results, trainer.global_step, rate)
    return results


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
