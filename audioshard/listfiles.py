"""The list files beside a manifest: per split its recordings, and the skipped inputs, one JSON object a line.

What grows with the number of recordings lives in these files, not in `manifest.json`, which records each
like a shard (file, rows, bytes, sha256): written atomically, read back only after size and sha256 match,
every row checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audioshard.errors import ManifestError, SourceError
from audioshard.remote import Fetcher

# The list files of a version-2 build. A list file is refused beyond MAX_LIST_BYTES (from its manifest
# entry, before a byte is read): 1 GB is ~10 million recordings with their provenance.
RECORDINGS_PATTERN = "{split}-recordings.jsonl"
SKIPPED_NAME = "skipped.jsonl"
MAX_LIST_BYTES = 1 << 30


@dataclass(frozen=True)
class ListFile:
    """A list file as the manifest records it: name (in the build folder), rows, bytes and sha256."""

    file: str
    rows: int
    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ListFile:
        return cls(file=data["file"], rows=data["rows"], bytes=data["bytes"], sha256=data["sha256"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_list_file(folder: str | Path, name: str, rows: Iterable[dict[str, Any]]) -> ListFile:
    """Write `rows` as JSON Lines into `folder/name` (atomically) and return its manifest entry.

    JSON Lines: any tool reads it (`head`, `grep`, `jq`, pandas), it is written and parsed a line at a
    time, and the same rows give the same bytes (builds stay byte-identical)."""
    path = Path(folder) / name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    digest, size, count = hashlib.sha256(), 0, 0
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as stream:
            for row in rows:
                line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
                digest.update(line)
                stream.write(line)
                size, count = size + len(line), count + 1
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a build is meant to be served and shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ListFile(file=name, rows=count, bytes=size, sha256=digest.hexdigest())


def read_list_file(fetcher: Fetcher, location: str, entry: ListFile, what: str,
                   row_problem: Callable[[Any], str]) -> list[dict[str, Any]]:
    """The rows of a list file, after its size and sha256 match `entry` (nothing is parsed before).

    Read through `fetcher` like a shard (local, HTTP or S3; retried remote reads; no cache), with the
    sha256 checked even where `shards.verify_local` is off: these files are small beside the shards,
    and a forged row would name the wrong recording in every report. Every row must pass
    `row_problem` (a JSON object of the right keys), and there must be exactly `entry.rows`."""
    checked = dataclasses.replace(fetcher, verify_local=True, cache_dir="")
    try:
        stream = checked.open_shard(location, entry.bytes, entry.sha256)
    except SourceError as exn:
        raise ManifestError(f"{location}: the {what} cannot be used: {exn}. It must be the file the build "
                            "wrote beside manifest.json; copy or publish the whole build folder") from exn
    with stream:
        rows = list(_parse_rows(io.TextIOWrapper(stream, encoding="utf-8"), location, entry.rows, row_problem))
    if len(rows) != entry.rows:
        raise ManifestError(f"{location}: {len(rows)} rows, the manifest says {entry.rows}")
    return rows


def _parse_rows(lines: Iterable[str], location: str, expected: int,
                row_problem: Callable[[Any], str]) -> Iterator[dict[str, Any]]:
    try:
        for number, line in enumerate(lines, start=1):
            if number > expected:
                raise ManifestError(f"{location}: more than the {expected} rows the manifest says")
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exn:  # RecursionError: JSON nested thousands deep
                raise ManifestError(f"{location} line {number}: not a JSON object ({exn})") from exn
            if problem := row_problem(row):
                raise ManifestError(f"{location} line {number}: {problem}")
            yield row
    except UnicodeDecodeError as exn:
        raise ManifestError(f"{location}: not UTF-8 text ({exn})") from exn


def provenance_problem(row: dict[str, Any]) -> str:
    origin = row.get("provenance", {})
    if not isinstance(origin, dict) or not all(isinstance(v, str) for v in origin.values()):
        return "'provenance' must map column names to text"
    return ""


def recording_problem(row: Any) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not isinstance(row.get("label"), str):
        return "expected a recording: {\"path\": ..., \"label\": ...}"
    return provenance_problem(row)


def skipped_problem(row: Any) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not isinstance(row.get("reason"), str):
        return "expected a skipped input: {\"path\": ..., \"reason\": ...}"
    return provenance_problem(row)
