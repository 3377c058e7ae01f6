"""Fixtures shared by every test folder: a local HTTP server that records what it was asked for."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

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
