"""A real HTTP server on 127.0.0.1 serving a folder, with scripted faults per path (for tests).

    with ShardServer(root) as server:
        server.faults["/train-000000.tar"] = ["500", "ok"]   # fail once, then serve
        url = server.url  # http://127.0.0.1:PORT/

Faults, consumed one per request for that path: "404", "403", "500", "truncate" (send half the
body with a Content-Length that matches it), "reset" (drop the connection mid-body), "stall"
(send headers then hang), "trickle" (the body one byte per `trickle_seconds`), "endless" (a body of
spaces with no Content-Length, until the client hangs up), "redirect:URL" (a 302 to URL), "ok".
A HEAD request consumes a fault of the same script too ("404", "403", "500", "redirect:URL" apply; the
others answer as "ok"), and is counted in `heads`, not `hits`.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    server_ref: ShardServer

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        owner = self.server.owner
        owner.hits[self.path] += 1
        script = owner.faults.get(self.path)
        fault = script.pop(0) if script else "ok"
        if fault in ("404", "403", "500"):
            self.send_error(int(fault))
            return
        if fault.startswith("redirect:"):
            self.send_response(302)
            self.send_header("Location", fault.removeprefix("redirect:"))
            self.end_headers()
            return
        if fault == "endless":
            self._endless()
            return
        path = Path(self.translate_path(self.path))
        if fault == "ok" or not path.is_file():
            return super().do_GET()
        body = path.read_bytes()
        if fault == "truncate":
            body = body[: len(body) // 2]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) if fault == "truncate" else len(body)))
        self.end_headers()
        if fault == "reset":
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if fault == "stall":
            time.sleep(owner.stall_seconds)
            return
        if fault == "trickle":
            self._trickle(body, owner.trickle_seconds)
            return
        self.wfile.write(body)

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        owner = self.server.owner
        owner.heads[self.path] += 1
        script = owner.faults.get(self.path)
        fault = script.pop(0) if script else "ok"
        if fault in ("404", "403", "500"):
            self.send_error(int(fault))
            return
        if fault.startswith("redirect:"):
            self.send_response(302)
            self.send_header("Location", fault.removeprefix("redirect:"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_HEAD()

    def _trickle(self, body: bytes, seconds: float) -> None:
        try:
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(seconds)
        except OSError:  # the client gave up: what the test wants
            pass

    def _endless(self, piece: bytes = b" " * (1 << 16), cap: int = 4 << 30) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")  # no Content-Length: the body ends when the connection does
        self.end_headers()
        try:
            for _ in range(cap // len(piece)):
                self.wfile.write(piece)
        except OSError:
            pass


class ShardServer:
    """Serve `root` over HTTP on 127.0.0.1 in a background thread."""

    def __init__(self, root: Path, stall_seconds: float = 30.0, trickle_seconds: float = 0.2):
        self.root = Path(root)
        self.trickle_seconds = trickle_seconds
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.hits: Counter = Counter()
        self.heads: Counter = Counter()  # HEAD requests by path
        self.stall_seconds = stall_seconds
        handler = partial(_Handler, directory=str(self.root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
