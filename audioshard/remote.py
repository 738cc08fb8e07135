"""Open a build's files wherever they live: a local folder, an http(s):// URL or an s3:// prefix.

Only these kinds of source are accepted: a shard list is data from strangers, and webdataset's
`pipe:` URLs would run a shell command, so they are refused here by design. Remote shards are
downloaded whole (into memory, spilling to a temporary file when large, or into
`shards.cache_dir`) and checked against the manifest's size and sha256 *before* a single sample is
parsed: a truncated or tampered download is retried, then reported, never trained on. Remote reads
have a timeout per connect/read, one wall-clock deadline per attempt (connect, headers and body), and
bounded retries with exponential backoff (capped at MAX_BACKOFF_SECONDS) for transient failures
(connection reset, timeouts, 408/429/5xx); 403/404 fail at once, naming the URL. Local files are
opened only when they are regular files, and read no further than their expected size plus one byte.
The s3:// specifics (the client, its errors) live in audioshard/s3.py; everything else is shared.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import io
import json
import os
import re
import socket
import stat
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from audioshard.errors import IntegrityError, SourceError, TransientError  # noqa: F401 - re-exported here
from audioshard.localfile import (
    PIECE_BYTES,
    SPOOL_BYTES,
    VERIFIED,
    in_memory_if_small,
    open_regular,
    taking_turns,
    verified_open,
)

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
MAX_JSON_BYTES = 64 << 20  # a manifest: ~0.25 KB per shard (v2); v1 also held its lists inline
# JSON values a manifest may hold, counted before it is parsed: parsed, a small value ("{}", "0", "[]") takes
# 30-100 bytes for its 2-3 bytes of text, so the text cap alone let 64 MB become 1.5 GB. A version-2 manifest
# holds ~6 values per shard (a 50,000-shard build: 300,000); version 1 also one per recording and ~12 per
# fetched file's provenance.
MAX_JSON_NODES = 2_000_000
DEADLINE_TIMEOUTS = 10  # one attempt (connect, headers, body) may take this many read timeouts in all
MAX_BACKOFF_SECONDS = 30.0  # the longest wait between two attempts (the doubling stops there)


REMOTE_SCHEMES = ("http", "https", "s3")


def is_url(source: str) -> bool:
    """True for a source read over the network (http, https, s3), False for a local path."""
    return urllib.parse.urlparse(str(source)).scheme in REMOTE_SCHEMES


def is_s3(source: str) -> bool:
    return str(source).startswith("s3://")


def join(root: str, name: str) -> str:
    """`name` inside `root` (a folder or URL); refuses names that would escape the root."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or ".." in parts or ":" in name:
        raise SourceError(f"refusing file name {name!r} from a manifest: it points outside {root}")
    if is_s3(root):  # an object key is taken literally: no URL quoting
        return root.rstrip("/") + "/" + name
    if is_url(root):
        return root.rstrip("/") + "/" + urllib.parse.quote(name)
    return os.path.join(root, name)


class _SameServerRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the same scheme and host: a build's files are read from the server
    named, never from wherever a redirect (or a tampered server) points, nor over another protocol."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlparse(req.full_url), urllib.parse.urlparse(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise SourceError(f"{req.full_url}: HTTP {code} redirects to {newurl}, another server or scheme; "
                              "audioshard follows redirects within one server only: use the final URL if you "
                              "trust it")
        return super().redirect_request(req, fp, code, msg, headers, newurl)



@dataclass(frozen=True)
class Fetcher:
    """How to read build files: timeouts, retries, and an optional verified local cache.

    Args:
        timeout: seconds for each connect and each read on HTTP(S); one whole attempt (connect, headers,
            body) may take DEADLINE_TIMEOUTS times this (a server trickling bytes cannot hold a reader forever).
        retries: further attempts after a transient failure (with backoff 0.5 s, 1 s, 2 s, ..., at most
            MAX_BACKOFF_SECONDS between two).
        cache_dir: keep verified copies of remote shards here ("" = no cache); safe to share
            between processes (files appear atomically under their sha256).
        cache_limit: bytes the cache may hold (0 = no limit): after each new shard, the least recently
            used ones are removed until it fits. A shard larger than the limit is a clear error.
        verify_local: check the sha256 of local shards too before reading them (remote shards
            are always checked); without it only their size is.
        remember_verified: with verify_local, record each local shard whose sha256 passed (see
            `VerifiedRecord`) and read it without hashing again while it is unchanged.
    """

    timeout: float = 30.0
    retries: int = 4
    cache_dir: str = ""
    cache_limit: int = 0
    verify_local: bool = True
    remember_verified: bool = True
    backoff: float = 0.5

    def read(self, location: str, parse=None) -> bytes:
        """A whole small file (the manifest), at most MAX_JSON_BYTES. Over HTTP, a body that `parse`
        (raising ValueError) refuses is retried like a truncated download: a server can cut a body
        short with a matching Content-Length. A local file must be a regular file (not a FIFO, nor a
        link to /dev/zero), and at most MAX_JSON_BYTES + 1 bytes of it are read."""
        return self._read_parsed(location, lambda data: (parse(data), data)[1] if parse is not None else data)

    def read_json(self, location: str) -> Any:
        """A JSON file read as `read` reads it, parsed once within MAX_JSON_NODES (`parse_json`; ValueError for
        a local file that is not JSON)."""
        return self._read_parsed(location, parse_json)

    def _read_parsed(self, location: str, parse):
        """`parse(bytes of the file)`: over HTTP inside the retry loop (a body that does not parse is retried)."""
        if is_url(location):
            return self._download(location, None, None, None, parse=parse)
        _refuse_other_schemes(location)
        try:
            with open_regular(location) as stream:
                size = os.fstat(stream.fileno()).st_size
                data = stream.read(MAX_JSON_BYTES + 1) if size <= MAX_JSON_BYTES else b""
        except SourceError:
            raise
        except OSError as exn:
            raise SourceError(f"{location}: {exn.strerror}") from exn
        if size > MAX_JSON_BYTES or len(data) > MAX_JSON_BYTES:  # stat says 0 for /proc files: the read decides
            raise _too_long(location, None, max(size, len(data)))
        return parse(data)

    def open_shard(self, location: str, size: int | None = None, sha256: str | None = None) -> BinaryIO:
        """A readable stream of a shard whose size (and, when remote, sha256) match the manifest."""
        if not is_url(location):
            return self._open_local(location, size, sha256)
        if self.cache_dir and sha256:
            return self._cached(location, size, sha256)
        if size is not None and size <= SPOOL_BYTES:  # the usual shard: held in memory, parsed in place
            return io.BytesIO(self._download(location, None, size, sha256))
        sink = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - returned to the caller
        self._download(location, sink, size, sha256)
        sink.seek(0)
        return sink

    def _open_local(self, location: str, size: int | None, sha256: str | None) -> BinaryIO:
        """A local build file, opened only if it is a regular file (a FIFO or a link to /dev/zero is refused before
        a byte is read), its size (from the open file) as the manifest says, and, with verify_local, its sha256;
        never more than that size plus one byte is read."""
        try:
            stream = open_regular(location)
        except SourceError:
            raise
        except OSError as exn:
            raise SourceError(f"{location}: {exn.strerror}") from exn
        try:
            identity = os.fstat(stream.fileno())  # of the very file read (not of whatever the path names later)
            if size is not None and identity.st_size != size:
                raise IntegrityError(f"{location}: {identity.st_size} bytes, the manifest says {size}: the shard is "
                                     "truncated or was changed after the build (`audioshard verify` checks every "
                                     "shard)")
            if not (self.verify_local and sha256):
                return in_memory_if_small(stream, identity.st_size, location)
            opened = verified_open(stream, location, identity, sha256, VERIFIED if self.remember_verified else None)
        except BaseException:
            stream.close()
            raise
        if opened is None:
            raise IntegrityError(f"{location}: sha256 does not match the manifest: the shard is corrupt or was "
                                 "changed after the build")
        return opened

    def _cached(self, location: str, size: int | None, sha256: str) -> BinaryIO:
        """The shard from `cache_dir`, or downloaded into it. The cache touches only its own entries: regular
        files named `<sha256>.tar` (opened without following links; a link, FIFO or device found under such a
        name is never read, and a fresh download replaces the name), and its own `.part-*.tar` files."""
        cache = Path(self.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"{sha256}.tar"
        try:
            stream = open_regular(path, follow=False)
        except (FileNotFoundError, IntegrityError):  # not cached (or evicted a moment ago), or not a file we wrote
            stream = None
        if stream is not None:
            try:
                opened = verified_open(stream, str(path), os.fstat(stream.fileno()), sha256, None)
            except BaseException:
                stream.close()
                raise
            if opened is not None:
                with contextlib.suppress(OSError):  # evicted meanwhile by another process: the stream still reads
                    os.utime(path, follow_symlinks=False)  # "recently used": eviction goes oldest first
                return opened
            path.unlink(missing_ok=True)  # corrupt cache entry: fetch again
        if self.cache_limit and size is not None and size > self.cache_limit:
            raise SourceError(f"{location}: {size:,} bytes do not fit in shards.cache_limit ({self.cache_limit:,} "
                              "bytes); raise the limit to a few shards at least, or set shards.cache_dir = \"\"")
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".part-", suffix=".tar")
        sink = os.fdopen(fd, "w+b")
        try:
            self._download(location, sink, size, sha256)
            sink.flush()
            with taking_turns(cache):  # processes sharing the cache add and evict one at a time
                os.replace(tmp, path)  # atomic: concurrent readers see no file or a verified one
                if self.cache_limit:
                    _evict(cache, self.cache_limit, keep=path)
        except BaseException:
            sink.close()
            Path(tmp).unlink(missing_ok=True)
            raise
        received = sink.tell()
        sink.seek(0)  # the file just verified, read from the same open file (whatever the name holds by now)
        return in_memory_if_small(sink, received, str(path))

    def _download(self, location: str, sink: BinaryIO | None, size: int | None, sha256: str | None,
                  parse=None) -> bytes:
        """Into `sink`, with retries; or, with no sink, returned as bytes, or as `parse(bytes)` with `parse`
        (raising ValueError for a body that is not whole: checks a body whose size the caller cannot know)."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            if sink is not None:
                sink.seek(0)
                sink.truncate()
            try:
                data = self._download_once(location, sink, size, sha256)
                return data if parse is None else _parsed(parse, data)
            except TransientError as exn:
                if attempt == self.retries:
                    error = IntegrityError if exn.integrity else SourceError
                    raise error(f"{location}: {exn} (gave up after {self.retries + 1} attempts)") from exn
            time.sleep(min(delay, MAX_BACKOFF_SECONDS))
            delay = min(2 * delay, MAX_BACKOFF_SECONDS)

    def _download_once(self, location: str, sink: BinaryIO | None, size: int | None, sha256: str | None) -> bytes:
        limit = MAX_JSON_BYTES if size is None else size
        # One wall-clock deadline for the whole attempt: connect, headers and body (see _Deadline).
        with _Deadline(DEADLINE_TIMEOUTS * self.timeout) as deadline, \
                self._open_body(location, deadline) as (declared, read):
            if declared > limit:  # refused before reading a byte
                raise _too_long(location, size, declared)
            received, data, digest = self._receive(read, sink, limit, deadline)
        if received > limit:
            raise _too_long(location, size, received)
        if size is not None and received != size:
            raise TransientError(f"received {received} bytes, the manifest says {size} (truncated download)",
                                 integrity=True)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise TransientError("sha256 of the download does not match the manifest (corrupt or tampered shard)",
                                 integrity=True)
        return data

    def _open_body(self, location: str, deadline: _Deadline):
        """A context manager giving (declared length or 0, read(n) -> bytes) for the body at `location`; it
        turns the client's errors, also those raised while the body is read, into TransientError or SourceError.
        Over HTTP(S) `deadline` cuts the connection when it passes; S3 checks it between pieces of the body."""
        scheme = urllib.parse.urlparse(location).scheme
        return BODY_OPENERS[scheme](location, self.timeout, deadline)

    def _receive(self, read, sink: BinaryIO | None, limit: int, deadline: _Deadline) -> tuple[int, bytes, Any]:
        """(bytes received, the body when there is no sink, its sha256): read piece by piece, at most
        `limit` + one piece, and before `deadline`."""
        digest, pieces, received = hashlib.sha256(), [], 0
        while piece := read(PIECE_BYTES):  # each read waits at most `timeout` (the socket's)
            digest.update(piece)
            received += len(piece)
            if sink is None:
                pieces.append(piece)
            else:
                sink.write(piece)
            if received > limit:
                break
            if deadline.passed():
                raise deadline.error()
        if deadline.expired:  # the body (or the headers: http.client takes the cut for their end) was cut short
            raise deadline.error()
        return received, b"".join(pieces), digest


class _Deadline:
    """One wall-clock limit for a whole HTTP(S) attempt: connect, TLS, headers and body.

    The socket timeout bounds each read only, so a server sending its headers (or body) a byte at a time
    within it would hold a reader for ever. Each connection of the attempt registers a duplicate of its
    socket here; when the time is up a timer thread shuts the socket down, which ends any read waiting on
    it (shutdown acts on the socket, not the descriptor; holding our own duplicate means the descriptor
    cannot be closed and reused by something else before the timer fires)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(min(seconds, threading.TIMEOUT_MAX), self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            sock.close()

    def hold(self, sock: socket.socket) -> socket.socket:
        """Watch `sock` (returned as it is): shut down when the deadline passes."""
        copy = sock.dup()
        with self._lock:
            self._held.append(copy)
            if self.expired:
                _shut(copy)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._held:
                _shut(sock)

    def passed(self) -> bool:
        return self.expired or time.monotonic() > self.end

    def error(self) -> TransientError:
        return TransientError(f"the download took over {self.seconds:g} s (a stalled or trickling server; "
                              f"{DEADLINE_TIMEOUTS} x shards.http_timeout is allowed per file, headers included)")


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer
        sock.shutdown(socket.SHUT_RDWR)


class _Watched:
    """An HTTP(S) connection whose socket `deadline` holds from the moment it is connected (before TLS)."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        create = self._create_connection
        self._create_connection = lambda *a, **k: deadline.hold(create(*a, **k))


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


_WATCHED = {http.client.HTTPConnection: _WatchedHTTP, http.client.HTTPSConnection: _WatchedHTTPS}


class _DeadlineHandler:
    """urllib's HTTP(S) handler, making watched connections (one opener per attempt: the deadline is its own)."""

    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(functools.partial(_WATCHED[http_class], deadline=self.deadline), req, **kwargs)


class _DeadlineHTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    pass


class _DeadlineHTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
    pass


@contextlib.contextmanager
def _http_body(location: str, timeout: float, deadline: _Deadline):
    opener = urllib.request.build_opener(_SameServerRedirects, _DeadlineHTTPHandler(deadline),
                                         _DeadlineHTTPSHandler(deadline))
    try:
        with opener.open(location, timeout=timeout) as response:  # noqa: S310 - http(s) only
            yield _declared_length(response), response.read1
    except TransientError:
        raise
    except urllib.error.HTTPError as exn:
        if exn.code in TRANSIENT_HTTP:
            raise TransientError(f"HTTP {exn.code} {exn.reason}") from exn
        hint = ": is the URL right, and is the build published there?" if exn.code in (403, 404) else ""
        raise SourceError(f"{location}: HTTP {exn.code} {exn.reason}{hint}") from exn
    except SourceError:  # a SourceError is an OSError: let it through as it is
        raise
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exn:
        if deadline.passed():  # the deadline cut the connection: say so, not "connection reset"
            raise deadline.error() from exn
        raise TransientError(f"connection failed ({getattr(exn, 'reason', exn)})") from exn


class _SameServerHeadRedirects(_SameServerRedirects):
    """remote.py's redirect rule (one server only), keeping HEAD a HEAD: urllib turns it into a GET, which
    would start sending the whole file."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.method = req.get_method()
        return new


def http_head(url: str, timeout: float) -> tuple[int, str]:
    """(size, ETag) of a file at an http(s) URL, by HEAD under the rules of every read here: redirects within
    one server only, one deadline for the whole attempt (one attempt: the caller retries TransientError)."""
    request = urllib.request.Request(url, method="HEAD")
    with _Deadline(DEADLINE_TIMEOUTS * timeout) as deadline:
        opener = urllib.request.build_opener(_SameServerHeadRedirects, _DeadlineHTTPHandler(deadline),
                                             _DeadlineHTTPSHandler(deadline))
        try:
            with opener.open(request, timeout=timeout) as response:  # noqa: S310 - http(s) only
                length, etag = response.headers.get("Content-Length"), response.headers.get("ETag", "")
        except urllib.error.HTTPError as exn:
            if exn.code in TRANSIENT_HTTP:
                raise TransientError(f"HTTP {exn.code} {exn.reason}") from exn
            raise SourceError(f"{url}: HTTP {exn.code} {exn.reason}; is the URL right and the file public?") from exn
        except SourceError:  # a redirect to another server, refused
            raise
        except OSError as exn:  # URLError, timeouts, resets (http.client's errors are OSErrors or below)
            raise TransientError(f"connection failed ({getattr(exn, 'reason', exn)})") from exn
    if not (length or "").isdigit():
        raise SourceError(f"{url}: the server does not say the file's size (no Content-Length on HEAD); "
                          "audioshard reads input URLs of known size only: serve it with a Content-Length")
    return int(length), etag.strip('"')


def _too_long(location: str, size: int | None, received: int) -> Exception:
    """A body longer than the manifest says (retried: the next download may be right), or a manifest over
    MAX_JSON_BYTES (refused: nothing that large is an audioshard manifest)."""
    if size is not None:
        return TransientError(f"{received} bytes or more, the manifest says {size}", integrity=True)
    return SourceError(f"{location}: over {MAX_JSON_BYTES >> 20} MB; not an audioshard manifest")


def _declared_length(response) -> int:
    try:
        return int(response.headers.get("Content-Length") or 0)
    except ValueError:  # garbage: http.client reads such a body to the connection's end, bounded by `limit`
        return 0


def _parsed(parse, data: bytes):
    try:
        return parse(data)
    except (ValueError, RecursionError) as exn:  # RecursionError: JSON nested thousands deep
        raise TransientError(f"the body does not parse ({exn}): truncated by the server or on the way?") from exn


def parse_json(data: bytes) -> Any:
    """JSON of a build file, refused (SourceError) before parsing when it holds over MAX_JSON_NODES values, so
    that what parsing allocates is bounded, not only the text. The count is an upper bound read at C speed:
    every value but the first of a container follows a comma, and the first follows its '[' or '{' (commas
    inside strings count too, which only errs on the safe side)."""
    nodes = data.count(b",") + data.count(b"[") + data.count(b"{") + 1
    if nodes > MAX_JSON_NODES:
        raise SourceError(f"holds up to {nodes:,} JSON values, over the {MAX_JSON_NODES:,} an audioshard manifest "
                          "may hold (parsed, they would take far more memory than the text); not an audioshard "
                          "manifest")
    return json.loads(data)



def _refuse_other_schemes(location: str) -> None:
    if "://" in location or location.startswith("pipe:"):
        raise SourceError(f"{location}: only local paths, http(s):// and s3:// URLs are supported "
                          "(pipe: and other schemes are never run from a shard list)")


DEFAULT_FETCHER = Fetcher()


CACHE_ENTRY = re.compile(r"[0-9a-f]{64}\.tar")  # what the cache writes: <sha256>.tar, and .part-XXXXXXXX.tar meanwhile
CACHE_PART = re.compile(r"\.part-[A-Za-z0-9_]{8}\.tar")
STALE_PART_SECONDS = 24 * 3600  # a .part file unchanged this long was left by a process killed mid-download


def _evict(cache: Path, limit: int, keep: Path) -> None:
    """Remove the least recently used shards (oldest modification time) until the cache holds at most
    `limit` bytes; never `keep`. Only the cache's own entries count and are removed: regular files named
    like CACHE_ENTRY (never a user's file, a link or a FIFO in the same folder), and .part files left by a
    killed process. A process still reading an evicted file keeps reading it (POSIX)."""
    entries, now = [], time.time()
    with os.scandir(cache) as found:
        for entry in found:
            with contextlib.suppress(FileNotFoundError):
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode):
                    continue
                if CACHE_ENTRY.fullmatch(entry.name):
                    entries.append((info.st_mtime_ns, entry.name, info.st_size, cache / entry.name))
                elif CACHE_PART.fullmatch(entry.name) and now - info.st_mtime > STALE_PART_SECONDS:
                    os.unlink(cache / entry.name)
    total = sum(e[2] for e in entries)
    for _, _, size, path in sorted(entries):
        if total <= limit:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size


def _s3_body(location: str, timeout: float, deadline: _Deadline):
    """S3 checks the deadline between pieces of the body (botocore keeps the socket)."""
    from audioshard import s3  # boto3 is an optional extra, imported only when s3:// is used

    return s3.object_body(location, timeout)


# How the body of a remote build file is opened, by URL scheme: a new store is one function and one row
# (and its scheme in REMOTE_SCHEMES). Each gives a context manager of (declared length or 0, read(n)).
BODY_OPENERS = {"http": _http_body, "https": _http_body, "s3": _s3_body}
