"""The build's manifest: what a shard folder holds, and how to read it back safely.

`manifest.json` is the single record of a build: classes, feature parameters, per split the
shards (file, samples, sha256), sample and class counts and source recordings, the skipped
inputs with reasons, the train-split normalisation statistics and the config used. It is
written last and atomically, so a folder with a manifest always holds a complete build.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audioshard.features import FeatureParams
from audioshard.remote import (
    DEFAULT_FETCHER,
    Fetcher,
    SourceError,
    is_url,
    join,
    sha256_file,  # noqa: F401 - re-exported: the checksum the manifest records
)

MANIFEST_NAME = "manifest.json"
FORMAT = "audioshard-blocks"
FORMAT_VERSION = 1
# Tar members of one block (a sample in webdataset terms): many chunks stored as one array each.
BLOCK_MEMBERS = ("mel.npy", "label.npy", "source.npy", "start.npy")


class ManifestError(ValueError):
    """The manifest is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    sha256: str
    bytes: int
    source_offset: int = 0  # where this shard's part begins in the split's `sources` (merged part builds)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=1, ensure_ascii=False)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a manifest is meant to be served and shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Manifest:
    """A loaded manifest plus where it came from (a folder or an http(s) URL)."""

    def __init__(self, data: dict[str, Any], root: str, fetcher: Fetcher = DEFAULT_FETCHER):
        self.data = data
        self.root = root
        self.fetcher = fetcher  # how shards are read: the same timeouts, retries and cache as the manifest
        self._check()

    def _check(self) -> None:
        if self.data.get("format") != FORMAT:
            raise ManifestError(f"{self.location}: not an audioshard manifest (format {self.data.get('format')!r})")
        version = self.data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{self.location}: shard format version {version} is not supported by this "
                                f"audioshard (reads version {FORMAT_VERSION}); rebuild the shards or upgrade")
        for split, info in self.data["splits"].items():
            for shard in info["shards"]:
                try:
                    join(self.root, shard["file"])  # refuses names escaping the root
                except SourceError as exn:
                    raise ManifestError(f"{self.location}: {exn}") from exn
                if not isinstance(shard.get("samples"), int):
                    raise ManifestError(f"{self.location}: shard entry {shard!r} of split {split} has no sample count")

    @property
    def location(self) -> str:
        return join(self.root, MANIFEST_NAME) if self.root else MANIFEST_NAME

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def features(self) -> FeatureParams:
        return FeatureParams.from_dict(self.data["features"])

    @property
    def block_size(self) -> int:
        return int(self.data["block_size"])

    @property
    def mean(self) -> float:
        return float(self.data["normalization"]["mean"])

    @property
    def std(self) -> float:
        return float(self.data["normalization"]["std"])

    @property
    def split_names(self) -> list[str]:
        return list(self.data["splits"])

    def split(self, name: str) -> dict[str, Any]:
        if name not in self.data["splits"]:
            raise ManifestError(f"{self.location}: no split {name!r}; it has {', '.join(self.data['splits'])}")
        return self.data["splits"][name]

    def shards(self, split: str) -> list[ShardInfo]:
        return [ShardInfo(**s) for s in self.split(split)["shards"]]

    def samples(self, split: str) -> int:
        return int(self.split(split)["samples"])

    def sources(self, split: str) -> list[str]:
        return list(self.split(split)["sources"])

    def shard_location(self, shard: ShardInfo) -> str:
        return join(self.root, shard.file)


def load_manifest(source: str | Path, fetcher: Fetcher = DEFAULT_FETCHER) -> Manifest:
    """Load `SOURCE/manifest.json` from a build folder or an http(s) URL of one."""
    root = str(source)
    if root.endswith(MANIFEST_NAME):
        root = root[: -len(MANIFEST_NAME)].rstrip("/") or "."
    if not is_url(root) and not Path(root).is_dir():
        raise ManifestError(f"{root}: no such folder (expected a build folder from `audioshard build`, or a URL)")
    location = join(root, MANIFEST_NAME)
    try:
        data = fetcher.read_json(location)
    except SourceError as exn:
        raise ManifestError(f"{location}: cannot read the manifest ({exn}); is this the output of "
                            "`audioshard build`, and did the build finish?") from exn
    except (ValueError, RecursionError) as exn:  # RecursionError: JSON nested thousands deep
        raise ManifestError(f"{location}: not valid JSON ({exn})") from exn
    if not isinstance(data, dict):
        raise ManifestError(f"{location}: expected a JSON object")
    return Manifest(data, root, fetcher)
