"""What a stored configuration may build: a checkpoint carries data, never instructions.

A checkpoint written by ``metaloop fit`` stores its run configuration, and rebuilding the learner or its
tasks instantiates that configuration's ``_target_`` import paths. Any importable callable can be named
there: ``torch.hub.load_state_dict_from_url`` downloads a file and may unpickle it (code runs),
``builtins.open(..., mode="w")`` truncates one. :func:`build` instantiates a configuration node only after
:func:`check_targets` has found every target in it allowed, before anything is called:

- the classes metaloop exports (``metaloop``, ``metaloop.algorithms``, ``metaloop.lightning``, ``metaloop.nn``,
  ``metaloop.optim``, ``metaloop.tasks``, ``metaloop.transforms``), by public name and by the name of their defining module,
  and the networks' former paths (``metaloop.lightning.Conv4``: ``metaloop.lightning.MOVED_TO_NN``);
- the modules of ``torch.nn``, the optimizers of ``torch.optim`` and the schedulers of ``torch.optim.lr_scheduler``;
- :data:`SHIPPED`: the other targets metaloop's ``configs/`` name (a model function, callbacks, the
  Trainer, loggers), ``functools.partial``, and ``hydra.utils.get_class`` of an allowed path;
- what the user allows: ``allow=[...]`` or ``$METALOOP_ALLOW_TARGETS`` (comma-separated), each an exact
  path or a package prefix ending in ``.`` (``mypkg.``).

Built-in names match exactly, never by prefix: ``metaloop.lightning.checkpoint.torch.hub.load_state_dict_from_url``
reaches torch's function through a module attribute, and ``metaloop.cli.main`` is a metaloop function that
runs any recipe. An object allowed by a user's prefix must be defined in that package. Interpolations
(``${...}``) are refused too: resolvers run when a value is read, and a stored configuration is resolved
when it is written, so it holds none.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ALLOW_ENV", "SHIPPED", "TargetNotAllowed", "allowed_targets", "build", "check_targets", "refuse_interpolations"]

ALLOW_ENV = "METALOOP_ALLOW_TARGETS"
GET_CLASS = "hydra.utils.get_class"

# The targets of metaloop's configs/ that are not classes metaloop exports (tests/lightning/test_targets.py
# walks configs/ and recipes/ and checks that every target there is allowed).
SHIPPED = frozenset({
    "functools.partial",
    GET_CLASS,  # its path is checked as a target too
    "metaloop.nn.conv4_backbone",
    "metaloop.lightning.callbacks.MetaStepTimer",
    "metaloop.lightning.callbacks.RunCheckpoint",
    "metaloop.lightning.callbacks.StopOnNonFinite",
    "metaloop.cli.report.LearningCurve",
    "metaloop.cli.report.MetaStepProgressBar",
    "metaloop.cli.sweep.SweepResults",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.MLFlowLogger",
    "lightning.pytorch.loggers.WandbLogger",
    "metaloop.lightning.distributed.DDPStrategy",
    "hydra_plugins.metaloop_launcher.slurm_launcher.SlurmLauncher",
})
_EXPORTING = (
    "metaloop", "metaloop.algorithms", "metaloop.lightning", "metaloop.nn", "metaloop.optim", "metaloop.tasks", "metaloop.transforms"
)
_TORCH_FAMILIES = (("torch.nn", "torch.nn.Module"), ("torch.optim", "torch.optim.Optimizer"), ("torch.optim.lr_scheduler", "torch.optim.lr_scheduler.LRScheduler"))


class TargetNotAllowed(ValueError):
    """A stored configuration names a ``_target_`` (or holds an interpolation) that metaloop does not build."""


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


@functools.cache
def allowed_targets() -> frozenset[str]:
    """Returns the import paths any stored configuration may name (see the module's docstring), without the user's."""
    names = set(SHIPPED)
    for package in map(importlib.import_module, _EXPORTING):
        for public in getattr(package, "__all__", ()):
            obj = getattr(package, public)
            if isinstance(obj, type):
                names |= {f"{package.__name__}.{public}", _name(obj)}
        # the former paths of networks that moved to metaloop.nn, which configurations stored before name
        names |= {f"{package.__name__}.{former}" for former in getattr(package, "MOVED_TO_NN", ())}
    for namespace, base_path in _TORCH_FAMILIES:
        module = importlib.import_module(namespace)
        base_module, _, base_name = base_path.rpartition(".")
        base = getattr(importlib.import_module(base_module), base_name)
        for public, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, base):
                names |= {f"{namespace}.{public}", _name(obj)}
    return frozenset(names)


def _user_entries(allow: Iterable[str]) -> list[str]:
    entries = [*allow, *os.environ.get(ALLOW_ENV, "").split(",")]
    return [entry.strip() for entry in entries if entry.strip()]


def _allowed(target: str, user: list[str], source: str, key: str) -> bool:
    if target in allowed_targets() or target in user:
        return True
    for prefix in (entry for entry in user if entry.endswith(".") and target.startswith(entry)):
        from hydra._internal.utils import _locate  # how instantiate resolves a target

        try:
            obj = _locate(target)  # imports the package the user trusts, nothing else
        except (ImportError, ValueError) as err:
            raise TargetNotAllowed(f"{source} names the target {target!r} at {key}, which cannot be imported: {str(err).splitlines()[-1]}") from None
        # a prefix covers what the package defines, not what it imports (mypkg.os.system is os.system)
        if _name(obj).startswith(prefix) or _name(obj) in allowed_targets():
            return True
    return False


def refuse_interpolations(node: Any, source: str = "the configuration", key: str = "") -> None:
    """Raises :class:`TargetNotAllowed` naming the first ``${...}`` in ``node``'s keys or string values; resolves nothing.

    metaloop stores resolved configurations, so a stored one holds no interpolation; resolving one read from
    a file could call any resolver registered in the process.
    """
    for where, value in _items(_plain(node), key):
        if isinstance(value, str) and "${" in value:
            raise TargetNotAllowed(
                f"{source} holds the interpolation {value!r} at {where}; metaloop stores resolved configurations and "
                "does not resolve one from a file (a resolver could run code): it was not written by `metaloop fit`"
            )


def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=False)
    return node


def _items(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """Yields (config key, value) for ``value`` and everything nested in it; a mapping's keys are yielded as values too."""
    yield key or "<root>", value
    if isinstance(value, Mapping):
        for name, item in value.items():
            where = f"{key}.{name}" if key else str(name)
            yield where, str(name)
            yield from _items(item, where)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _items(item, f"{key}[{index}]")


def check_targets(node: Any, allow: Iterable[str] = (), source: str = "the configuration", key: str = "") -> None:
    """Raises :class:`TargetNotAllowed` for the first ``_target_`` in ``node`` (nested ones, ``_args_`` included) that is not allowed.

    Nothing is called and nothing outside the user's allowed packages is imported. ``allow`` adds exact
    import paths or package prefixes ending in ``.``, as ``$METALOOP_ALLOW_TARGETS`` does; ``source``
    (e.g. ``"checkpoint runs/a/checkpoints/last.ckpt"``) and ``key`` (where ``node`` sits) start the message.
    An interpolation anywhere in ``node`` is refused as well: resolving it could call a resolver.
    """
    refuse_interpolations(node, source, key)
    user = _user_entries(allow)
    for where, value in _items(_plain(node), key):
        if not isinstance(value, Mapping) or "_target_" not in value:
            continue
        target = value["_target_"]
        target = target if isinstance(target, str) else _name(target)
        named = [(target, f"{where}._target_")]
        if target == GET_CLASS:  # returns the class at its path: the path is the real target
            args = value.get("_args_") or []
            path = value.get("path", args[0] if args else None)
            named.append((path if isinstance(path, str) else repr(path), f"{where}.path"))
        for name, at in named:
            if not _allowed(name, user, source, at):
                raise TargetNotAllowed(
                    f"{source} names the target {name!r} at {at}, which metaloop does not build from a stored "
                    "configuration (only metaloop's classes, torch.nn/torch.optim classes and what metaloop's configs "
                    f"name; anything else could run code). If you trust it, allow it: allow=[{name!r}] or "
                    f"{ALLOW_ENV}={name} (a prefix such as 'mypkg.' allows a package)"
                )


def build(node: Any, allow: Iterable[str] = (), source: str = "the configuration", key: str = "") -> Any:
    """Returns ``hydra.utils.instantiate(node, _convert_="partial")`` after :func:`check_targets` allowed all of ``node``.

    >>> build({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 1}).weight.shape
    torch.Size([1, 2])
    """
    from hydra.utils import instantiate

    plain = _plain(node)  # what is checked is what is built
    check_targets(plain, allow, source, key)
    return instantiate(plain, _convert_="partial")
