"""The build's manifest: what a shard folder holds, and how to read it back safely.

`manifest.json` is the single record of a build: classes, feature parameters, per split the
shards (file, samples, sha256), sample and class counts, the train-split normalisation statistics
and the config used. It is written last and atomically, so a folder with a manifest always holds a
complete build.

What grows with the number of recordings lives beside it (format version 2): per split a list of
its recordings (`{split}-recordings.jsonl`: path, label and provenance, one JSON object a line, in
write order) and the skipped inputs (`skipped.jsonl`). The manifest records each such "list
file" like a shard (file, rows, bytes, sha256), so it stays small (a few KB plus ~150 bytes a
shard) for any number of recordings: every process and loader worker parses it, while the lists
are read (and checked) only by what shows recordings by name (`info`, `report`, `show`).
Version-1 manifests, which hold these lists inline, are still read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audioshard.errors import AudioshardError, ManifestError  # noqa: F401 - ManifestError re-exported
from audioshard.listfiles import (  # noqa: F401 - re-exported: what builds write beside the manifest
    MAX_LIST_BYTES,
    RECORDINGS_PATTERN,
    SKIPPED_NAME,
    ListFile,
    read_list_file,
    recording_problem,
    skipped_problem,
    write_list_file,
)
from audioshard.localfile import sha256_file  # noqa: F401 - re-exported: the checksum the manifest records
from audioshard.params import FeatureParams, feature_params_problem
from audioshard.remote import (
    DEFAULT_FETCHER,
    Fetcher,
    SourceError,
    is_url,
    join,
)

MANIFEST_NAME = "manifest.json"
FORMAT = "audioshard-blocks"
# 3: `config` holds the build's settings once (`build_settings`); 2: per-recording lists in list files beside
# the manifest; 1: those lists inline. All three are read.
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)
# Tar members of one block (a sample in webdataset terms): many chunks stored as one array each.
BLOCK_MEMBERS = ("mel.npy", "label.npy", "source.npy", "start.npy")


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
    audio, silent chunks left out, and where its recordings are listed in write order (a chunk's
    `source` indexes that list): the list file `recordings_file` (version 2), or `sources` inline (version 1)."""

    shards: list[ShardInfo]
    samples: int
    class_counts: dict[str, int]
    recordings: dict[str, int]
    audio_seconds: float
    silent_chunks: int = 0
    recordings_file: ListFile | None = None
    sources: list[str] | None = None  # version 1 only

    @property
    def recording_count(self) -> int:
        """How many recordings the split holds (a chunk's `source` is below it), known without the list."""
        return len(self.sources) if self.sources is not None else self.recordings_file.rows

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitInfo:
        listed = data.get("recordings_file")
        return cls(shards=[ShardInfo(**s) for s in data["shards"]], samples=int(data["samples"]),
                   class_counts=dict(data["class_counts"]), recordings=dict(data["recordings"]),
                   audio_seconds=float(data["audio_seconds"]), silent_chunks=int(data.get("silent_chunks", 0)),
                   recordings_file=ListFile.from_dict(listed) if listed is not None else None,
                   sources=list(data["sources"]) if "sources" in data else None)

    def to_dict(self) -> dict[str, Any]:
        shards = [{k: v for k, v in dataclasses.asdict(s).items() if k != "source_offset" or v} for s in self.shards]
        data = {"shards": shards, "samples": self.samples, "class_counts": self.class_counts,
                "recordings": self.recordings, "audio_seconds": self.audio_seconds,
                "silent_chunks": self.silent_chunks}
        if self.recordings_file is not None:
            data["recordings_file"] = self.recordings_file.to_dict()
        if self.sources is not None:
            data["sources"] = self.sources
        return data


# The settings a manifest records under `config` (format 3): those that decided the build's bytes and are
# not recorded elsewhere in it. The sample rate, chunk length and [features] are in `features`, the block
# size in `block_size`; training settings are the training run's own, never the build's.
BUILD_SETTINGS = {"audio": None, "split": None, "shards": ("chunks_per_shard",)}  # None: the whole section
RECORDED_ELSEWHERE = {"audio": ("sample_rate", "chunk_seconds")}


def build_settings(config: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The `config` a format-3 manifest records of a build's whole config (`Config.to_dict()`)."""
    kept = {}
    for section, keys in BUILD_SETTINGS.items():
        values = config[section] if keys is None else {k: config[section][k] for k in keys}
        kept[section] = {k: v for k, v in values.items() if k not in RECORDED_ELSEWHERE.get(section, ())}
    return kept


@dataclass(frozen=True)
class BuildRecord:
    """The manifest's top level, typed: `to_dict` is what `manifest.json` holds (the schema writers use),
    `from_dict` reads one back once `_schema_problem` has checked every key, type and range."""

    classes: list[str]
    features: FeatureParams
    block_size: int
    mean: float
    std: float
    train_stats: dict[str, float]
    splits: dict[str, SplitInfo]
    settings: dict[str, dict[str, Any]]  # `config`: build settings not recorded above (`build_settings`)
    fingerprint: str = ""
    input: str = ""
    skipped_file: ListFile | None = None  # version 1 held `skipped` (and `provenance`) inline: `inline`
    ignored: dict[str, int] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    part: dict[str, Any] | None = None  # a part build: index, count, job
    merged_from: list[str] | None = None  # a merged build: its part folders
    format_version: int = FORMAT_VERSION
    audioshard_version: str = ""
    inline: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    multilabel: bool = False  # chunks carry multi-hot rows (`labels.npy`); recorded only when true

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildRecord:
        norm, listed = data["normalization"], data.get("skipped_file")
        return cls(classes=list(data["classes"]), features=FeatureParams.from_dict(data["features"]),
                   block_size=int(data["block_size"]), mean=float(norm["mean"]), std=float(norm["std"]),
                   train_stats=dict(data.get("train_stats", {})),
                   splits={name: SplitInfo.from_dict(info) for name, info in data["splits"].items()},
                   settings=dict(data.get("config", {})), fingerprint=data.get("fingerprint", ""),
                   input=data.get("input", ""), skipped_file=ListFile.from_dict(listed) if listed else None,
                   ignored=dict(data.get("ignored", {})), warnings=list(data.get("warnings", [])),
                   part=data.get("part"), merged_from=data.get("merged_from"),
                   format_version=int(data["format_version"]), audioshard_version=data.get("audioshard_version", ""),
                   inline={k: list(data[k]) for k in ("skipped", "provenance") if k in data},
                   multilabel=data.get("multilabel") is True)

    def to_dict(self) -> dict[str, Any]:
        data = {"format": FORMAT, "format_version": self.format_version,
                "audioshard_version": self.audioshard_version, "fingerprint": self.fingerprint, "input": self.input,
                "classes": self.classes, "features": self.features.to_dict(), "block_size": self.block_size,
                "normalization": {"mean": self.mean, "std": self.std}, "train_stats": self.train_stats,
                "splits": {name: info.to_dict() for name, info in self.splits.items()}, **self.inline}
        if self.skipped_file is not None:
            data["skipped_file"] = self.skipped_file.to_dict()
        data.update(ignored=self.ignored, warnings=self.warnings, config=self.settings)
        data.update({k: v for k, v in (("part", self.part), ("merged_from", self.merged_from)) if v is not None})
        if self.multilabel:  # single-label manifests stay as they were
            data["multilabel"] = True
        return data


class Sources(Sequence[str]):
    """A split's recording names in write order (a chunk's `source` indexes them).

    Its length comes from the manifest; the names are read from the split's list file on first use
    of an item. Training and its loader workers need only the length (to bound `source` indices),
    so they never read or parse the list."""

    def __init__(self, manifest: Manifest, split: str, count: int):
        self._manifest, self._split, self._count = manifest, split, count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self._manifest.source_names(self._split)[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._manifest.source_names(self._split))


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
    """A loaded manifest plus where it came from (a folder, or an http(s):// or s3:// URL)."""

    def __init__(self, data: dict[str, Any], root: str, fetcher: Fetcher = DEFAULT_FETCHER):
        self.data = data
        self.root = root
        self.fetcher = fetcher  # how shards are read: the same timeouts, retries and cache as the manifest
        self._lists: dict[str, list[Any]] = {}  # list files read so far (rows by file name, or names by split)
        self._check()
        self.record = BuildRecord.from_dict(data)  # the checked manifest, typed: what the properties read

    def _check(self) -> None:
        if self.data.get("format") != FORMAT:
            raise ManifestError(f"{self.location}: not an audioshard manifest (format {self.data.get('format')!r:.80})")
        version = self.data.get("format_version")
        if version not in READ_VERSIONS or type(version) is not int:
            raise ManifestError(f"{self.location}: shard format version {version!r:.80} is not supported by this "
                                f"audioshard (reads versions {', '.join(map(str, READ_VERSIONS))}); rebuild the "
                                "shards or upgrade")
        problem = _schema_problem(self.data)
        if problem:
            raise ManifestError(f"{self.location}: not a usable manifest: {problem}; rebuild the shards with "
                                "`audioshard build`")
        names = [shard["file"] for info in self.data["splits"].values() for shard in info["shards"]]
        names += [entry["file"] for entry in _list_entries(self.data)]
        for name in names:
            try:
                join(self.root, name)  # refuses names escaping the root
            except SourceError as exn:
                raise ManifestError(f"{self.location}: {exn}") from exn

    def __getstate__(self) -> dict[str, Any]:
        # A loader worker gets a copy of the manifest: lists the parent process read (for a report, say)
        # stay there, and a worker never needs them (only their lengths, which the manifest holds).
        return {**self.__dict__, "_lists": {}}

    @property
    def location(self) -> str:
        return join(self.root, MANIFEST_NAME) if self.root else MANIFEST_NAME

    @property
    def classes(self) -> list[str]:
        return list(self.record.classes)

    @property
    def features(self) -> FeatureParams:
        return self.record.features

    @property
    def block_size(self) -> int:
        return self.record.block_size

    @property
    def mean(self) -> float:
        return self.record.mean

    @property
    def std(self) -> float:
        return self.record.std

    @property
    def split_names(self) -> list[str]:
        return list(self.record.splits)

    def split(self, name: str) -> SplitInfo:
        if name not in self.record.splits:
            raise ManifestError(f"{self.location}: no split {name!r}; it has {', '.join(self.record.splits)}")
        return self.record.splits[name]

    def build_config(self) -> dict[str, dict[str, Any]]:
        """The [audio] and [features] settings the build used, as `Config.to_dict()` has them: how `predict`
        must cut and featurise new recordings. Format 3 records each once (the chunking in `features`);
        older manifests held the whole config."""
        if self.format_version < 3:
            return {s: dict(self.record.settings.get(s, {})) for s in ("audio", "features")}
        params = self.features.to_dict()
        audio = {**self.record.settings.get("audio", {}), "sample_rate": params["sample_rate"],
                 "chunk_seconds": params["chunk_seconds"]}
        keep = ("n_mels", "n_fft", "hop_length", "f_min", "f_max", "top_db")
        return {"audio": audio, "features": {k: params[k] for k in keep}}

    def shards(self, split: str) -> list[ShardInfo]:
        return list(self.split(split).shards)

    def samples(self, split: str) -> int:
        return self.split(split).samples

    def sources(self, split: str) -> Sources:
        """The split's recording names in write order; its length is known at once, the names are read
        (from the split's list file, checked) only when an item is used."""
        return Sources(self, split, self.split(split).recording_count)

    def source_count(self, split: str) -> int:
        """How many recordings the split holds (chunks' `source` indices are below it), without reading a list."""
        return self.split(split).recording_count

    def recording_rows(self, split: str) -> list[dict[str, Any]]:
        """The split's recordings in write order: `path`, `label` and, for fetched files, `provenance` (the
        row of RAW/sources.csv). Reads the split's list file (version 1: names only, from the manifest)."""
        info = self.split(split)
        if info.sources is not None:
            return [{"path": name} for name in info.sources]
        return list(self._read_list(info.recordings_file, f"recordings list of split {split!r}", recording_problem))

    def to_pandas(self, split: str | None = None):
        """The build's recordings as a pandas DataFrame: `split`, `source` (the index chunks refer to as
        `Batch.source`), `path`, `label` and, for fetched files, the provenance columns; one split or all."""
        import pandas as pd

        frames = []
        for name in [split] if split else [s for s in self.split_names if self.source_count(s)]:
            rows = [{k: v for k, v in row.items() if k != "provenance"} | dict(row.get("provenance") or {})
                    for row in self.recording_rows(name)]
            frame = pd.DataFrame(rows)
            frame.insert(0, "source", range(len(frame)))
            frame.insert(0, "split", name)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["split", "source", "path"])

    def source_names(self, split: str) -> list[str]:
        """The split's recording names in write order (what `sources(split)` gives item by item); reads the list."""
        info = self.split(split)
        if info.sources is not None:
            return info.sources
        key = f"names:{split}"  # ':' cannot be in a list file's name (`join` refuses it)
        if key not in self._lists:  # only the names are kept: a million names are far smaller than their rows
            rows = self._read_list(info.recordings_file, f"recordings list of split {split!r}", recording_problem,
                                   keep=False)
            self._lists[key] = [row["path"] for row in rows]
        return self._lists[key]

    def _read_list(self, entry: ListFile, what: str, row_problem: Callable[[Any], str],
                   keep: bool = True) -> list[dict[str, Any]]:
        """A list file's rows, read (and checked) once if `keep`, else every time."""
        if entry.file in self._lists:
            return self._lists[entry.file]
        rows = read_list_file(self.fetcher, join(self.root, entry.file), entry, what, row_problem)
        if keep:
            self._lists[entry.file] = rows
        return rows

    @property
    def multilabel(self) -> bool:
        """Whether a chunk may hold several classes (then `Batch.y` is a multi-hot row per chunk)."""
        return self.record.multilabel

    @property
    def block_members(self) -> tuple[str, ...]:
        return BLOCK_MEMBERS + (("labels.npy",) if self.multilabel else ())

    @property
    def format_version(self) -> int:
        return self.record.format_version

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Inputs the build could not use: `path` and `reason` each (and `provenance` for fetched files).
        Version 2 reads them from the list file `skipped.jsonl` on first use."""
        if self.format_version == 1:
            return list(self.record.inline.get("skipped", []))
        return list(self._read_list(self.record.skipped_file, "list of skipped inputs",
                                    skipped_problem))

    @property
    def skipped_count(self) -> int:
        """How many inputs were skipped, without reading their list."""
        if self.format_version == 1:
            return len(self.record.inline.get("skipped", []))
        return self.record.skipped_file.rows

    @property
    def provenance(self) -> list[dict[str, str]]:
        """Where the build's inputs came from: the RAW/sources.csv rows of its recordings, then of its skipped
        inputs (every list file is read)."""
        if self.format_version == 1:
            return list(self.record.inline.get("provenance", []))
        rows = [row for split in self.split_names for row in self.recording_rows(split)] + self.skipped
        return [row["provenance"] for row in rows if "provenance" in row]

    @property
    def ignored(self) -> dict[str, int]:
        """Files the build passed over as not audio (hidden, other extensions), counted by kind."""
        return dict(self.record.ignored)

    @property
    def warnings(self) -> list[str]:
        return list(self.record.warnings)

    def shard_location(self, shard: ShardInfo) -> str:
        return join(self.root, shard.file)


# What a manifest may ask of a reader. A block's features are read whole, so a block is bounded: with the
# default 64 chunks of 64 x 63 it is 0.5 MB; MAX_BLOCK_BYTES allows 500 times that.
MAX_BLOCK_SIZE, MAX_BLOCK_BYTES, MAX_CLASSES = 4096, 256 << 20, 100_000
SHARD_KEYS = {"file": str, "samples": int, "sha256": str, "bytes": int, "source_offset": int}
# Every top-level key a build of format version 1 or 2 has written (a part build adds `part`, a merged one
# `merged_from`; version 1 held `skipped` and `provenance` inline, version 2 names `skipped_file`), with the
# type of those that no other check covers. Anything else is refused: it would be parsed, held by every
# loader worker and never checked.
TOP_KEYS = {"format": str, "format_version": int, "audioshard_version": str, "fingerprint": str, "input": str,
            "classes": list, "features": dict, "block_size": int, "normalization": dict, "train_stats": dict,
            "splits": dict, "skipped": list, "skipped_file": dict, "provenance": list, "ignored": dict,
            "warnings": list, "config": dict, "part": dict, "merged_from": list, "multilabel": bool}
SPLIT_KEYS = {"shards", "samples", "class_counts", "recordings", "audio_seconds", "silent_chunks", "recordings_file",
              "sources"}


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _schema_problem(data: dict[str, Any]) -> str:
    """What makes a manifest unusable ('' if nothing): every key a reader uses, its type and range,
    checked once here so that no later step meets a KeyError, a TypeError or an outsized allocation."""
    if unknown := sorted(set(data) - set(TOP_KEYS)):
        return (f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k[:40]) for k in unknown[:5])} "
                f"(a manifest holds {', '.join(TOP_KEYS)})")
    if wrong := [k for k, v in data.items() if not isinstance(v, TOP_KEYS[k])]:
        return f"{wrong[0]!r} must be a {TOP_KEYS[wrong[0]].__name__}"
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
        if problem := _split_problem(info, classes) or _listing_problem(info, classes, data["format_version"],
                                                                         data.get("multilabel") is True):
            return f"split {name!r:.50}: {problem}"
    if data["format_version"] >= 3 and (problem := _settings_problem(data.get("config", {}))):
        return problem
    return _report_problem(data)


def _settings_problem(settings: Any) -> str:
    """A format-3 `config`: the build's sections only, each a table of numbers, strings, booleans or string lists."""
    if not isinstance(settings, dict) or not set(settings) <= set(BUILD_SETTINGS):
        return f"'config' must hold the build's settings ({', '.join(BUILD_SETTINGS)}) only"
    for section, values in settings.items():
        if not isinstance(values, dict) or not all(
                type(v) in (bool, int, float, str) or type(v) is list and all(type(s) is str for s in v)
                for v in values.values()):
            return f"'config' section {section!r} must map names to numbers, strings or lists of strings"
    return ""


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
    if unknown := sorted(set(info) - SPLIT_KEYS):
        return f"unknown key {unknown[0][:40]!r} (a split holds {', '.join(sorted(SPLIT_KEYS))})"
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
    for key in ("class_counts", "recordings"):
        if not isinstance(info.get(key), dict) or not all(_is_count(info[key].get(c)) for c in classes):
            return f"'{key}' must give a count for every class"
    if not _is_number(info.get("audio_seconds")):
        return "'audio_seconds' must be a number"
    return ""


def _listing_problem(info: dict[str, Any], classes: list[str], version: int, multilabel: bool = False) -> str:
    """Where a split lists its recordings: inline `sources` (version 1), or a list file with one row per
    recording (version 2), so that the count of recordings is known without reading it."""
    if version == 1:
        if not isinstance(info.get("sources"), list) or not all(isinstance(s, str) for s in info["sources"]):
            return "'sources' must be a list of recording names"
        return ""
    if problem := _list_file_problem(info.get("recordings_file"), "recordings_file"):
        return problem
    rows, per_class = info["recordings_file"]["rows"], [info["recordings"][c] for c in classes]
    # A multi-label recording counts once in each of its classes: at least the largest count, at most the sum.
    if rows != sum(per_class) if not multilabel else not max(per_class, default=0) <= rows <= sum(per_class):
        return "'recordings_file' must list as many rows as the split has recordings"
    return ""


LIST_KEYS = {"file": str, "rows": int, "bytes": int, "sha256": str}


def _list_file_problem(entry: Any, key: str) -> str:
    if not isinstance(entry, dict) or set(entry) != set(LIST_KEYS) or not all(
            type(entry[k]) is t for k, t in LIST_KEYS.items()):
        return f"'{key}' must hold file, rows, bytes and sha256"
    if not (_is_count(entry["rows"]) and _is_count(entry["bytes"])) or entry["bytes"] > MAX_LIST_BYTES:
        return f"'{key}' must give rows and bytes within 0..{MAX_LIST_BYTES} (a list file is at most " \
               f"{MAX_LIST_BYTES >> 20} MB)"
    if len(entry["sha256"]) != 64 or set(entry["sha256"]) - set("0123456789abcdef"):
        return f"'{key}' has no valid sha256 (64 hex digits)"
    return ""


def _list_entries(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The list files a (checked) manifest names."""
    entries = [info["recordings_file"] for info in data["splits"].values() if "recordings_file" in info]
    return entries + ([data["skipped_file"]] if "skipped_file" in data else [])


def _report_problem(data: dict[str, Any]) -> str:
    """The parts only `audioshard info` shows: skipped inputs, ignored counts, warnings."""
    ignored, warnings = data.get("ignored", {}), data.get("warnings", [])
    if data["format_version"] == 1:
        skipped = data.get("skipped", [])
        if not isinstance(skipped, list) or not all(isinstance(s, dict) and isinstance(s.get("path"), str)
                                                    and isinstance(s.get("reason"), str) for s in skipped):
            return "'skipped' must be a list of {path, reason}"
    elif problem := _list_file_problem(data.get("skipped_file"), "skipped_file"):
        return problem
    if not isinstance(ignored, dict) or not all(_is_count(v) for v in ignored.values()):
        return "'ignored' must map kinds to counts"
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        return "'warnings' must be a list of strings"
    return ""


def load_manifest(source: str | Path, fetcher: Fetcher = DEFAULT_FETCHER) -> Manifest:
    """Load `SOURCE/manifest.json` from a build folder, or an http(s):// or s3:// URL of one."""
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
