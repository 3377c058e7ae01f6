"""Run folders: one process at a time, one run per folder, the checkpoint a command means, and a record that is never overwritten.

- :func:`hold_run_folder` holds a run's (or a sweep's) folder while a command runs: an exclusive lock on
  ``FOLDER/.metaloop.lock``, so a second ``metaloop`` in the same folder fails at once instead of mixing two
  runs; a timestamped default folder is created new for each run (``_1``, ``_2``... when two runs start in the
  same second); a new fit never goes into a folder that holds a finished run's checkpoints or results.
- :func:`resolve_ckpt_path` turns ``ckpt_path`` into the file a command uses: ``last`` must exist in the
  run folder, ``validate``/``test`` need a checkpoint (``none`` evaluates the untrained model on purpose),
  and a remote address is downloaded once (to ``$TMPDIR/metaloop-ckpt-*``, deleted when the block of
  :func:`removing_downloads` ends) and then loaded without running code.
- :func:`record_subdir` keeps the fit's ``.hydra/`` record: evaluation and resumed runs record their
  configuration in a sub-folder of their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaloop.lightning.checkpoint import CheckpointError, download, is_remote

__all__ = [
    "LOCK_NAME", "RunFolder", "RunFolderBusy", "RunFolderError", "finished_files", "hold_run_folder", "lock_run_folder",
    "record_subdir", "removing_downloads", "resolve_ckpt_path",
]

LOCK_NAME = ".metaloop.lock"
_FINISHED = ("results.json", "checkpoints/*.ckpt")  # what a fit leaves that a second fit would mix with its own
_FINISHED_SWEEP = ("sweep_results.csv", *(f"*/{pattern}" for pattern in _FINISHED))


class RunFolderError(RuntimeError):
    """A run or sweep folder this command may not use: in use, holding a finished run, or not a writable folder."""


class RunFolderBusy(RunFolderError):
    """Another metaloop process holds the run folder."""


@dataclass(frozen=True)
class RunFolder:
    """The folder a command will run in, as planned before anything is written.

    Attributes:
        path: the folder; for a ``fresh`` one, the name to start from.
        kind: ``"run"`` or ``"sweep"``: which of ``hydra.run.dir`` and ``hydra.sweep.dir`` names it.
        fresh: a new folder for each command (a timestamped default): created here, ``path_1``, ``path_2``... when
            ``path`` is taken (two commands started in the same second).
        new_run: the command starts new fits there (it resumes none of the folder's checkpoints), so the folder
            must not hold a finished run's checkpoints or results.
    """

    path: Path
    kind: str = "run"
    fresh: bool = False
    new_run: bool = False

    @property
    def key(self) -> str:
        """Returns the Hydra key that names the folder."""
        return f"hydra.{self.kind}.dir"


def finished_files(folder: Path, kind: str = "run") -> list[str]:
    """Returns the files of a finished run in ``folder`` (a sweep folder: of its jobs too), relative to it, sorted."""
    patterns = _FINISHED_SWEEP + _FINISHED if kind == "sweep" else _FINISHED
    return sorted({str(p.relative_to(folder)) for pattern in patterns for p in folder.glob(pattern)})


@contextlib.contextmanager
def hold_run_folder(folder: RunFolder) -> Iterator[Path]:
    """Yields the folder ``folder`` plans, created and locked for the block (see :class:`RunFolder`).

    Raises:
        RunFolderError: before anything is written in it: the folder is a file or cannot be written (one line
            naming the path and the fix); another metaloop process holds it (:class:`RunFolderBusy`); a new fit
            would go into a folder holding a finished run (naming ``ckpt_path=last`` and a new folder).
    """
    missing = [p for p in (folder.path, *folder.path.parents) if not p.exists()]
    path = _new_folder(folder) if folder.fresh else folder.path
    created = [path, *missing[1:]] if folder.fresh or missing else []
    with lock_run_folder(path, folder.key):
        try:
            finished = finished_files(path, folder.kind) if folder.new_run else []
            if finished:
                shown = ", ".join(finished[:3]) + (f" and {len(finished) - 3} more" if len(finished) > 3 else "")
                what = "a sweep's jobs" if folder.kind == "sweep" else "a finished run"
                raise RunFolderError(
                    f"{folder.kind} folder {path} already holds {what} ({shown}); resume {'its jobs' if folder.kind == 'sweep' else 'it'} "
                    f"with ckpt_path=last, or start anew in a new folder (another {folder.key}, or none for a new timestamped one)"
                )
            yield path
        finally:  # still holding the lock: no other run can be using the folder
            _remove_if_unused(path, created)


def _remove_if_unused(path: Path, created: list[Path]) -> None:
    """Removes the lock file and the folders ``created`` here when the command wrote nothing else (it failed first)."""
    with contextlib.suppress(OSError):
        if {p.name for p in path.iterdir()} <= {LOCK_NAME}:
            (path / LOCK_NAME).unlink(missing_ok=True)
            for folder in created:  # deepest first
                folder.rmdir()


def _new_folder(folder: RunFolder) -> Path:
    """Returns a folder created here: ``folder.path``, or the first of ``path_1``, ``path_2``... that did not exist."""
    base = folder.path
    _make(base.parent, folder.key, base)
    for number in itertools.count():
        candidate = base if number == 0 else base.with_name(f"{base.name}_{number}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            raise _unusable(candidate, folder.key, err) from None
        return candidate
    raise AssertionError("unreachable")


def _make(path: Path, key: str, shown: Path) -> None:
    """Creates the folder ``path`` (and its parents) if needed; raises :class:`RunFolderError` naming ``key=shown``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unusable(shown, key, err) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _unusable(shown, key, PermissionError(13, "not writable"))


def _unusable(path: Path, key: str, err: OSError) -> RunFolderError:
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking == path:
        problem = "is a file, not a folder"
    elif blocking is not None:
        problem = f"cannot be created: {blocking} is a file"
    else:
        problem = f"cannot be written ({err.strerror or err})"
    return RunFolderError(f"{key}={path} {problem}; choose a folder this user can create and write, e.g. {key}=runs/NAME")


@contextlib.contextmanager
def lock_run_folder(folder: Path | None, key: str = "hydra.run.dir") -> Iterator[None]:
    """Creates ``folder`` and holds an exclusive lock on it for the block; raises :class:`RunFolderBusy` naming the holder.

    None locks nothing. The lock is an ``flock`` on ``folder/.metaloop.lock``: the system releases it when
    the process ends, however it ends, so a crashed run never leaves its folder locked. A folder that is a file
    or cannot be written raises :class:`RunFolderError` naming ``key=folder`` before anything is written.
    """
    if folder is None:
        yield
        return
    _make(folder, key, folder)
    try:
        handle = open(folder / LOCK_NAME, "a+")
    except OSError as err:
        raise _unusable(folder, key, err) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunFolderBusy(
                f"{key.split('.')[1]} folder {folder} is in use by another metaloop {'sweep' if 'sweep' in key else 'run'} "
                f"({holder}); wait for it to finish or choose another {key}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_subdir(command: str, ckpt_path: Any) -> str | None:
    """Returns the ``hydra.output_subdir`` that keeps an earlier fit's ``.hydra/`` record, or None for a new fit."""
    if command != "fit":
        return f".hydra/{command}-${{now:%Y-%m-%d_%H-%M-%S}}"
    if ckpt_path not in (None, "none"):
        return ".hydra/resume-${now:%Y-%m-%d_%H-%M-%S}"
    return None


def resolve_ckpt_path(command: str, ckpt_path: Any, run_dir: Path | None, fetch: bool = True) -> str | None:
    """Returns the local checkpoint file ``command`` should start from, or None (fit from scratch / untrained model).

    ``run_dir`` is the run folder (None: not known yet, a timestamped folder). ``fetch=False`` checks a
    remote address without downloading it (and returns it unchanged).

    Raises:
        CheckpointError: ``last`` with no ``last.ckpt`` in the run folder; ``validate``/``test`` without a
            checkpoint; a file that does not exist; a download that fails.
    """
    if ckpt_path is None:
        if command == "fit":
            return None
        raise CheckpointError(
            f"{command} needs the checkpoint to evaluate: ckpt_path=PATH (a file, or 'last' with hydra.run.dir=RUN); "
            "ckpt_path=none evaluates the untrained model on purpose"
        )
    ckpt_path = str(ckpt_path)
    if ckpt_path == "none":
        return None
    if ckpt_path == "last":
        if run_dir is None:
            raise CheckpointError(
                "ckpt_path=last resumes the run in hydra.run.dir, but no hydra.run.dir was given (a new timestamped "
                "folder has no checkpoint); add hydra.run.dir=RUN, the folder holding checkpoints/last.ckpt"
            )
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise CheckpointError(
                f"ckpt_path=last found no {last}; pass the run's folder with hydra.run.dir=RUN (the folder holding "
                "checkpoints/last.ckpt), or a checkpoint file with ckpt_path=PATH"
            )
        return str(last)
    if is_remote(ckpt_path):
        return _download(ckpt_path) if fetch else ckpt_path
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist")
    return str(path)


_fetched: dict[str, str] = {}  # address -> its local copy, while the block that downloaded it lasts
_downloads: list[Path] = []  # the folders _download made in this process and no block has removed yet


def _download(url: str) -> str:
    """Returns the local copy of ``url``: downloaded once per :func:`removing_downloads` block, then reused."""
    known = _fetched.get(url)
    if known is not None and Path(known).is_file():
        return known
    folder = Path(tempfile.mkdtemp(prefix="metaloop-ckpt-"))
    _downloads.append(folder)
    target = folder / "downloaded.ckpt"
    download(url, target)
    _fetched[url] = str(target)
    return str(target)


@contextlib.contextmanager
def removing_downloads() -> Iterator[None]:
    """Deletes the checkpoints :func:`resolve_ckpt_path` downloads in the block when it ends, however it ends.

    The Trainer reads ``ckpt_path`` after :func:`resolve_ckpt_path` returns, so the file must outlive that
    call; the command's run is the block.
    """
    start = len(_downloads)
    try:
        yield
    finally:
        while len(_downloads) > start:
            folder = _downloads.pop()
            for url in [u for u, path in _fetched.items() if Path(path).parent == folder]:
                del _fetched[url]
            shutil.rmtree(folder, ignore_errors=True)
