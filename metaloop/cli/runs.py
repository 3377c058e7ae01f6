"""Run folders: one process at a time, the checkpoint a command means, and a record that is never overwritten.

- :func:`lock_run_folder` holds an exclusive lock on ``RUN_DIR/.metaloop.lock`` while a command runs, so a second ``metaloop`` in the same folder fails at once instead of mixing two runs.
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
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metaloop.lightning.checkpoint import CheckpointError, download, is_remote

__all__ = ["RunFolderBusy", "lock_run_folder", "record_subdir", "removing_downloads", "resolve_ckpt_path"]

LOCK_NAME = ".metaloop.lock"


class RunFolderBusy(RuntimeError):
    """Another metaloop process holds the run folder."""


@contextlib.contextmanager
def lock_run_folder(folder: Path | None) -> Iterator[None]:
    """Creates ``folder`` and holds an exclusive lock on it for the block; raises :class:`RunFolderBusy` naming the holder.

    None locks nothing. The lock is an ``flock`` on ``folder/.metaloop.lock``: the system releases it when
    the process ends, however it ends, so a crashed run never leaves its folder locked.
    """
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunFolderBusy(
                f"run folder {folder} is in use by another metaloop run ({holder}); wait for it to finish or choose "
                "another hydra.run.dir"
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


_downloads: list[Path] = []  # the folders _download made in this process and no block has removed yet


def _download(url: str) -> str:
    folder = Path(tempfile.mkdtemp(prefix="metaloop-ckpt-"))
    _downloads.append(folder)
    target = folder / "downloaded.ckpt"
    download(url, target)
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
            shutil.rmtree(_downloads.pop(), ignore_errors=True)
