"""Raw audio where it lives: s3://, gs:// and http(s):// inputs of `audioshard build`.

    audioshard build s3://bucket/raw/ --out shards/     # one folder per class under the prefix
    audioshard build files.csv --out shards/             # `path` cells may be s3://, gs:// or https:// URLs

A URL input is read under the rules that hold for shards (remote.Fetcher): timeouts, one deadline per
attempt, bounded retries with backoff, redirects kept on the same server, and a byte cap per file
(MAX_AUDIO_BYTES). Each file's size and ETag are learnt before the build starts (one listing of a
prefix, one HEAD per CSV row), so that the split, the part identity (`build._job_id`) and the
up-to-date check need no download; a file is then downloaded once, by the process that decodes it, into
a temporary file with its own suffix, and decoded exactly like a local file (byte-identical shards). A
file that cannot be listed, read or decoded is a skip named with its URL, never the end of a build.

s3:// uses boto3 (the standard AWS_* variables, AWS_ENDPOINT_URL for other stores), gs:// uses gcsfs when
it is installed (`pip install gcsfs`; not a dependency of audioshard, and not tested here).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from audioshard import remote, s3
from audioshard.audio import MAX_DECODED_SAMPLES
from audioshard.errors import BuildError, SourceError, TransientError
from audioshard.remote import MAX_BACKOFF_SECONDS, Fetcher
from audioshard.split import Source

AUDIO_SCHEMES = ("s3", "gs", "http", "https")
PREFIX_SCHEMES = ("s3", "gs")  # stores that can be listed: a prefix is an input like a folder
# The build decodes at most MAX_DECODED_SAMPLES samples of a file; 4 bytes a sample (float32 or 32-bit PCM,
# the widest common WAV) plus headroom for headers is the largest file that can ever be decoded. A larger
# URL input is refused before a byte of it is read.
MAX_AUDIO_BYTES = 4 * MAX_DECODED_SAMPLES + (1 << 20)
STAT_THREADS = 16  # HEAD requests in flight while a CSV of URLs is read (each waits on the network, not a core)
PIECE_BYTES = 1 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteSource(Source):
    """An input recording at a URL (`path`), with what the store said of it before the build."""

    size: int = 0
    etag: str = ""


@dataclass(frozen=True)
class RemoteObject:
    url: str
    size: int
    etag: str


def scheme(text: str) -> str:
    """The URL scheme of `text` in lower case ('' for a local path)."""
    return urllib.parse.urlparse(str(text)).scheme.lower() if "://" in str(text) else ""


def is_audio_url(text: str) -> bool:
    return scheme(text) in AUDIO_SCHEMES


def is_prefix_url(text: str) -> bool:
    return scheme(text) in PREFIX_SCHEMES


def require_client(schemes: set[str]) -> None:
    """Fail before any work when a URL scheme in use needs a package that is not installed."""
    if "gs" in schemes:
        _gcs()
    if "s3" in schemes:
        try:
            import boto3  # noqa: F401
        except ImportError as exn:
            raise BuildError("s3:// inputs need boto3: pip install boto3 (from a checkout: pip install -e '.[s3]')"
                             ) from exn


def check_size(url: str, size: int) -> None:
    """An input the build could never decode, or an empty one, is refused by its size alone."""
    if size > MAX_AUDIO_BYTES:
        raise SourceError(f"{url}: {size:,} bytes, over the {MAX_AUDIO_BYTES:,} a build reads of one file (it "
                          "decodes at most 2^28 samples); split it, e.g. ffmpeg -i IN -f segment -segment_time "
                          "3600 OUT-%03d.wav")
    if size == 0:
        raise SourceError(f"{url}: empty object (0 bytes)")


# ---------------------------------------------------------------------------------------------- listing


def list_prefix(prefix: str, fetcher: Fetcher) -> list[RemoteObject]:
    """Every object under an s3:// or gs:// prefix (a folder: `prefix` ends with '/' or is taken as one)."""
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    if scheme(prefix) == "gs":
        return retried(lambda: _list_gs(prefix), fetcher, prefix)
    return retried(lambda: _list_s3(prefix, fetcher.timeout), fetcher, prefix)


def _list_s3(prefix: str, timeout: float) -> list[RemoteObject]:
    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    if not bucket:
        raise SourceError(f"{prefix}: an s3:// input is s3://BUCKET/PREFIX/ (one folder per class below it)")
    with s3.errors(prefix):
        pages = s3.client(timeout).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        return [RemoteObject(f"s3://{bucket}/{item['Key']}", int(item["Size"]), str(item.get("ETag", "")).strip('"'))
                for page in pages for item in page.get("Contents", [])]


def _list_gs(prefix: str) -> list[RemoteObject]:
    found = _gcs().find(prefix, detail=True)
    return [RemoteObject(f"gs://{path}", int(info.get("size") or 0), _gs_tag(info))
            for path, info in sorted(found.items()) if info.get("type", "file") == "file"]


# ---------------------------------------------------------------------------------------------- stat


def stat_urls(urls: list[str], fetcher: Fetcher) -> dict[str, RemoteObject | SourceError]:
    """Size and ETag of each URL (or the SourceError saying why it cannot be used), HEADs in parallel."""
    with concurrent.futures.ThreadPoolExecutor(min(STAT_THREADS, max(1, len(urls)))) as pool:
        results = pool.map(lambda url: _stat_or_error(url, fetcher), urls)
        return dict(zip(urls, results, strict=True))


def _stat_or_error(url: str, fetcher: Fetcher) -> RemoteObject | SourceError:
    try:
        found = stat_url(url, fetcher)
        check_size(url, found.size)
        return found
    except SourceError as exn:
        return exn


def stat_url(url: str, fetcher: Fetcher) -> RemoteObject:
    """What the store says of one object before it is read: its size and ETag (with retries)."""
    kind = scheme(url)
    if kind == "s3":
        return retried(lambda: _stat_s3(url, fetcher.timeout), fetcher, url)
    if kind == "gs":
        return retried(lambda: _stat_gs(url), fetcher, url)
    return retried(lambda: _stat_http(url, fetcher.timeout), fetcher, url)


def _stat_s3(url: str, timeout: float) -> RemoteObject:
    return RemoteObject(url, *s3.head(url, timeout))


def _stat_gs(url: str) -> RemoteObject:
    try:
        info = _gcs().info(url)
    except FileNotFoundError as exn:
        raise SourceError(f"{url}: no such object in Google Cloud Storage") from exn
    return RemoteObject(url, int(info.get("size") or 0), _gs_tag(info))


def _stat_http(url: str, timeout: float) -> RemoteObject:
    return RemoteObject(url, *remote.http_head(url, timeout))


# ---------------------------------------------------------------------------------------------- download


@contextlib.contextmanager
def local_copy(source: RemoteSource, fetcher: Fetcher) -> Iterator[Path]:
    """The object downloaded into a temporary file with the URL's suffix (what the decoder dispatches on),
    removed afterwards. Exactly `source.size` bytes are accepted (more or fewer is a retried download,
    then a SourceError naming the URL), so memory and disk stay bounded by the listed size."""
    suffix = os.path.splitext(urllib.parse.urlparse(source.path).path)[1][:16]
    fd, name = tempfile.mkstemp(prefix="audioshard-input-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as sink:
            if scheme(source.path) == "gs":
                retried(lambda: _read_gs(source, sink), fetcher, source.path)
            else:
                with fetcher.open_shard(source.path, size=source.size) as body:
                    shutil.copyfileobj(body, sink, PIECE_BYTES)
        yield Path(name)
    finally:
        os.unlink(name)


def _read_gs(source: RemoteSource, sink) -> None:
    sink.seek(0)
    sink.truncate()
    received = 0
    with _gcs().open(source.path, "rb") as body:
        while piece := body.read(min(PIECE_BYTES, source.size + 1 - received)):
            sink.write(piece)
            received += len(piece)
    if received != source.size:
        raise TransientError(f"received {received} bytes, the listing said {source.size}")


# ---------------------------------------------------------------------------------------------- shared


def retried(call: Callable[[], T], fetcher: Fetcher, location: str) -> T:
    """`call()`, again after a TransientError (fetcher.retries times, backoff doubling from fetcher.backoff)."""
    delay = fetcher.backoff
    for attempt in range(fetcher.retries + 1):
        try:
            return call()
        except TransientError as exn:
            if attempt == fetcher.retries:
                raise SourceError(f"{location}: {exn} (gave up after {fetcher.retries + 1} attempts)") from exn
        time.sleep(min(delay, MAX_BACKOFF_SECONDS))
        delay = min(2 * delay, MAX_BACKOFF_SECONDS)
    raise AssertionError("unreachable")


def _gcs():
    try:
        import gcsfs
    except ImportError as exn:
        raise BuildError("gs:// inputs need gcsfs, which is not installed: pip install gcsfs (credentials: "
                         "gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS)") from exn
    return gcsfs.GCSFileSystem()


def _gs_tag(info: dict) -> str:
    return str(info.get("md5Hash") or info.get("etag") or info.get("generation") or "")
