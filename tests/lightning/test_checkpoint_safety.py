"""metaloop.lightning.checkpoint (issue 19): code in a pickle is named, downloads are bounded and deleted, saves are atomic."""

from __future__ import annotations

import builtins
import functools
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

from learner_options import with_inner
from metaloop.lightning import MLP, MetaLightningModule, Regression
from metaloop.lightning.checkpoint import (
    MAX_DOWNLOAD_ENV, CheckpointError, CheckpointSaveError, SafeCheckpointIO, load_checkpoint, max_download_bytes,
)

REPO = Path(__file__).resolve().parents[2]


class _Call:
    """Pickles as a call of ``function(*args)``: what a malicious checkpoint holds."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


@pytest.fixture
def tmpdir_here(tmp_path, monkeypatch) -> Path:
    """Points $TMPDIR (and tempfile's cached choice of it) at an empty ``tmp_path/tmpdir``."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# -- a pickle that calls builtins.exec is code, not a damaged file ---------------------------------------
@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (_Call(exec, "import os"), "builtins.exec"),
        (_Call(eval, "1"), "builtins.eval"),
        (_Call(getattr, 1, "real"), "builtins.getattr"),
        (_Call(__import__, "os"), "builtins.__import__"),
        (_Call(builtins.open, "/dev/null"), "io.open"),
        (_Call(os.system, "true"), "posix.system"),
        (_Call(torch.hub.load_state_dict_from_url, "http://127.0.0.1:9/x.pt"), "torch.hub.load_state_dict_from_url"),
        (_Call(np.load, "x.npy"), "numpy.load"),
        # two globals of one module: protocol 4 names the module once and reuses it through the memo
        ([_Call(eval, "1"), _Call(exec, "1")], "builtins.eval, builtins.exec"),
    ],
)
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("zipped", [False, True])
def test_a_pickle_that_calls_a_builtin_or_any_function_is_named_as_code(payload, named, protocol, zipped, tmp_path):
    path = tmp_path / "evil.ckpt"
    if zipped:
        torch.save({"state_dict": {}, "payload": payload}, path, pickle_protocol=protocol)
    else:
        path.write_bytes(pickle.dumps({"payload": payload}, protocol=protocol))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert f"holds pickled code or objects ({named})" in message and "truncated" not in message


def test_tensors_containers_and_numbers_are_data(tmp_path):
    state = {"w": torch.ones(2, dtype=torch.bfloat16), "p": torch.nn.Parameter(torch.zeros(1)), "s": {1, 2}, "c": 1j,
             "b": bytearray(b"x"), "t": (1, 2.0, "x", None, True), "size": torch.Size([2])}
    torch.save({"state_dict": state}, tmp_path / "ok.ckpt")
    loaded = load_checkpoint(tmp_path / "ok.ckpt")["state_dict"]
    assert loaded["s"] == {1, 2} and loaded["w"].dtype == torch.bfloat16 and loaded["size"] == torch.Size([2])


# -- downloads: bounded, and deleted after loading ------------------------------------------------------
def test_a_downloaded_checkpoint_is_loaded_and_deleted(http_folder, tmpdir_here):
    torch.save({"state_dict": {"w": torch.ones(3)}}, http_folder.root / "ok.ckpt")
    assert torch.equal(load_checkpoint(f"{http_folder.url}/ok.ckpt")["state_dict"]["w"], torch.ones(3))
    assert list(tmpdir_here.iterdir()) == []


@pytest.mark.parametrize("route", ["", "/stream"])  # with a Content-Length header, then without one
def test_a_checkpoint_over_the_download_limit_is_refused_in_one_line(route, http_folder, tmpdir_here, monkeypatch):
    torch.save({"state_dict": {"w": torch.ones(10_000)}}, http_folder.root / "big.ckpt")
    size = (http_folder.root / "big.ckpt").stat().st_size
    monkeypatch.setenv(MAX_DOWNLOAD_ENV, "4096")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(f"{http_folder.url}{route}/big.ckpt")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"the checkpoint {http_folder.url}{route}/big.ckpt is larger than the download limit of 4096 bytes ({MAX_DOWNLOAD_ENV})")
    assert (f"(it declares {size} bytes)" in message) == (route == "")
    assert list(tmpdir_here.iterdir()) == []
    monkeypatch.setenv(MAX_DOWNLOAD_ENV, str(size))
    assert load_checkpoint(f"{http_folder.url}{route}/big.ckpt")["state_dict"]["w"].shape == (10_000,)


def test_lightnings_loader_given_a_url_is_bounded_too_and_keeps_no_copy(http_folder, tmpdir_here, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # where torch.hub would keep its copy
    arguments = {"model": MLP([1, 8, 1]), "objective": Regression(), "inner_optim": functools.partial(torch.optim.SGD, lr=0.1),
                 "outer_optim": functools.partial(torch.optim.Adam, lr=0.01)}
    trained = MetaLightningModule(**with_inner(arguments))
    torch.save({"state_dict": trained.state_dict(), "pytorch-lightning_version": lightning.__version__}, http_folder.root / "m.ckpt")
    monkeypatch.setenv(MAX_DOWNLOAD_ENV, "100")
    with pytest.raises(CheckpointError, match="is larger than the download limit of 100 bytes"):
        MetaLightningModule.load_from_checkpoint(f"{http_folder.url}/m.ckpt", **with_inner(arguments))
    monkeypatch.delenv(MAX_DOWNLOAD_ENV)
    loaded = MetaLightningModule.load_from_checkpoint(f"{http_folder.url}/m.ckpt", **with_inner(arguments))
    assert torch.equal(loaded.model.head.weight, trained.model.head.weight)
    assert list(tmpdir_here.iterdir()) == [] and not (tmp_path / "torch_home").exists()


def test_the_download_limit_is_2_gib_unless_set_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.delenv(MAX_DOWNLOAD_ENV, raising=False)
    assert max_download_bytes() == 2 * 1024**3
    for bad in ("2G", "-1", "0"):
        monkeypatch.setenv(MAX_DOWNLOAD_ENV, bad)
        with pytest.raises(CheckpointError, match=rf"{MAX_DOWNLOAD_ENV}='{bad}' is not a positive number of bytes"):
            max_download_bytes()


# -- saving: atomic, beside the checkpoint, one line on a full disk ---------------------------------------
def _previous(folder: Path) -> tuple[Path, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(10_000)}, "global_step": 2}, folder / "last.ckpt")
    return folder / "last.ckpt", (folder / "last.ckpt").read_bytes()


def _assert_failed_cleanly(refused: CheckpointSaveError, folder: Path, last: Path, before: bytes, tmpdir: Path) -> None:
    assert last.read_bytes() == before and load_checkpoint(last)["global_step"] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"] and list(tmpdir.iterdir()) == []
    message = str(refused)
    assert "\n" not in message
    assert message.startswith(f"could not save the checkpoint last.ckpt in {folder}: No space left on device; ")
    assert "intact" in message


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(disk_full_while_checkpointing, tmp_path, tmpdir_here):
    folder = tmp_path / "run" / "checkpoints"
    last, before = _previous(folder)
    with pytest.raises(CheckpointSaveError) as refused:
        SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(10_000)}, "global_step": 4}, last)
    _assert_failed_cleanly(refused.value, folder, last, before, tmpdir_here)


@pytest.fixture
def small_tmpfs(tmp_path) -> Path:
    """A 128 KiB tmpfs mounted at ``tmp_path/disk`` for the test (needs root: skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_real_full_disk_keeps_the_previous_checkpoint(small_tmpfs, tmpdir_here):
    # Lightning's save copies its $TMPDIR file over last.ckpt across filesystems: on a full disk, a truncated last.ckpt
    last, before = _previous(small_tmpfs)
    with pytest.raises(CheckpointSaveError) as refused:
        SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(50_000)}, "global_step": 4}, last)
    _assert_failed_cleanly(refused.value, small_tmpfs, last, before, tmpdir_here)
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(5_000)}, "global_step": 4}, last)
    assert load_checkpoint(last)["global_step"] == 4


KILLED_WHILE_SAVING = textwrap.dedent(
    """
    import builtins, os, signal, sys
    import torch
    from metaloop.lightning.checkpoint import SafeCheckpointIO

    real_open = builtins.open

    class Killed:
        def __init__(self, file):
            self.file = file
        def write(self, data):
            raw = bytes(data)
            self.file.write(raw[: len(raw) // 2])
            self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        def __getattr__(self, name):
            return getattr(self.file, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.file.close()

    def killing_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        return Killed(opened) if "w" in mode and "b" in mode else opened

    builtins.open = killing_open
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(10_000)}, "global_step": 4}, sys.argv[1])
    """
)


def test_a_save_killed_half_way_leaves_nothing_in_tmpdir_and_its_leftover_goes_with_the_next_save(tmp_path, tmpdir_here):
    folder = tmp_path / "run" / "checkpoints"
    last, before = _previous(folder)
    env = {**os.environ, "TMPDIR": str(tmpdir_here), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(last)], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert list(tmpdir_here.iterdir()) == []  # Lightning's save left its temporary file (the whole checkpoint) here
    assert last.read_bytes() == before
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(10)}, "global_step": 6}, folder / "epoch=0-step=6.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=6.ckpt", "last.ckpt"]


def test_a_saved_checkpoint_has_the_permissions_of_any_new_file(tmp_path):
    SafeCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "new" / "last.ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new" / "last.ckpt").stat().st_mode) == 0o666 & ~umask
