"""Trained runs load in one line: checkpoints carry the composed config, and the module is rebuilt from it.

``metaloop fit`` adds :class:`SaveRunConfig`, which stores the run's resolved configuration as a YAML
string under :data:`CONFIG_KEY` in every checkpoint (plain data: it loads with
``torch.load(..., weights_only=True)``). :func:`load_module` rebuilds the module from that config
and loads the weights; ``MetaLightningModule.load_from_checkpoint(path)`` and :func:`load_run` (a run
folder) call it. :func:`load_tasks` rebuilds the run's tasks. Both build through
:func:`metaloop.lightning.targets.build`: a stored configuration is data, and only the targets metaloop's
own configs can name (and those the caller allows) are built from it.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterable
from typing import Any

import lightning
import torch
from omegaconf import DictConfig, OmegaConf

from metaloop.lightning.checkpoint import is_remote, load_checkpoint
from metaloop.lightning.targets import build, refuse_interpolations

__all__ = ["CONFIG_KEY", "SaveRunConfig", "checkpoint_config", "load_module", "load_run", "load_tasks", "migrated_module"]

CONFIG_KEY = "metaloop_config"


class SaveRunConfig(lightning.Callback):
    """Stores ``config`` (a resolved run configuration as YAML text) in every checkpoint the trainer saves."""

    def __init__(self, config: str) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config


def _load(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """Returns the checkpoint at ``path`` (a file or an http(s) address), loaded without running code."""
    if not is_remote(path) and not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .ckpt file, e.g. RUN/checkpoints/last.ckpt")
    return load_checkpoint(path if is_remote(path) else Path(path).expanduser(), map_location=map_location or "cpu")


def checkpoint_config(path: str | Path) -> DictConfig:
    """Returns the run configuration stored in the checkpoint at ``path`` (rebuild its tasks with :func:`load_tasks`).

    Raises:
        ValueError: if the checkpoint was not written by ``metaloop fit`` (it holds no configuration, or
            one with an interpolation: :class:`~metaloop.lightning.targets.TargetNotAllowed`).
    """
    return _config(_load(path), path)


def _config(checkpoint: dict[str, Any], path: str | Path) -> DictConfig:
    text = checkpoint.get(CONFIG_KEY)
    if not isinstance(text, str):
        raise ValueError(
            f"checkpoint {path} holds no metaloop run configuration (it was not written by `metaloop fit`); pass the "
            "module's constructor arguments instead: MetaLightningModule.load_from_checkpoint(path, model=..., "
            "objective=..., inner_optim=..., outer_optim=...)"
        )
    config = OmegaConf.create(text)
    if not isinstance(config, DictConfig):
        raise ValueError(f"checkpoint {path} holds a run configuration that is not a mapping; it was not written by `metaloop fit`")
    refuse_interpolations(config, f"checkpoint {path}")
    return config


def _node(config: DictConfig, key: str, path: str | Path) -> Any:
    node = OmegaConf.select(config, key)
    if node is None:
        raise ValueError(f"checkpoint {path} holds a run configuration without {key}; it was not written by `metaloop fit`")
    return node


# the flat inner-loop arguments of learners before 0.4, by the InnerOptions field that holds each now
_FORMER_INNER = {
    "inner_steps": "steps", "eval_inner_steps": "eval_steps", "first_order": "first_order", "adapt_params": "params",
    "batch_tasks": "batch_tasks", "meta_grad": "meta_grad", "truncate": "truncate", "implicit": "implicit",
}


def migrated_module(node: Any) -> Any:
    """Returns a stored ``module`` node in the arguments of today's learners (a copy; the node itself if already so).

    Configurations stored before 0.4 gave gradient-based learners flat inner-loop arguments (``inner_steps``,
    ``adapt_params``...), now one ``inner`` mapping (:class:`~metaloop.algorithms.InnerOptions`), and
    ``PrototypicalModule`` its network as ``backbone``, now ``model``.

    Examples:
        >>> migrated_module({"_target_": "metaloop.lightning.MetaLightningModule", "inner_steps": 5, "adapt_params": None})
        {'_target_': 'metaloop.lightning.MetaLightningModule', 'inner': {'steps': 5, 'params': None}}
    """
    plain = OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
    if not isinstance(plain, dict) or not (set(plain) & (set(_FORMER_INNER) | {"backbone"})):
        return node
    inner = {_FORMER_INNER[k]: v for k, v in plain.items() if k in _FORMER_INNER}
    moved = {("model" if k == "backbone" else k): v for k, v in plain.items() if k not in _FORMER_INNER}
    return {**moved, "inner": inner} if inner else moved


def load_module(
    path: str | Path,
    map_location: Any = None,
    strict: bool = True,
    cls: type[lightning.LightningModule] | None = None,
    allow: Iterable[str] = (),
) -> lightning.LightningModule:
    """Returns the trained module of a checkpoint written by ``metaloop fit``, in evaluation mode.

    The module is built from the stored configuration's ``module`` node, then the checkpoint's weights
    (initial weights, learned hyperparameters and transforms) are loaded into it.

    Args:
        path: the ``.ckpt`` file.
        map_location: where tensors go (``torch.load``'s argument; default CPU).
        strict: require the checkpoint's keys to match the module's exactly.
        cls: the class the caller expects (``load_from_checkpoint``'s class); the stored module must be one.
        allow: import paths (or package prefixes ending in ``.``) the stored configuration may build besides
            metaloop's own, e.g. ``["mypkg.MyModel"]``; ``$METALOOP_ALLOW_TARGETS`` adds more.

    Raises:
        FileNotFoundError: for a missing file. ValueError: for a checkpoint without a configuration, or of another
            class. :class:`~metaloop.lightning.targets.TargetNotAllowed` (a ValueError): the configuration names a
            target that is not allowed; nothing was built.
    """
    checkpoint = _load(path, map_location)
    config = _config(checkpoint, path)
    module = build(migrated_module(_node(config, "module", path)), allow, source=f"checkpoint {path}", key="module")
    if cls is not None and not isinstance(module, cls):
        raise ValueError(
            f"checkpoint {path} holds a {type(module).__name__}, not a {cls.__name__}; load it with "
            f"{type(module).__name__}.load_from_checkpoint"
        )
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    if map_location is not None:
        module.to(map_location)
    return module.eval()


def load_run(
    folder: str | Path, checkpoint: str = "last.ckpt", map_location: Any = None, allow: Iterable[str] = ()
) -> lightning.LightningModule:
    """Returns the trained module of the ``metaloop fit`` run in ``folder`` (its ``checkpoints/<checkpoint>``; ``allow`` as for :func:`load_module`)."""
    path = Path(folder).expanduser() / "checkpoints" / checkpoint
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
        raise FileNotFoundError(
            f"{path} does not exist; {folder} is not a metaloop run folder or has no {checkpoint} "
            f"(checkpoints there: {', '.join(present) or 'none'})"
        )
    return load_module(path, map_location=map_location, allow=allow)


def load_tasks(path: str | Path, allow: Iterable[str] = ()) -> lightning.LightningDataModule:
    """Returns the task data module of the run that wrote the checkpoint at ``path`` (a file or an http(s) address).

    Built from the stored configuration's ``task.datamodule`` through the same allowlist as :func:`load_module`
    (``allow`` adds import paths or package prefixes, e.g. a ``task=custom`` run's ``["mypkg.tasks.linear_tasks"]``).

    Raises:
        FileNotFoundError: for a missing file. ValueError: for a checkpoint without a configuration;
            :class:`~metaloop.lightning.targets.TargetNotAllowed` for a target that is not allowed (nothing was built).
    """
    config = _config(_load(path), path)
    return build(_node(config, "task.datamodule", path), allow, source=f"checkpoint {path}", key="task.datamodule")
