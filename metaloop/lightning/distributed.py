"""What keeps the ranks of a DDP run together: they stop together, and a failed or stuck rank ends the run in one line.

:class:`DDPStrategy` (``trainer=ddp``) is Lightning's DDP strategy with three additions:

- **A short collective timeout.** Once training runs, a rank that waits longer than ``timeout_s`` seconds
  (default 300; torch's default is 30 minutes) for the others stops. Start-up keeps torch's default:
  ranks load their data before they meet, and that may take minutes.
- **SIGTERM stops every rank at the same meta-step.** Schedulers (``scancel``, preemption) signal every
  rank at once; Lightning's handler broadcasts from inside the signal handler, which deadlocks when the
  ranks are in different collectives. Here the handler only notes the signal (and passes it on to the
  ranks this process launched); before each meta-step the ranks all-reduce their notes, and if any rank
  was signalled, all stop before that step: :class:`~metaloop.lightning.callbacks.RunCheckpoint` saves
  ``last.ckpt`` of the step reached (rank 0 writes it) and every rank exits 143. Should the ranks not
  agree within ``timeout_s`` (a rank is stuck), the process exits 143 without saving. An evaluation has
  nothing to save: a signal ends it at once.
- **A failure names its rank.** A rank that raises publishes its error on the process group's store
  before its connections close; a rank whose collective then fails, or times out, reports which rank
  failed or did not answer (:attr:`DDPStrategy.failure`) instead of gloo's "Connection closed by peer".
  The process that launched the other ranks waits for them (a few seconds), then kills any left, so no
  rank outlives the run; if a rank it launched dies while it runs on, it stops within seconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from types import FrameType
from typing import Any

import lightning
import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["DDPStrategy"]

SIGTERM_EXIT = 128 + signal.SIGTERM
_FAILED = "metaloop/failed/"  # + rank: the error of a rank that raised
_GAVE_UP = "metaloop/gave_up/"  # + rank: a rank whose collective failed or timed out
_GRACE_S = 10.0  # how long the launching process waits for the ranks it launched to end on their own
_PEER_WAIT_S = 2.0  # how long a rank whose collective failed waits for the other ranks to say why


class DDPStrategy(lightning.pytorch.strategies.DDPStrategy):
    """Lightning's ``DDPStrategy`` whose ranks stop together on SIGTERM and give up on a stuck or failed rank.

    Args:
        timeout_s: seconds a rank waits for the others in a collective once training runs (Lightning's
            ``timeout`` stays the start-up limit). Also how long a SIGTERM may wait for the ranks to agree.
        **kwargs: Lightning's ``DDPStrategy`` arguments.

    Raises:
        ValueError: ``timeout_s`` is not a positive number.
    """

    def __init__(self, timeout_s: float = 300.0, **kwargs: Any) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds, e.g. 300")
        super().__init__(**kwargs)
        self.timeout_s = float(timeout_s)
        self.failure: str | None = None
        """After a failed run: one line naming this rank and why it stopped (the rank that failed and its error)."""
        self._signalled = False
        self._fallback: threading.Timer | None = None

    # -- the launched ranks and the collective timeout ---------------------------------------------
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = _Launcher(self.cluster_environment, self.num_processes, self.num_nodes)

    def setup_environment(self) -> None:
        if isinstance(self._launcher, _Launcher):
            self._launcher.ending = False
        super().setup_environment()

    def setup(self, trainer: lightning.Trainer) -> None:
        super().setup(trainer)
        if _distributed():
            # private in torch, but the only way to shorten the timeout of the group DDP already holds
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=self.timeout_s))

    # -- SIGTERM: noted by the handler, acted on by all ranks at a meta-step boundary ----------------
    def on_train_start(self) -> None:
        super().on_train_start()
        self._listen()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._listen()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._listen()

    def _listen(self) -> None:
        # replaces the handler Lightning registered just before the run; Lightning restores the previous one after
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self._signalled:
            self._signalled = True
            if isinstance(self._launcher, _Launcher):
                self._launcher.kill(signum)
            self._fallback = threading.Timer(self.timeout_s, self._give_up)
            self._fallback.daemon = True
            self._fallback.start()
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            raise SIGTERMException()  # an evaluation has nothing to save

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        signalled = self._signalled
        if _distributed() and self.world_size > 1:
            votes = torch.tensor([int(signalled)], device=self.root_device)
            dist.all_reduce(votes, op=dist.ReduceOp.MAX)
            signalled = bool(votes.item())
        if signalled:
            raise SIGTERMException()

    def _give_up(self) -> None:
        print(
            f"metaloop: error: rank {self.global_rank}: SIGTERM was not acted on within timeout_s={self.timeout_s:g} s "
            "(another rank is stuck); exiting without saving",
            file=sys.stderr, flush=True,
        )
        if isinstance(self._launcher, _Launcher):
            self._launcher.kill(signal.SIGKILL)
        os._exit(SIGTERM_EXIT)

    # -- failures --------------------------------------------------------------------------------
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        launcher = self._launcher if isinstance(self._launcher, _Launcher) else None
        if launcher is not None:
            launcher.ending = True
        if not _distributed() or self.world_size == 1:
            return
        store = _default_store()
        if isinstance(exception, SIGTERMException):
            grace = _GRACE_S  # every rank stopped at the same step and ends on its own
        elif _collective_failure(exception):
            self.failure = self._why_stopped(store, exception)
            grace = _PEER_WAIT_S  # a rank that noticed the failure too ends on its own; a stuck one is killed
        else:
            self.failure = f"rank {self.global_rank}: {_describe(exception)}{_where(exception)}"
            _publish(store, f"{_FAILED}{self.global_rank}", _describe(exception))
            # the ranks this process launched wait for it in a collective: they cannot end while it lives (the
            # process group's connections close only when the process ends, whatever still holds the group)
            grace = 0.0
        if launcher is not None:
            launcher.end_children(grace)

    def _why_stopped(self, store: Any, exception: BaseException) -> str:
        """Returns the line of a rank whose collective failed: which rank failed, ended or did not answer."""
        me, others = self.global_rank, [r for r in range(self.world_size) if r != self.global_rank]
        _publish(store, f"{_GAVE_UP}{me}", "1")
        deadline = time.monotonic() + _PEER_WAIT_S
        while True:
            try:
                for rank in others:
                    error = _read(store, f"{_FAILED}{rank}")
                    if error is not None:
                        return f"rank {me}: stopped because rank {rank} failed ({error})"
            except Exception:
                # the store lives in rank 0's process (unless a launcher such as torchrun holds it): rank 0 ended
                return f"rank {me}: stopped because rank 0 ended ({_first_line(exception)})"
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if isinstance(self._launcher, _Launcher) and (ended := self._launcher.ended_children()):
            return f"rank {me}: stopped because {ended}"
        if "timeout" in str(exception).lower() or "timed out" in str(exception).lower():
            silent: list[str] = []
            with contextlib.suppress(Exception):
                silent = [str(r) for r in others if _read(store, f"{_GAVE_UP}{r}") is None]
            return (
                f"rank {me}: stopped: rank {', '.join(silent or ['?'])} did not answer within timeout_s={self.timeout_s:g} s "
                "(stuck, or slower than that); raise trainer.strategy.timeout_s if a meta-step or a checkpoint takes longer"
            )
        return f"rank {me}: stopped because another rank ended unexpectedly ({_first_line(exception)})"

    def teardown(self) -> None:
        if self._fallback is not None:
            self._fallback.cancel()
        if isinstance(self._launcher, _Launcher):
            self._launcher.ending = True
        super().teardown()


class _Launcher(_SubprocessScriptLauncher):
    """Lightning's launcher of the other local ranks, whose observer stops this process only when a rank dies.

    Lightning's own observer SIGKILLs the launching process as soon as any rank exits non-zero, also a rank
    that exits 143 after an agreed stop or 1 after reporting its error, while this process still saves or
    reports. Here a rank that dies while this process runs on (not ``ending``) stops it after a grace period,
    with one line naming the rank.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ending = False

    def launch(self, function: Callable, *args: Any, trainer: lightning.Trainer | None = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            threading.Thread(target=self._watch, daemon=True, name="metaloop-rank-observer").start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _rank(self, index: int) -> int:
        return self.cluster_environment.node_rank() * self.num_processes + index + 1

    def ended_children(self) -> str | None:
        """Returns which launched ranks exited non-zero and how ("rank 1 exited with code 1"), or None."""
        ended = [
            f"rank {self._rank(i)} " + (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
            for i, proc in enumerate(self.procs)
            if (code := proc.poll()) not in (None, 0)
        ]
        return ", ".join(ended) or None

    def end_children(self, grace_s: float) -> None:
        """Waits up to ``grace_s`` seconds for the launched ranks to exit, then kills those left."""
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.kill(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            ended = self.ended_children()
            if ended is None or self.ending:
                if all(proc.poll() is not None for proc in self.procs):
                    return
                continue
            deadline = time.monotonic() + _GRACE_S
            while time.monotonic() < deadline and not self.ending:
                time.sleep(0.2)
            if self.ending:
                continue
            print(f"metaloop: error: rank {self.cluster_environment.global_rank()}: stopped because {ended}",
                  file=sys.stderr, flush=True)
            self.kill(signal.SIGKILL)
            os._exit(1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _default_store() -> Any:
    """Returns the default process group's store with a short timeout (None if there is none)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=_PEER_WAIT_S))
        return store
    except Exception:
        return None


def _publish(store: Any, key: str, value: str) -> None:
    with contextlib.suppress(Exception):
        if store is not None:
            store.set(key, value)


def _read(store: Any, key: str) -> str | None:
    """Returns the value of ``key`` in ``store``, None if it is not set; raises if the store cannot be reached."""
    if store is None:
        raise ConnectionError("no store")
    return store.get(key).decode() if store.check([key]) else None


def _collective_failure(exception: BaseException) -> bool:
    """True for an error of a collective (a peer that closed its connection, a timeout), not of this rank's own work."""
    if isinstance(exception, dist.DistError) or (isinstance(exception, RuntimeError) and "gloo" in str(exception)):
        return True
    frames = traceback.extract_tb(exception.__traceback__)
    return bool(frames) and f"torch{os.sep}distributed{os.sep}" in frames[-1].filename


def _first_line(exception: BaseException) -> str:
    """Returns the message's first line, without the source location gloo puts in front."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exception).strip())
    return text.splitlines()[0].split(". This is typically")[0] if text else type(exception).__name__


def _describe(exception: BaseException) -> str:
    """Returns ``Type: the first line of the message``."""
    return f"{type(exception).__name__}: {_first_line(exception)}"


def _where(exception: BaseException) -> str:
    """Returns `` (at file:line)`` of the innermost frame that raised ("" without a traceback)."""
    frames = traceback.extract_tb(exception.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
