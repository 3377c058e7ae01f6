"""Reading checkpoints without running code: every checkpoint metaloop loads goes through :func:`load_checkpoint`.

A checkpoint is a pickle, and a pickle can call any function while it loads (``os.system`` included).
metaloop's checkpoints hold only tensors, numbers, strings and containers, so they load with
``torch.load(..., weights_only=True)``, which refuses every other global. Remote paths (``http://``,
``https://``) are downloaded to a temporary file and loaded the same way; Lightning's own loader would
unpickle them with arbitrary globals allowed. :class:`SafeCheckpointIO` makes the Trainer use this loader for
``ckpt_path=`` in fit, validate and test.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["CheckpointError", "SafeCheckpointIO", "check_fits", "download", "intact_sibling", "is_remote", "load_checkpoint"]

_REMOTE_SCHEMES = ("http://", "https://")
_DOWNLOAD_TIMEOUT_S = 60


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely: missing, truncated, not a checkpoint, or holding code."""


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for an ``http://`` or ``https://`` address."""
    return str(path).startswith(_REMOTE_SCHEMES)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu", *, check_siblings: bool = True
) -> dict[str, Any]:
    """Returns the checkpoint dictionary at ``path`` (a file, or an http(s) address), loaded without running code.

    Raises:
        CheckpointError: the file does not exist, is empty or truncated, is not a torch checkpoint, holds
            anything but tensors, numbers, strings and containers (a pickled function or class: code), or is
            not a dictionary. The message names the file and, for a damaged local file, an intact checkpoint
            beside it if there is one (``check_siblings``).
    """
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="metaloop-ckpt-") as folder:
            local = Path(folder) / "downloaded.ckpt"
            download(str(path), local)
            return _load_local(local, map_location, shown=str(path), check_siblings=False)
    return _load_local(Path(path), map_location, shown=str(path), check_siblings=check_siblings)


def download(url: str, target: Path) -> None:
    """Copies the file at ``url`` to ``target``; raises :class:`CheckpointError` naming the address on failure."""
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"could not download the checkpoint {url}: {err}") from err


def _load_local(path: Path, map_location: Any, *, shown: str, check_siblings: bool) -> dict[str, Any]:
    if not path.is_file():
        where = f"; checkpoints in that folder: {', '.join(sorted(p.name for p in path.parent.glob('*.ckpt')))}" if path.parent.is_dir() and any(path.parent.glob("*.ckpt")) else ""
        raise CheckpointError(f"checkpoint {shown} does not exist{where}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        foreign = _foreign_globals(path)
        if foreign:
            raise CheckpointError(
                f"checkpoint {shown} holds pickled code or objects ({', '.join(foreign[:3])}), not only tensors and "
                "numbers; metaloop refuses to load it (loading would run that code). Re-save the weights from a "
                "trusted environment, e.g. torch.save({'state_dict': model.state_dict()}, path)"
            ) from err
        # torch's own message suggests weights_only=False, which is exactly what must not be done here
        raise CheckpointError(_damaged(path, shown, "unreadable pickle data", check_siblings)) from err
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, AttributeError, IndexError) as err:
        raise CheckpointError(_damaged(path, shown, (str(err).splitlines() or [type(err).__name__])[0], check_siblings)) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {shown} holds a {type(checkpoint).__name__}, not a Lightning checkpoint dictionary")
    return checkpoint


_SAFE_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.", "_codecs.encode", "numpy.")


def _foreign_globals(path: Path) -> list[str]:
    """Returns the functions and classes a pickle would import, other than torch's tensor machinery.

    Reads the pickle's opcodes without executing them (``pickletools``); a file that is not a pickle
    (random bytes, a truncated file) yields what was read before the damage, usually nothing.
    """
    try:
        data = path.read_bytes()
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    except (OSError, StopIteration, zipfile.BadZipFile):
        return []
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                found.append(str(argument).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(argument, str):
                strings.append(argument)
    except Exception:  # damaged bytes: keep what was read before them
        pass
    return [name for name in dict.fromkeys(found) if not name.startswith(_SAFE_PREFIXES)]


def _damaged(path: Path, shown: str, reason: str, check_siblings: bool) -> str:
    size = path.stat().st_size
    what = "is empty" if size == 0 else f"is not a readable torch checkpoint ({size} bytes; {reason})"
    message = f"checkpoint {shown} {what}: it may be truncated by a crash or a full disk"
    sibling = intact_sibling(path) if check_siblings else None
    return message + (f"; an intact checkpoint in the same folder: {sibling}" if sibling else "")


def intact_sibling(path: Path) -> Path | None:
    """Returns the newest other ``*.ckpt`` beside ``path`` that loads safely, or None."""
    others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime, reverse=True)
    for other in others:
        try:
            _load_local(other, "cpu", shown=str(other), check_siblings=False)
        except CheckpointError:
            continue
        return other
    return None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with loading through :func:`load_checkpoint` (``weights_only=True``, remote too)."""

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable[..., Any] | str | torch.device | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location)


def check_fits(module: torch.nn.Module, checkpoint: dict[str, Any], path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Raises :class:`CheckpointError` naming each difference between ``checkpoint`` and ``module`` (and ``optimizer``).

    Compares the names and shapes of the saved weights with the module's (another model width, another
    ``learnable``), and, for resuming, the saved outer optimizer's hyperparameter names and parameter
    count with ``optimizer``'s (another outer optimizer).
    """
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} has no state_dict: it was not written by Lightning's Trainer")
    problems = []
    current = module.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        problems.append(f"weights this configuration has but the checkpoint lacks: {_names(missing)}")
    if unexpected:
        problems.append(f"weights the checkpoint has but this configuration lacks: {_names(unexpected)}")
    shapes = [
        f"{k} {tuple(saved[k].shape)} in the checkpoint, {tuple(v.shape)} here"
        for k, v in current.items()
        if k in saved and isinstance(saved[k], torch.Tensor) and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if shapes:
        problems.append("shapes differ: " + _names(shapes))
    if optimizer is not None and checkpoint.get("optimizer_states"):
        state = checkpoint["optimizer_states"][0]
        groups = state.get("param_groups") or [{}]
        saved_keys = set(groups[0]) - {"params"}
        keys = set(optimizer.param_groups[0]) - {"params"}
        if saved_keys != keys:
            problems.append(
                f"the outer optimizer differs: the checkpoint's has hyperparameters {sorted(saved_keys)}, "
                f"{type(optimizer).__name__} has {sorted(keys)}"
            )
        else:
            counted = sum(len(g.get("params", ())) for g in groups)
            count = sum(len(g["params"]) for g in optimizer.param_groups)
            if counted != count:
                problems.append(f"the outer optimizer's checkpoint covers {counted} tensors, this configuration trains {count}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit this configuration: {'; '.join(problems)}. Use the configuration it was "
            "trained with (its run folder's .hydra/config.yaml)"
        )


def _names(items: list[str], shown: int = 4) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")
