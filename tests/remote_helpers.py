"""A loopback HTTP server for remote-shard tests: serves a folder (with an index page for
folders), honours `Range: bytes=N-`, counts requests per path, and can drop a connection once
in the middle of a file."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class ShardServer(ThreadingHTTPServer):
    """`with ShardServer(folder) as server: server.url ...`; `server.requests[path]` counts the
    GETs of each file; a path put in `server.drop_once` gets half its bytes, once, then a closed
    connection."""

    daemon_threads = True

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.requests: Counter = Counter()
        self.drop_once: set[str] = set()
        self.dropped: list[str] = []
        self.ranges: list[tuple[str, int]] = []  # (path, first byte) of each ranged GET
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "ShardServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            return super().do_GET() if body else super().do_HEAD()
        name = unquote(urlparse(self.path).path)
        if body:
            self.server.requests[name] += 1
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = Path(path).read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match[1]) if match else 0
        if start:
            self.server.ranges.append((name, start))
        self.send_response(206 if match else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        if match:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if name in self.server.drop_once:
            self.server.drop_once.discard(name)
            self.server.dropped.append(name)
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
            return
        self.wfile.write(data[start:])


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
