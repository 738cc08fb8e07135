"""Open a build's files wherever they live: a local folder or an http(s):// URL.

Only these two kinds of source are accepted: a shard list is data from strangers, and
webdataset's `pipe:` URLs would run a shell command, so they are refused here by design.
HTTP reads have connection/read timeouts and bounded retries with backoff for transient errors.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO

TIMEOUT_S = float(os.environ.get("AUDIOSHARD_HTTP_TIMEOUT", "30"))
RETRIES = int(os.environ.get("AUDIOSHARD_HTTP_RETRIES", "4"))
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class SourceError(OSError):
    """A file of a build could not be read; the message names the path or URL and the fix."""


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(str(source)).scheme in ("http", "https")


def join(root: str, name: str) -> str:
    """`name` inside `root` (a folder or URL); refuses names that would escape the root."""
    if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or ":" in name:
        raise SourceError(f"refusing file name {name!r} from a manifest: it points outside {root}")
    if is_url(root):
        return root.rstrip("/") + "/" + urllib.parse.quote(name)
    return os.path.join(root, name)


def open_binary(location: str) -> BinaryIO:
    """Open a local file or an http(s) URL for streaming reads."""
    if not is_url(location):
        if "://" in location or location.startswith("pipe:"):
            raise SourceError(f"{location}: only local paths and http(s):// URLs are supported")
        try:
            return open(location, "rb")  # noqa: SIM115 - the caller owns the stream
        except OSError as exn:
            raise SourceError(f"{location}: {exn.strerror}") from exn
    delay = 0.5
    for attempt in range(RETRIES + 1):
        try:
            return urllib.request.urlopen(location, timeout=TIMEOUT_S)  # noqa: S310 - http(s) only, checked above
        except urllib.error.HTTPError as exn:
            if exn.code not in TRANSIENT_HTTP or attempt == RETRIES:
                hint = " (is the URL right, and is the build published there?)" if exn.code in (403, 404) else ""
                raise SourceError(f"{location}: HTTP {exn.code} {exn.reason}{hint}") from exn
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exn:
            if attempt == RETRIES:
                raise SourceError(f"{location}: cannot connect after {RETRIES + 1} attempts ({exn})") from exn
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def read_bytes(location: str) -> bytes:
    with open_binary(location) as stream:
        try:
            return stream.read()
        except (TimeoutError, ConnectionError, OSError) as exn:
            raise SourceError(f"{location}: read failed ({exn})") from exn
