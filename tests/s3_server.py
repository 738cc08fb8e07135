"""A real S3-compatible server on 127.0.0.1 for tests: moto in server mode, in its own process, behind a
small proxy that can inject the failures a real store produces (scripted per object key).

    with S3Server() as s3:
        s3.upload(build_dir, "bucket", "builds/b1")       # what `aws s3 sync` does
        s3.faults["train-000000.tar"] = ["500", "ok"]     # fail once, then serve
        os.environ["AWS_ENDPOINT_URL"] = s3.endpoint      # the proxy; s3.moto_endpoint bypasses it

Faults, consumed one per GET of an object whose key ends with the name: "500" (S3's InternalError XML),
"403" (AccessDenied XML), "truncate" (the real headers, half the body, then the connection closes), "ok".

Other requests (PUT, HEAD, DELETE, POST) pass through to moto unchanged; `s3.requests` counts them by
method and `s3.put_keys` lists the paths PUT, so a test can tell what an upload sent.
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import boto3

ERRORS = {"500": ("InternalError", "We encountered an internal error. Please try again."),
          "403": ("AccessDenied", "Access Denied")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        owner = self.server.owner
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        script = owner.faults.get(name)
        fault = script.pop(0) if script else "ok"
        owner.hits[name] += 1
        if fault in ERRORS:
            return self._error(int(fault), *ERRORS[fault])
        status, headers, body = owner.forward("GET", self.path, dict(self.headers))
        if fault == "truncate":
            body = body[: len(body) // 2]
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in ("transfer-encoding", "connection"):
                self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def do_PUT(self):  # noqa: N802
        self._pass_through()

    def do_HEAD(self):  # noqa: N802
        self._pass_through()

    def do_DELETE(self):  # noqa: N802
        self._pass_through()

    def do_POST(self):  # noqa: N802
        self._pass_through()

    def _pass_through(self) -> None:
        """Forward the request and its body to moto as they are (http.server has answered any Expect:
        100-continue already), and count it."""
        owner = self.server.owner
        owner.requests[self.command] += 1
        if self.command == "PUT":
            owner.put_keys.append(self.path.split("?")[0])
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
        status, reply_headers, reply = owner.forward(self.command, self.path, headers, body)
        self.send_response(status)
        for key, value in reply_headers:
            if key.lower() not in ("transfer-encoding", "connection"):
                self.send_header(key, value)
        if not any(key.lower() == "content-length" for key, _ in reply_headers):
            self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply)

    def _error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>test</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class S3Server:
    """moto_server (a real S3 API over HTTP) on a free port, plus the fault proxy in front of it."""

    def __init__(self):
        self.faults: dict[str, list[str]] = {}
        self.hits: defaultdict[str, int] = defaultdict(int)
        self.requests: Counter = Counter()  # requests other than GET, by method
        self.put_keys: list[str] = []
        self.moto_port = _free_port()
        self.moto_endpoint = f"http://127.0.0.1:{self.moto_port}"

    def __enter__(self) -> S3Server:
        moto = Path(sys.executable).with_name("moto_server")
        self._process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.moto_port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
        self._http.owner = self
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self._http.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._process.terminate()
        self._process.wait(timeout=10)

    def _wait_ready(self, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.moto_port), timeout=0.5):
                    return
            except OSError:
                if self._process.poll() is not None:
                    raise RuntimeError("moto_server exited at start") from None
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def forward(self, method: str, path: str, headers: dict, body: bytes | None = None) -> tuple[int, list, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.moto_port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def client(self):
        return boto3.client("s3", endpoint_url=self.moto_endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def upload(self, folder: str | Path, bucket: str, prefix: str) -> str:
        """Every file under `folder` to s3://bucket/prefix/ (as `aws s3 sync` would); returns that URL."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{bucket}/{prefix}/"

    def environment(self) -> dict[str, str]:
        """The standard variables a user sets for an S3-compatible store, pointing at the proxy."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
