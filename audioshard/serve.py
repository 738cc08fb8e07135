"""Serve a build folder over HTTP, so other machines (or `torchrun` ranks) can train from a URL.

    audioshard serve shards/ --port 8000        # then: audioshard train --shards http://HOST:8000/ ...

A read-only static file server (Python's http.server, threaded). For real deployments any static
web server or object store works the same: audioshard only needs GET on manifest.json and the tars.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, outputfile) -> None:
        # The kernel copies file to socket (sendfile): far less server CPU than Python's read/write
        # loop, which on a small machine competes with the training processes it is feeding.
        # (socket.sendfile falls back to plain sends by itself where sendfile is unavailable.)
        self.connection.sendfile(source)


class _QuietHandler(_Handler):
    def log_message(self, *args) -> None:
        pass


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 0,
                quiet: bool = True) -> http.server.ThreadingHTTPServer:
    handler_cls = _QuietHandler if quiet else _Handler
    server = http.server.ThreadingHTTPServer((host, port), partial(handler_cls, directory=str(root)))
    server.daemon_threads = True
    return server


@contextlib.contextmanager
def serving(root: str | Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `root` in a background thread for the duration of the block; yields its base URL."""
    server = make_server(root, host, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
