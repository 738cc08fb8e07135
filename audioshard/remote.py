"""Open a build's files wherever they live: a local folder, an http(s):// URL or an s3:// prefix.

Only these kinds of source are accepted: a shard list is data from strangers, and webdataset's
`pipe:` URLs would run a shell command, so they are refused here by design. Remote shards are
downloaded whole (into memory, spilling to a temporary file when large, or into
`shards.cache_dir`) and checked against the manifest's size and sha256 *before* a single sample is
parsed: a truncated or tampered download is retried, then reported, never trained on. Remote reads
have a timeout per connect/read and bounded retries with exponential backoff for transient
failures (connection reset, timeouts, 408/429/5xx); 403/404 fail at once, naming the URL. The
s3:// specifics (the client, its errors) live in audioshard/s3.py; everything else is shared.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import io
import json
import os
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from audioshard.errors import AudioshardError

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
SPOOL_BYTES = 64 << 20  # remote shards larger than this are spooled to a temporary file, not kept in memory
MAX_JSON_BYTES = 64 << 20  # a manifest: ~1 KB per shard and per skipped file; 64 MB is a build of ~50,000 shards
DEADLINE_TIMEOUTS = 10  # one download may take this many read timeouts in all (a trickling server)
PIECE_BYTES = 1 << 20  # bytes per read of an HTTP body


class SourceError(AudioshardError, OSError):
    """A file of a build could not be read; the message names the path or URL and the fix."""


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


class IntegrityError(SourceError):
    """A shard's bytes do not match the manifest (size or sha256): truncated, corrupt or tampered."""


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


_OPENER = urllib.request.build_opener(_SameServerRedirects)


class TransientError(Exception):
    """A transient failure worth another attempt (raised by the HTTP and S3 readers, caught by the retry loop)."""

    def __init__(self, message: str, integrity: bool = False):
        super().__init__(message)
        self.integrity = integrity


@dataclass(frozen=True)
class Fetcher:
    """How to read build files: timeouts, retries, and an optional verified local cache.

    Args:
        timeout: seconds for each connect and each read on HTTP(S); one whole download may take
            DEADLINE_TIMEOUTS times this (a server trickling bytes cannot hold a reader forever).
        retries: further attempts after a transient failure (with backoff 0.5 s, 1 s, 2 s, ...).
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
        short with a matching Content-Length."""
        if is_url(location):
            return self._download(location, None, None, None, parse=parse)
        _refuse_other_schemes(location)
        try:
            size = os.stat(location).st_size
            data = Path(location).read_bytes() if size <= MAX_JSON_BYTES else None
        except OSError as exn:
            raise SourceError(f"{location}: {exn.strerror}") from exn
        if data is None:
            raise _too_long(location, None, size)
        return data

    def read_json(self, location: str) -> Any:
        """A JSON file read as `read` reads it, parsed (ValueError for a local file that is not JSON)."""
        return json.loads(self.read(location, parse=json.loads))

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
                return _open_local(location, actual)
            stream = _open_verified(location, sha256, VERIFIED if self.remember_verified else None)
            if stream is None:
                raise IntegrityError(f"{location}: sha256 does not match the manifest: the shard is corrupt or was "
                                     "changed after the build")
            return stream
        if self.cache_dir and sha256:
            return self._cached(location, size, sha256)
        if size is not None and size <= SPOOL_BYTES:  # the usual shard: held in memory, parsed in place
            return io.BytesIO(self._download(location, None, size, sha256))
        sink = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - returned to the caller
        self._download(location, sink, size, sha256)
        sink.seek(0)
        return sink

    def _cached(self, location: str, size: int | None, sha256: str) -> BinaryIO:
        cache = Path(self.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"{sha256}.tar"
        try:
            stream = _open_verified(str(path), sha256)
        except FileNotFoundError:  # not cached, or evicted by another process a moment ago
            stream = None
        else:
            if stream is not None:
                with contextlib.suppress(OSError):  # evicted meanwhile by another process: the stream still reads
                    os.utime(path)  # "recently used": eviction goes by modification time, oldest first
                return stream
            path.unlink(missing_ok=True)  # corrupt cache entry: fetch again
        if self.cache_limit and size is not None and size > self.cache_limit:
            raise SourceError(f"{location}: {size:,} bytes do not fit in shards.cache_limit ({self.cache_limit:,} "
                              "bytes); raise the limit to a few shards at least, or set shards.cache_dir = \"\"")
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".part-", suffix=".tar")
        try:
            with os.fdopen(fd, "w+b") as sink:
                self._download(location, sink, size, sha256)
            with _locked(cache):
                os.replace(tmp, path)  # atomic: concurrent readers see no file or a verified one
                stream = open(path, "rb")  # noqa: SIM115 - the caller owns the stream; open before any eviction
                if self.cache_limit:
                    _evict(cache, self.cache_limit, keep=path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return stream

    def _download(self, location: str, sink: BinaryIO | None, size: int | None, sha256: str | None,
                  parse=None) -> bytes:
        """Into `sink`, with retries; or, with no sink, returned as bytes. `parse` (raising ValueError)
        checks a body whose size the caller cannot know."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            if sink is not None:
                sink.seek(0)
                sink.truncate()
            try:
                data = self._download_once(location, sink, size, sha256)
                if parse is not None:
                    _parsed(parse, data)
                return data
            except TransientError as exn:
                if attempt == self.retries:
                    error = IntegrityError if exn.integrity else SourceError
                    raise error(f"{location}: {exn} (gave up after {self.retries + 1} attempts)") from exn
            time.sleep(delay)
            delay *= 2

    def _download_once(self, location: str, sink: BinaryIO | None, size: int | None, sha256: str | None) -> bytes:
        limit = MAX_JSON_BYTES if size is None else size
        with self._open_body(location) as (declared, read):
            if declared > limit:  # refused before reading a byte
                raise _too_long(location, size, declared)
            received, data, digest = self._receive(read, sink, limit)
        if received > limit:
            raise _too_long(location, size, received)
        if size is not None and received != size:
            raise TransientError(f"received {received} bytes, the manifest says {size} (truncated download)",
                                 integrity=True)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise TransientError("sha256 of the download does not match the manifest (corrupt or tampered shard)",
                                 integrity=True)
        return data

    def _open_body(self, location: str):
        """A context manager giving (declared length or 0, read(n) -> bytes) for the body at `location`; it
        turns the client's errors, also those raised while the body is read, into TransientError or SourceError."""
        if is_s3(location):
            from audioshard import s3  # boto3 is an optional extra, imported only when s3:// is used

            return s3.object_body(location, self.timeout)
        return _http_body(location, self.timeout)

    def _receive(self, read, sink: BinaryIO | None, limit: int) -> tuple[int, bytes, Any]:
        """(bytes received, the body when there is no sink, its sha256): read piece by piece, at most
        `limit` + one piece, and within DEADLINE_TIMEOUTS x timeout in all."""
        deadline = time.monotonic() + DEADLINE_TIMEOUTS * self.timeout
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
            if time.monotonic() > deadline:
                raise TransientError(f"the download took over {DEADLINE_TIMEOUTS * self.timeout:g} s (a stalled or "
                             f"trickling server; {DEADLINE_TIMEOUTS} x shards.http_timeout is allowed per file)")
        return received, b"".join(pieces), digest


@contextlib.contextmanager
def _http_body(location: str, timeout: float):
    try:
        with _OPENER.open(location, timeout=timeout) as response:  # noqa: S310 - http(s) only
            yield _declared_length(response), response.read1
    except urllib.error.HTTPError as exn:
        if exn.code in TRANSIENT_HTTP:
            raise TransientError(f"HTTP {exn.code} {exn.reason}") from exn
        hint = ": is the URL right, and is the build published there?" if exn.code in (403, 404) else ""
        raise SourceError(f"{location}: HTTP {exn.code} {exn.reason}{hint}") from exn
    except SourceError:  # a SourceError is an OSError: let it through as it is
        raise
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exn:
        raise TransientError(f"connection failed ({getattr(exn, 'reason', exn)})") from exn


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


def _parsed(parse, data: bytes) -> None:
    try:
        parse(data)
    except ValueError as exn:
        raise TransientError(f"the body does not parse ({exn}): truncated by the server or on the way?") from exn


def _open_local(path: str, size: int) -> BinaryIO:
    return _in_memory_if_small(open(path, "rb"), size)  # noqa: SIM115 - the caller owns the stream


def _in_memory_if_small(stream: BinaryIO, size: int) -> BinaryIO:
    """Up to SPOOL_BYTES: read whole (and closed), to be parsed in place from memory (see
    stream.tar_members); larger: the open file itself."""
    if size > SPOOL_BYTES:
        return stream
    with stream:
        return io.BytesIO(stream.read())


def _open_verified(path: str, sha256: str, record: VerifiedRecord | None = None) -> BinaryIO | None:
    """The file as a readable stream if its sha256 matches, else None. With `record`: not hashed when the
    record holds this very file as verified, and recorded once it has passed. Files up to SPOOL_BYTES
    are read once, and that one read serves both the check and the parsing; larger ones are hashed,
    then read again from the same open file, rather than held in memory."""
    stream, opened = open(path, "rb"), None  # noqa: SIM115 - returned to the caller or closed below
    try:
        identity = os.fstat(stream.fileno())  # of the very file read (not of whatever the path names later)
        size = identity.st_size
        seen = time.time()  # the stamps' age is judged as of now, not after a long hash
        if record is not None and record.holds(path, identity, sha256):
            opened = _in_memory_if_small(stream, size)
            return opened
        if size > SPOOL_BYTES:
            matches = _sha256_of(stream) == sha256
            stream.seek(0)
            opened = stream if matches else None
        else:
            data = stream.read()
            opened = io.BytesIO(data) if hashlib.sha256(data).hexdigest() == sha256 else None
    finally:
        if opened is not stream:
            stream.close()
    if opened is not None and record is not None:
        record.add(path, identity, sha256, seen)
    return opened


class VerifiedRecord:
    """Local shards whose sha256 passed, so that they are not hashed again at every epoch and run.

    Hashing costs more CPU than everything else streaming does (sha256 runs at ~1.5 GB/s; a shard is
    read at several times that), and a training run reads every shard once per epoch per rank. Like
    git's index, an entry is keyed by the file's identity and change stamps (device, inode, size,
    modification and change time in ns) and the sha256 the manifest expects: any write to the file,
    a copy or a replacement changes the key, and then the shard is hashed again. The change time
    cannot be set back by a program (utime sets it to now). Files changed within the last
    RACY_SECONDS are never recorded: the kernel's timestamps are coarse, and a write in the same
    tick as the check would keep the key (git's "racily clean" case).

    Entries are empty files named by the key's hash under `AUDIOSHARD_CACHE` (default
    $XDG_CACHE_HOME/audioshard, i.e. ~/.cache/audioshard) in verified/: creating one is atomic, so
    loader workers and ranks share the record without locks. The record is used only in a folder no
    one else can write to (see `trusted_folder`); a folder that cannot be used just means hashing
    every time. `audioshard verify` never uses the record.
    """

    RACY_SECONDS = 2.0

    @property
    def folder(self) -> Path:
        base = os.environ.get("AUDIOSHARD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                          "audioshard")
        return Path(base) / "verified"

    def trusted_folder(self, create: bool = False) -> Path | None:
        """The folder when only this user can write to it (owned by us, no group or other write bit, not a
        link), else None: an entry there is as good as a hash, so nobody else may be able to add one. No
        home folder, or one that cannot be created: None too (hashing every time)."""
        try:
            folder = self.folder
            if create:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            status = os.lstat(folder)
        except (OSError, RuntimeError, KeyError):  # Path.home() without HOME or a passwd entry: RuntimeError
            return None
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o022:
            return None
        return folder

    def add(self, path: str, identity: os.stat_result, sha256: str, seen: float | None = None) -> None:
        """Record `path` (as `identity` described it at time `seen`, default now) as holding `sha256`."""
        seen = time.time() if seen is None else seen
        if seen - identity.st_ctime < self.RACY_SECONDS or seen - identity.st_mtime < self.RACY_SECONDS:
            return
        folder = self.trusted_folder(create=True)
        if folder is not None:
            with contextlib.suppress(OSError):  # read-only home, full disk: no record, hashing next time
                os.close(os.open(folder / self.key(path, identity, sha256), os.O_CREAT | os.O_WRONLY, 0o600))

    def holds(self, path: str, identity: os.stat_result, sha256: str) -> bool:
        folder = self.trusted_folder()
        return folder is not None and (folder / self.key(path, identity, sha256)).exists()

    @staticmethod
    def key(path: str, identity: os.stat_result, sha256: str) -> str:
        """The entry's name: a hash of the file's identity and change stamps and the expected sha256."""
        fields = (os.path.realpath(path), identity.st_dev, identity.st_ino, identity.st_size, identity.st_mtime_ns,
                  identity.st_ctime_ns, sha256)
        return hashlib.sha256(repr(fields).encode()).hexdigest()


VERIFIED = VerifiedRecord()


def _refuse_other_schemes(location: str) -> None:
    if "://" in location or location.startswith("pipe:"):
        raise SourceError(f"{location}: only local paths, http(s):// and s3:// URLs are supported "
                          "(pipe: and other schemes are never run from a shard list)")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as stream:
        return _sha256_of(stream)


def _sha256_of(stream: BinaryIO) -> str:
    """The sha256 of what is left of `stream`, read a piece at a time (bounded memory)."""
    digest = hashlib.sha256()
    while piece := stream.read(PIECE_BYTES):
        digest.update(piece)
    return digest.hexdigest()


DEFAULT_FETCHER = Fetcher()


@contextlib.contextmanager
def _locked(cache: Path):
    """An exclusive flock on the cache folder while a shard is added and others evicted: processes sharing
    the cache take turns, and the kernel drops the lock of a process that dies."""
    fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _evict(cache: Path, limit: int, keep: Path) -> None:
    """Remove the least recently used shards (oldest modification time) until the cache holds at most
    `limit` bytes; never `keep`. A process still reading an evicted file keeps reading it (POSIX)."""
    entries = []
    for path in cache.glob("*.tar"):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            entries.append((stat.st_mtime_ns, path.name, stat.st_size, path))
    total = sum(e[2] for e in entries)
    for _, _, size, path in sorted(entries):
        if total <= limit:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size
