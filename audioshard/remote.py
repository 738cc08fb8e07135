"""Open a build's files wherever they live: a local folder or an http(s):// URL.

Only these two kinds of source are accepted: a shard list is data from strangers, and
webdataset's `pipe:` URLs would run a shell command, so they are refused here by design.
Remote shards are downloaded whole (into memory, spilling to a temporary file when large, or
into `shards.cache_dir`) and checked against the manifest's size and sha256 *before* a single
sample is parsed: a truncated or tampered download is retried, then reported, never trained on.
HTTP reads have a timeout per connect/read and bounded retries with exponential backoff for
transient failures (connection reset, timeouts, 408/429/5xx); 403/404 fail at once, naming the URL.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
SPOOL_BYTES = 64 << 20  # remote shards larger than this are spooled to a temporary file, not kept in memory


class SourceError(OSError):
    """A file of a build could not be read; the message names the path or URL and the fix."""


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(str(source)).scheme in ("http", "https")


def join(root: str, name: str) -> str:
    """`name` inside `root` (a folder or URL); refuses names that would escape the root."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or ".." in parts or ":" in name:
        raise SourceError(f"refusing file name {name!r} from a manifest: it points outside {root}")
    if is_url(root):
        return root.rstrip("/") + "/" + urllib.parse.quote(name)
    return os.path.join(root, name)


class IntegrityError(SourceError):
    """A shard's bytes do not match the manifest (size or sha256): truncated, corrupt or tampered."""


class _Retry(Exception):
    """A transient failure worth another attempt."""

    def __init__(self, message: str, integrity: bool = False):
        super().__init__(message)
        self.integrity = integrity


@dataclass(frozen=True)
class Fetcher:
    """How to read build files: timeouts, retries, and an optional verified local cache.

    Args:
        timeout: seconds for each connect and each read on HTTP(S).
        retries: further attempts after a transient failure (with backoff 0.5 s, 1 s, 2 s, ...).
        cache_dir: keep verified copies of remote shards here ("" = no cache); safe to share
            between processes (files appear atomically under their sha256).
        verify_local: check the sha256 of local shards too before reading them (remote shards
            are always checked); without it only their size is.
    """

    timeout: float = 30.0
    retries: int = 4
    cache_dir: str = ""
    verify_local: bool = True
    backoff: float = 0.5

    def read(self, location: str) -> bytes:
        """The whole file (used for the manifest)."""
        if not is_url(location):
            _refuse_other_schemes(location)
            try:
                return Path(location).read_bytes()
            except OSError as exn:
                raise SourceError(f"{location}: {exn.strerror}") from exn
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as sink:
            self._download(location, sink, None, None)
            sink.seek(0)
            return sink.read()

    def open_shard(self, location: str, size: int | None = None, sha256: str | None = None) -> BinaryIO:
        """A readable stream of a shard whose size (and, when remote, sha256) match the manifest."""
        if not is_url(location):
            _refuse_other_schemes(location)
            try:
                actual = os.stat(location).st_size
            except OSError as exn:
                raise SourceError(f"{location}: {exn.strerror}") from exn
            if size is not None and actual != size:
                raise IntegrityError(f"{location}: {actual} bytes, the manifest says {size}: the shard is truncated "
                                     "or was changed after the build (`audioshard verify` checks every shard)")
            if not (self.verify_local and sha256):
                return open(location, "rb")  # noqa: SIM115 - the caller owns the stream
            stream = _open_verified(location, actual, sha256)
            if stream is None:
                raise IntegrityError(f"{location}: sha256 does not match the manifest: the shard is corrupt or was "
                                     "changed after the build")
            return stream
        if self.cache_dir and sha256:
            return self._cached(location, size, sha256)
        if size is not None and size <= SPOOL_BYTES:  # the usual shard: one bytes object, parsed in place
            return io.BytesIO(self._download(location, None, size, sha256))
        sink = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - returned to the caller
        self._download(location, sink, size, sha256)
        sink.seek(0)
        return sink

    def _cached(self, location: str, size: int | None, sha256: str) -> BinaryIO:
        cache = Path(self.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"{sha256}.tar"
        if path.exists():
            stream = _open_verified(str(path), path.stat().st_size, sha256)
            if stream is not None:
                return stream
            path.unlink(missing_ok=True)  # corrupt cache entry: fetch again
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".part-", suffix=".tar")
        try:
            with os.fdopen(fd, "w+b") as sink:
                self._download(location, sink, size, sha256)
            os.replace(tmp, path)  # atomic: concurrent readers see no file or a verified one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return open(path, "rb")  # noqa: SIM115 - the caller owns the stream

    def _download(self, location: str, sink: BinaryIO | None, size: int | None, sha256: str | None) -> bytes:
        """Into `sink`, with retries; or, with no sink and a known size, returned as one bytes object."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            if sink is not None:
                sink.seek(0)
                sink.truncate()
            try:
                return self._download_once(location, sink, size, sha256)
            except _Retry as exn:
                if attempt == self.retries:
                    error = IntegrityError if exn.integrity else SourceError
                    raise error(f"{location}: {exn} (gave up after {self.retries + 1} attempts)") from exn
            time.sleep(delay)
            delay *= 2

    def _download_once(self, location: str, sink: BinaryIO | None, size: int | None, sha256: str | None) -> bytes:
        digest = hashlib.sha256()
        received, data = 0, b""
        try:
            with urllib.request.urlopen(location, timeout=self.timeout) as response:  # noqa: S310 - http(s) only
                if sink is None:  # read straight into one object (the socket timeout still bounds each read)
                    data = response.read(size)
                    received = len(data) + len(response.read(1))  # a longer body is as wrong as a shorter one
                    digest.update(data)
                else:
                    buffer = memoryview(bytearray(1 << 20))  # reused for every read: no new object per block
                    while n := response.readinto(buffer):
                        digest.update(buffer[:n])
                        sink.write(buffer[:n])
                        received += n
        except urllib.error.HTTPError as exn:
            if exn.code in TRANSIENT_HTTP:
                raise _Retry(f"HTTP {exn.code} {exn.reason}") from exn
            hint = ": is the URL right, and is the build published there?" if exn.code in (403, 404) else ""
            raise SourceError(f"{location}: HTTP {exn.code} {exn.reason}{hint}") from exn
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exn:
            raise _Retry(f"connection failed ({getattr(exn, 'reason', exn)})") from exn
        if size is not None and received != size:
            raise _Retry(f"received {received} bytes, the manifest says {size} (truncated download)", integrity=True)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise _Retry("sha256 of the download does not match the manifest (corrupt or tampered shard)",
                         integrity=True)
        return data


def _open_verified(path: str, size: int, sha256: str) -> BinaryIO | None:
    """The file as a readable stream if its sha256 matches, else None. Files up to SPOOL_BYTES are
    read once, and that one read serves both the check and the parsing; larger ones are hashed,
    then opened, rather than held in memory."""
    if size > SPOOL_BYTES:
        return open(path, "rb") if sha256_file(path) == sha256 else None  # noqa: SIM115 - the caller owns it
    data = Path(path).read_bytes()
    return io.BytesIO(data) if hashlib.sha256(data).hexdigest() == sha256 else None


def _refuse_other_schemes(location: str) -> None:
    if "://" in location or location.startswith("pipe:"):
        raise SourceError(f"{location}: only local paths and http(s):// URLs are supported "
                          "(pipe: and other schemes are never run from a shard list)")


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(bufsize):
            digest.update(block)
    return digest.hexdigest()


DEFAULT_FETCHER = Fetcher()
