"""Serve a build folder over HTTP, so other machines (or `torchrun` ranks) can train from a URL.

    audioshard serve shards/ --port 8000        # then: audioshard train --shards http://HOST:8000/ ...

A read-only static file server (Python's http.server, threaded) of the files the build's manifest
names: manifest.json, its shards and its list files (`*.jsonl`); nothing else in the folder. Each
connection has one wall-clock deadline (the request within `timeout` seconds, the reply within
`timeout` plus its size at MIN_RATE bytes a second), so clients sending or reading slowly cannot hold
the server's connection slots for longer. For real deployments any static web server or object
store works the same: audioshard only needs GET on those files.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from functools import partial
from pathlib import Path

REQUEST_TIMEOUT = 30.0  # seconds a connection may take to send its request (in all) before it is closed
MAX_CONNECTIONS = 64  # connections served at once; more are closed at once rather than given a thread each
MIN_RATE = 100_000  # bytes a second a reply may be read at, at the slowest (8 MB shard: timeout + 80 s)


class _Served:
    """The paths the build's manifest names (manifest.json, shards, list files), read again whenever
    manifest.json changes (a rebuild in place while serving)."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()
        self.stamp: tuple | None = None
        self.paths: frozenset[str] = frozenset()

    def __contains__(self, path: str) -> bool:
        from audioshard.manifest import MANIFEST_NAME

        if path == MANIFEST_NAME:
            return True
        try:
            stat = os.stat(self.root / MANIFEST_NAME)
            stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError:
            return False
        with self.lock:
            if stamp != self.stamp:
                self.paths, self.stamp = self._named(), stamp
            return path in self.paths

    def _named(self) -> frozenset[str]:
        from audioshard.manifest import load_manifest

        try:
            manifest = load_manifest(self.root)
            files = [shard.file for split in manifest.split_names for shard in manifest.shards(split)]
            files += [manifest.split(split).recordings_file.file for split in manifest.split_names
                      if manifest.split(split).recordings_file is not None]
            if isinstance(manifest.data.get("skipped_file"), dict):
                files.append(manifest.data["skipped_file"]["file"])
        except Exception:  # noqa: BLE001 - an unreadable manifest: only manifest.json, whose reader says why
            return frozenset()
        return frozenset(files)


class _Deadlines:
    """One watchdog thread per server: shuts down each connection at its deadline, whatever the connection's
    own thread is blocked in (its read or send then returns at once). One thread, not a timer per connection."""

    def __init__(self):
        self.due: dict[socket.socket, float] = {}
        self.changed = threading.Condition()
        self.running = True
        self.thread = threading.Thread(target=self._run, name="serve-deadlines", daemon=True)
        self.thread.start()

    def set(self, connection: socket.socket, seconds: float) -> None:
        with self.changed:
            self.due[connection] = time.monotonic() + seconds
            self.changed.notify()

    def drop(self, connection: socket.socket) -> None:
        with self.changed:
            self.due.pop(connection, None)

    def stop(self) -> None:
        with self.changed:
            self.running = False
            self.changed.notify()

    def _run(self) -> None:
        with self.changed:
            while self.running:
                now = time.monotonic()
                for connection in [c for c, due in self.due.items() if due <= now]:
                    del self.due[connection]
                    with contextlib.suppress(OSError):
                        connection.shutdown(socket.SHUT_RDWR)
                self.changed.wait(min(self.due.values(), default=now + 60.0) - now)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD of the files the build's manifest names only: no folder listings, no dotfiles (a
    build's staging folder, partial tars), nothing a symlink leads to outside the served folder."""

    timeout = REQUEST_TIMEOUT  # socketserver applies it to every read of the connection; the deadline to all
    served: _Served  # set by make_server

    def setup(self) -> None:
        super().setup()
        # a slow client trickling its request, or reading the reply a byte at a time, gets no more than this in all
        self.server.deadlines.set(self.connection, self.timeout)

    def finish(self) -> None:
        self.server.deadlines.drop(self.connection)
        with contextlib.suppress(OSError):  # a connection the deadline closed
            super().finish()

    def send_head(self):
        if not self._servable():
            self.send_error(404, "File not found")
            return None
        source = super().send_head()
        if source is not None:
            self.server.deadlines.set(self.connection, self.timeout + os.fstat(source.fileno()).st_size / MIN_RATE)
        return source

    def _servable(self) -> bool:
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        if any(part.startswith(".") for part in name.split("/")) or name not in self.served:
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
        self.deadlines = _Deadlines()

    def server_close(self) -> None:
        self.deadlines.stop()
        super().server_close()

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

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # a client gone or cut off at its deadline: no traceback
            super().handle_error(request, client_address)


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 0, quiet: bool = True,
                max_connections: int = MAX_CONNECTIONS,
                timeout: float = REQUEST_TIMEOUT) -> http.server.ThreadingHTTPServer:
    handler_cls = type("Handler", (_QuietHandler if quiet else _Handler,),
                       {"timeout": timeout, "served": _Served(Path(root))})
    return _BoundedServer((host, port), partial(handler_cls, directory=str(root)), max_connections=max_connections)


@contextlib.contextmanager
def serving(root: str | Path, host: str = "127.0.0.1", port: int = 0, **limits) -> Iterator[str]:
    """Serve `root` in a background thread for the duration of the block; yields its base URL.
    `limits`: max_connections, timeout (the seconds a request may take, in all; a reply gets its size at
    MIN_RATE more)."""
    server = make_server(root, host, port, **limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
