"""Fixtures shared by every test folder: a local HTTP server that records what it was asked for, and a full disk."""

from __future__ import annotations

import builtins
import errno
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest


class Server(NamedTuple):
    """A folder served on 127.0.0.1: ``url`` + "/NAME" is ``root/NAME``; ``requested`` lists the paths asked for."""

    root: Path
    url: str
    requested: list[str]


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[Server]:
    """Serves ``tmp_path/www`` on 127.0.0.1 while the test runs; ``/stream/NAME`` sends ``NAME`` without a Content-Length."""
    root = tmp_path / "www"
    root.mkdir()
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            streamed = self.path.startswith("/stream/")
            path = root / self.path.removeprefix("/stream/").lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            if not streamed:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield Server(root, f"http://127.0.0.1:{server.server_address[1]}", requested)
    finally:
        server.shutdown()
        server.server_close()


class _FullDisk:
    """A file opened for writing on a full disk: a write stores half its bytes, then fails with ENOSPC."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def write(self, data: Any) -> int:
        raw = bytes(data)
        self.file.write(raw[: len(raw) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


@pytest.fixture
def disk_full_while_checkpointing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes every binary file written while ``SafeCheckpointIO.save_checkpoint`` runs fail half-way with ENOSPC.

    Whatever file the save writes (Lightning's temporary file in $TMPDIR, or one beside the checkpoint), the
    disk fills up during it, as on a cluster's shared disk.
    """
    from metaloop.lightning.checkpoint import SafeCheckpointIO

    real_open, saving = builtins.open, []

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = real_open(file, mode, *args, **kwargs)
        return _FullDisk(opened) if saving and "w" in mode and "b" in mode else opened

    save = SafeCheckpointIO.save_checkpoint

    def saving_on_a_full_disk(self: SafeCheckpointIO, *args: Any, **kwargs: Any) -> None:
        saving.append(True)
        try:
            save(self, *args, **kwargs)
        finally:
            saving.pop()

    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(SafeCheckpointIO, "save_checkpoint", saving_on_a_full_disk)
