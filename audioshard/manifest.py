"""The build's manifest: what a shard folder holds, and how to read it back safely.

`manifest.json` is the single record of a build: classes, feature parameters, per split the
shards (file, samples, sha256), sample and class counts and source recordings, the skipped
inputs with reasons, the train-split normalisation statistics and the config used. It is
written last and atomically, so a folder with a manifest always holds a complete build.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audioshard.errors import AudioshardError
from audioshard.params import FeatureParams, feature_params_problem
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


class ManifestError(AudioshardError, ValueError):
    """The manifest is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    sha256: str
    bytes: int
    source_offset: int = 0  # where this shard's part begins in the split's `sources` (merged part builds)


@dataclass(frozen=True)
class SplitInfo:
    """What a build holds of one split: its shards, chunk and recording counts per class, seconds of
    audio, silent chunks left out, and its recordings in write order (a chunk's `source` indexes them)."""

    shards: list[ShardInfo]
    samples: int
    class_counts: dict[str, int]
    recordings: dict[str, int]
    audio_seconds: float
    sources: list[str]
    silent_chunks: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitInfo:
        return cls(shards=[ShardInfo(**s) for s in data["shards"]], samples=int(data["samples"]),
                   class_counts=dict(data["class_counts"]), recordings=dict(data["recordings"]),
                   audio_seconds=float(data["audio_seconds"]), sources=list(data["sources"]),
                   silent_chunks=int(data.get("silent_chunks", 0)))

    def to_dict(self) -> dict[str, Any]:
        shards = [{k: v for k, v in dataclasses.asdict(s).items() if k != "source_offset" or v} for s in self.shards]
        return {"shards": shards, "samples": self.samples,
                "class_counts": self.class_counts, "recordings": self.recordings,
                "audio_seconds": self.audio_seconds, "silent_chunks": self.silent_chunks, "sources": self.sources}


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never half of it."""
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file so that readers see the old file or the whole new one (never 0 bytes on a full disk)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
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
        self._split_info: dict[str, SplitInfo] = {}
        self._check()

    def _check(self) -> None:
        if self.data.get("format") != FORMAT:
            raise ManifestError(f"{self.location}: not an audioshard manifest (format {self.data.get('format')!r:.80})")
        version = self.data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{self.location}: shard format version {version!r:.80} is not supported by this "
                                f"audioshard (reads version {FORMAT_VERSION}); rebuild the shards or upgrade")
        problem = _schema_problem(self.data)
        if problem:
            raise ManifestError(f"{self.location}: not a usable manifest: {problem}; rebuild the shards with "
                                "`audioshard build`")
        for info in self.data["splits"].values():
            for shard in info["shards"]:
                try:
                    join(self.root, shard["file"])  # refuses names escaping the root
                except SourceError as exn:
                    raise ManifestError(f"{self.location}: {exn}") from exn

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

    def split(self, name: str) -> SplitInfo:
        if name not in self.data["splits"]:
            raise ManifestError(f"{self.location}: no split {name!r}; it has {', '.join(self.data['splits'])}")
        if name not in self._split_info:  # parsed once: streams ask for a split's shards every epoch
            self._split_info[name] = SplitInfo.from_dict(self.data["splits"][name])
        return self._split_info[name]

    def shards(self, split: str) -> list[ShardInfo]:
        return list(self.split(split).shards)

    def samples(self, split: str) -> int:
        return self.split(split).samples

    def sources(self, split: str) -> list[str]:
        return list(self.split(split).sources)

    @property
    def format_version(self) -> int:
        return int(self.data["format_version"])

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Inputs the build could not use: `path` and `reason` each."""
        return list(self.data.get("skipped", []))

    @property
    def ignored(self) -> dict[str, int]:
        """Files the build passed over as not audio (hidden, other extensions), counted by kind."""
        return dict(self.data.get("ignored", {}))

    @property
    def warnings(self) -> list[str]:
        return list(self.data.get("warnings", []))

    def shard_location(self, shard: ShardInfo) -> str:
        return join(self.root, shard.file)


# What a manifest may ask of a reader. A block's features are read whole, so a block is bounded: with the
# default 64 chunks of 64 x 63 it is 0.5 MB; MAX_BLOCK_BYTES allows 500 times that.
MAX_BLOCK_SIZE, MAX_BLOCK_BYTES, MAX_CLASSES = 4096, 256 << 20, 100_000
SHARD_KEYS = {"file": str, "samples": int, "sha256": str, "bytes": int, "source_offset": int}


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _schema_problem(data: dict[str, Any]) -> str:
    """What makes a manifest unusable ('' if nothing): every key a reader uses, its type and range,
    checked once here so that no later step meets a KeyError, a TypeError or an outsized allocation."""
    classes, norm, block_size = data.get("classes"), data.get("normalization"), data.get("block_size")
    if not isinstance(classes, list) or not 0 < len(classes) <= MAX_CLASSES or not all(
            isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        return f"'classes' must be a list of 1..{MAX_CLASSES} distinct names"
    try:
        features = FeatureParams.from_dict(data.get("features"))
    except TypeError:
        return "'features' must hold " + ", ".join(f.name for f in dataclasses.fields(FeatureParams))
    if problem := block_problem(block_size, features):
        return problem
    if not isinstance(norm, dict) or not _is_number(norm.get("mean")) or not _is_number(norm.get("std")) \
            or not norm["std"] > 0:
        return "'normalization' must hold a finite mean and a positive std"
    if not isinstance(data.get("splits"), dict) or not data["splits"]:
        return "'splits' must map split names to their shards"
    for name, info in data["splits"].items():
        if problem := _split_problem(info, classes):
            return f"split {name!r:.50}: {problem}"
    return _report_problem(data)


def block_problem(block_size: Any, features: FeatureParams) -> str:
    """What a reader would refuse in these block and feature settings ('' if nothing); `build` checks it too."""
    if problem := feature_params_problem(features):
        return problem
    if type(block_size) is not int or not 0 < block_size <= MAX_BLOCK_SIZE:
        return f"block_size = {block_size!r:.50}, expected an integer in 1..{MAX_BLOCK_SIZE}"
    if block_size * math.prod(features.shape) * 2 > MAX_BLOCK_BYTES:
        return f"a block of {block_size} chunks of {features.shape} exceeds {MAX_BLOCK_BYTES >> 20} MB"
    return ""


def _split_problem(info: Any, classes: list[str]) -> str:
    if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
        return "expected a table with a 'shards' list"
    for shard in info["shards"]:
        if not isinstance(shard, dict) or set(shard) - set(SHARD_KEYS) or set(SHARD_KEYS) - {"source_offset"} - set(
                shard):
            return f"shard entry {shard!r:.200} must hold file, samples, sha256 and bytes (and source_offset)"
        sha256 = shard["sha256"]
        if not isinstance(sha256, str) or len(sha256) != 64 or set(sha256) - set("0123456789abcdef"):
            return f"shard {shard['file']!r:.80} has no valid sha256 (64 hex digits): checksums cannot be turned off"
        if not all(type(v) is SHARD_KEYS[k] for k, v in shard.items()):
            return f"shard entry {shard!r:.200}: file must be a string, the counts integers"
        if not all(_is_count(shard[k]) for k in ("samples", "bytes")) or shard.get("source_offset", 0) < 0:
            return f"shard entry {shard!r:.200} has a negative count"
    if not _is_count(info.get("samples")) or info["samples"] != sum(s["samples"] for s in info["shards"]):
        return "'samples' must equal the sum of its shards' samples"
    if not isinstance(info.get("sources"), list) or not all(isinstance(s, str) for s in info["sources"]):
        return "'sources' must be a list of recording names"
    for key in ("class_counts", "recordings"):
        if not isinstance(info.get(key), dict) or not all(_is_count(info[key].get(c)) for c in classes):
            return f"'{key}' must give a count for every class"
    if not _is_number(info.get("audio_seconds")):
        return "'audio_seconds' must be a number"
    return ""


def _report_problem(data: dict[str, Any]) -> str:
    """The parts only `audioshard info` shows: skipped inputs, ignored counts, warnings."""
    skipped, ignored, warnings = data.get("skipped", []), data.get("ignored", {}), data.get("warnings", [])
    if not isinstance(skipped, list) or not all(isinstance(s, dict) and isinstance(s.get("path"), str)
                                                and isinstance(s.get("reason"), str) for s in skipped):
        return "'skipped' must be a list of {path, reason}"
    if not isinstance(ignored, dict) or not all(_is_count(v) for v in ignored.values()):
        return "'ignored' must map kinds to counts"
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        return "'warnings' must be a list of strings"
    return ""


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
