"""Reading checkpoints without running code: every checkpoint metaloop loads goes through :func:`load_checkpoint`.

A checkpoint is a pickle, and a pickle can call any function while it loads (``os.system`` included).
metaloop's checkpoints hold only tensors, numbers, strings and containers, so they load with
``torch.load(..., weights_only=True)``, which refuses every other global. Remote paths (``http://``,
``https://``) are downloaded to a temporary file (at most ``$METALOOP_MAX_DOWNLOAD_BYTES``, 2 GiB by
default), loaded the same way and deleted; Lightning's own loader would unpickle them with arbitrary
globals allowed. :class:`SafeCheckpointIO` makes the Trainer use this loader for ``ckpt_path=`` in fit,
validate and test, and saves atomically: a checkpoint is written beside its target, synced and renamed
over it, so a full disk or a kill never leaves a truncated checkpoint (or a temporary file elsewhere).
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import os
import pickle
import pickletools
import re
import tempfile
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = [
    "CheckpointError", "CheckpointSaveError", "SafeCheckpointIO", "check_fits", "download", "intact_sibling", "is_remote",
    "load_checkpoint", "local_file", "max_download_bytes", "save_atomically",
]

_REMOTE_SCHEMES = ("http://", "https://")
_DOWNLOAD_TIMEOUT_S = 60
MAX_DOWNLOAD_ENV = "METALOOP_MAX_DOWNLOAD_BYTES"
_DEFAULT_MAX_DOWNLOAD = 2 * 1024**3
_CHUNK = 1024**2


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely: missing, truncated, not a checkpoint, holding code, or too large to download."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a read-only folder); the file it would replace is intact."""


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
    with local_file(path) as local:
        return _load_local(Path(local), map_location, shown=str(path), check_siblings=check_siblings and not is_remote(path))


@contextlib.contextmanager
def local_file(path: Any) -> Iterator[Any]:
    """Yields ``path`` itself, or for an http(s) address a downloaded copy (see :func:`download`) deleted when the block ends."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="metaloop-ckpt-") as folder:
        local = Path(folder) / "downloaded.ckpt"
        download(str(path), local)
        yield local


def max_download_bytes() -> int:
    """Returns the largest checkpoint :func:`download` fetches: ``$METALOOP_MAX_DOWNLOAD_BYTES``, or 2 GiB."""
    text = os.environ.get(MAX_DOWNLOAD_ENV, "").strip()
    if not text:
        return _DEFAULT_MAX_DOWNLOAD
    if not text.isdigit() or int(text) == 0:
        raise CheckpointError(f"{MAX_DOWNLOAD_ENV}={text!r} is not a positive number of bytes; e.g. {MAX_DOWNLOAD_ENV}=4294967296 (4 GiB), or unset it for 2 GiB")
    return int(text)


def download(url: str, target: Path) -> None:
    """Copies the file at ``url`` to ``target``, at most :func:`max_download_bytes` of it.

    Raises:
        CheckpointError: naming the address, for a failed download or a file over the limit (refused from its
            Content-Length before reading, or once more bytes than the limit arrived). ``target`` is removed.
    """
    limit = max_download_bytes()
    too_large = (
        f"the checkpoint {url} is larger than the download limit of {limit} bytes ({MAX_DOWNLOAD_ENV}); download it "
        f"yourself and pass the file, or raise {MAX_DOWNLOAD_ENV}"
    )
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise CheckpointError(f"{too_large} (it declares {declared} bytes)")
            with open(target, "wb") as out:
                received = 0
                while chunk := response.read(_CHUNK):
                    received += len(chunk)
                    if received > limit:
                        raise CheckpointError(too_large)
                    out.write(chunk)
    except BaseException as err:
        target.unlink(missing_ok=True)
        if isinstance(err, (OSError, ValueError)) and not isinstance(err, CheckpointError):
            raise CheckpointError(f"could not download the checkpoint {url}: {err}") from err
        raise


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
        # torch's own message suggests loading without the restriction: exactly what must not be done here
        raise CheckpointError(_damaged(path, shown, "unreadable pickle data", check_siblings)) from err
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, AttributeError, IndexError) as err:
        raise CheckpointError(_damaged(path, shown, (str(err).splitlines() or [type(err).__name__])[0], check_siblings)) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {shown} holds a {type(checkpoint).__name__}, not a Lightning checkpoint dictionary")
    return checkpoint


# The globals a checkpoint of tensors, numbers, strings and containers imports: named one by one, so that
# builtins.exec, builtins.getattr or torch.hub.load_state_dict_from_url are reported as the code they are.
_DATA_GLOBALS = frozenset({
    "builtins.set", "builtins.frozenset", "builtins.list", "builtins.dict", "builtins.tuple", "builtins.int",
    "builtins.float", "builtins.complex", "builtins.bool", "builtins.str", "builtins.bytes", "builtins.bytearray",
    "builtins.slice", "builtins.range", "_codecs.encode", "collections.OrderedDict", "collections.Counter",
    "torch.Size", "torch.Tensor", "torch.device", "torch.nn.parameter.Parameter", "torch.serialization._get_layout",
    "torch._tensor._rebuild_from_type_v2", "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
})
_DATA_PATTERN = re.compile(r"torch\._utils\._rebuild_\w+|torch\.(cuda\.)?(sparse\.)?[A-Z]\w*(Storage|Tensor)")


def _is_data(name: str) -> bool:
    """True for a global that rebuilds data (a container, a tensor, a storage, a dtype), not one that runs code."""
    if name in _DATA_GLOBALS or _DATA_PATTERN.fullmatch(name):
        return True
    module, _, attribute = name.rpartition(".")
    if module == "torch":  # dtypes and quantisation schemes: torch.float32, torch.per_tensor_affine
        return isinstance(getattr(torch, attribute, None), (torch.dtype, torch.qscheme))
    allowed = torch.serialization.get_safe_globals()  # what the user registered with torch.serialization.add_safe_globals
    return name in {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in allowed}


def _foreign_globals(path: Path) -> list[str]:
    """Returns the functions and classes a pickle would import, other than the ones that rebuild data.

    Reads the pickle's opcodes without executing them (``pickletools``), following the memo through which
    protocol 4 reuses a module name; a file that is not a pickle (random bytes, a truncated file) yields
    what was read before the damage, usually nothing.
    """
    try:
        data = path.read_bytes()
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    except (OSError, StopIteration, zipfile.BadZipFile):
        return []
    found: list[str] = []
    strings: list[str | None] = []  # what each opcode pushed, when it was a string (None: something else)
    memo: dict[int, str | None] = {}
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                found.append(str(argument).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2 and None not in strings[-2:]:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if opcode.name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(argument)] = strings[-1] if strings else None
            elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
                strings.append(memo.get(int(argument)))
            elif opcode.stack_after:
                strings.append(argument if isinstance(argument, str) and opcode.name != "STACK_GLOBAL" else None)
    except Exception:  # damaged bytes: keep what was read before them
        pass
    return [name for name in dict.fromkeys(map(_python3_name, found)) if not _is_data(name)]


def _python3_name(name: str) -> str:
    """Returns the global a protocol 0-2 pickle's name means (``__builtin__.exec`` is ``builtins.exec``), as pickle maps it."""
    module, _, attribute = name.rpartition(".")
    if (module, attribute) in _compat_pickle.NAME_MAPPING:
        return ".".join(_compat_pickle.NAME_MAPPING[module, attribute])
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attribute}"


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


def save_atomically(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Writes ``checkpoint`` to the local file ``path``, which then holds either its previous bytes or all of the new ones.

    The bytes go to a temporary file beside ``path`` (``.NAME.XXXXXXXX.tmp``: same filesystem, so the rename is
    atomic), are synced to disk and renamed over ``path``. Lightning's own save writes the temporary file to
    ``$TMPDIR`` and copies it over when ``$TMPDIR`` is another filesystem: a full disk truncates the checkpoint
    and a kill leaves the temporary file behind. A temporary file left here by a killed save is removed by the
    next save into the folder (one process writes a run folder's checkpoints).

    Raises:
        CheckpointSaveError: the write failed (a full disk, a read-only folder), in one line naming the folder
            and the reason; the temporary file is removed and ``path`` is unchanged.
    """
    target = Path(path)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    temporary: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(".*.ckpt.*.tmp"):
            stale.unlink(missing_ok=True)
        temporary = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
        # os.open applies the umask, as for any new file (mkstemp would make it private)
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as out:
            out.write(buffer.getbuffer())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
        temporary = None
        _sync_folder(target.parent)
    except OSError as err:
        raise CheckpointSaveError(
            f"could not save the checkpoint {target.name} in {target.parent}: {err.strerror or err}; the checkpoints "
            "already there are intact, none was replaced (free space, or make the folder writable)"
        ) from err
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable; filesystems that cannot sync a folder are left as they are."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, loading through :func:`load_checkpoint` (``weights_only=True``, remote too) and saving local files with :func:`save_atomically`."""

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable[..., Any] | str | torch.device | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec transaction
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomically(checkpoint, path)


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
