"""Serve a build folder over HTTP, so other machines (or `torchrun` ranks) can train from a URL.

    audioshard serve shards/ --port 8000        # then: audioshard train --shards http://HOST:8000/ ...

A read-only static file server (Python's http.server, threaded). For real deployments any static
web server or object store works the same: audioshard only needs GET on manifest.json, the tars and the
list files beside them (`*.jsonl`).
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from functools import partial
from pathlib import Path

REQUEST_TIMEOUT = 30.0  # seconds a connection may sit idle (or trickle a request) before it is closed
MAX_CONNECTIONS = 64  # connections served at once; more are closed at once rather than given a thread each


class _Handler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD of the build's own files only: no folder listings, no dotfiles (a build's staging
    folder, partial tars), nothing a symlink leads to outside the served folder."""

    timeout = REQUEST_TIMEOUT  # socketserver applies it to every read of the connection

    def send_head(self):
        if not self._servable():
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def _servable(self) -> bool:
        parts = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).split("/")
        if any(part.startswith(".") for part in parts if part):
            return False
        path, root = Path(self.translate_path(self.path)), Path(self.directory).resolve()
        try:
            return path.is_file() and path.resolve().is_relative_to(root)
        except (OSError, ValueError):  # a symlink loop, a name the file system refuses
            return False

    def copyfile(self, source, outputfile) -> None:
        # The kernel copies file to socket (sendfile): far less server CPU than Python's read/write
        # loop, which on a small machine competes with the training processes it is feeding.
        # (socket.sendfile falls back to plain sends by itself where sendfile is unavailable.)
        self.connection.sendfile(source)


class _QuietHandler(_Handler):
    def log_message(self, *args) -> None:
        pass


class _BoundedServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them: idle or slow clients cannot pile up threads."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's 5 makes a burst of clients wait for SYN retries)

    def __init__(self, *args, max_connections: int = MAX_CONNECTIONS, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # the client sees the connection closed and retries later
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 0, quiet: bool = True,
                max_connections: int = MAX_CONNECTIONS,
                timeout: float = REQUEST_TIMEOUT) -> http.server.ThreadingHTTPServer:
    handler_cls = type("Handler", (_QuietHandler if quiet else _Handler,), {"timeout": timeout})
    return _BoundedServer((host, port), partial(handler_cls, directory=str(root)), max_connections=max_connections)


@contextlib.contextmanager
def serving(root: str | Path, host: str = "127.0.0.1", port: int = 0, **limits) -> Iterator[str]:
    """Serve `root` in a background thread for the duration of the block; yields its base URL.
    `limits`: max_connections, timeout (see make_server)."""
    server = make_server(root, host, port, **limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
