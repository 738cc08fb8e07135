"""Assemble a build's manifest: what each split holds, tallied as the decoded files arrive, the list
files beside it (each split's recordings, the skipped inputs) and the manifest written over them;
and one manifest over the manifests of part builds (`build --merge`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audioshard import __version__
from audioshard.acquire.common import provenance_rows
from audioshard.config import Config
from audioshard.errors import BuildError
from audioshard.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    RECORDINGS_PATTERN,
    SKIPPED_NAME,
    BuildRecord,
    ListFile,
    Manifest,
    ManifestError,
    ShardInfo,
    SplitInfo,
    build_settings,
    write_list_file,
)
from audioshard.names import SPLITS
from audioshard.params import FeatureParams
from audioshard.remote import DEFAULT_FETCHER, SourceError


@dataclass
class SplitTally:
    """One split's recordings (in write order: a chunk's `source` indexes this list), chunk and
    recording counts per class, seconds of audio and silent chunks left out."""

    sources: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # of each source
    class_counts: Counter = field(default_factory=Counter)
    recordings: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    silent_chunks: int = 0

    def add(self, rel: str, label: str, chunks: int, seconds: float, silent: int,
            names: tuple[str, ...] | None = None) -> int:
        """Count one recording; returns its index in `sources`."""
        self.sources.append(rel)
        self.labels.append(label)
        for name in names or (label,):  # a multi-label recording counts in each of its classes
            self.class_counts[name] += chunks
            self.recordings[name] += 1
        self.seconds += seconds
        self.silent_chunks += silent
        return len(self.sources) - 1

    def rows(self, origin: dict[str, dict[str, str]]) -> Iterator[dict[str, Any]]:
        """The split's recordings file, row by row: path, label and the provenance row (if any)."""
        for rel, label in zip(self.sources, self.labels, strict=True):
            yield with_origin({"path": rel, "label": label}, origin)

    def to_dict(self, shards: list[dict[str, Any]], classes: list[str], listed: ListFile) -> dict[str, Any]:
        """The split's entry in manifest.json (`manifest.SplitInfo`, the one description of it); `listed` is
        its recordings file (`write_lists`)."""
        return SplitInfo(shards=[ShardInfo(**s) for s in shards], samples=sum(s["samples"] for s in shards),
                         class_counts={c: self.class_counts[c] for c in classes},
                         recordings={c: self.recordings[c] for c in classes}, audio_seconds=round(self.seconds, 3),
                         silent_chunks=self.silent_chunks, recordings_file=listed).to_dict()


def with_origin(row: dict[str, Any], origin: dict[str, dict[str, str]]) -> dict[str, Any]:
    """`row` plus the provenance of its path (its RAW/sources.csv row), when it has one."""
    return {**row, "provenance": origin[row["path"]]} if row["path"] in origin else row


def origins(input_path: str | Path, rels: list[str]) -> dict[str, dict[str, str]]:
    """Where each input came from (RAW/sources.csv, written by `audioshard fetch`), by relative path."""
    return {row["path"]: row for row in provenance_rows(input_path, rels)}


def write_lists(folder: Path, tallies: dict[str, SplitTally], skipped: list[dict[str, str]],
                origin: dict[str, dict[str, str]]) -> dict[str, ListFile]:
    """Write the list files of a build into `folder`: per split its recordings in write order, and the
    skipped inputs with their reasons. Returns their manifest entries by split name and "skipped".

    Kept out of manifest.json because they grow with the data (a million recordings made a 40 MB
    manifest that every process and loader worker parsed); the manifest records each like a shard."""
    lists = {split: write_list_file(folder, RECORDINGS_PATTERN.format(split=split), tallies[split].rows(origin))
             for split in SPLITS}
    lists["skipped"] = write_list_file(folder, SKIPPED_NAME, (with_origin(row, origin) for row in skipped))
    return lists


@dataclass
class TrainStats:
    """Sum, sum of squares and count of the train split's dB values: its mean and std normalise every
    batch, and part builds merge exactly from them."""

    total: float = 0.0
    total_sq: float = 0.0
    n: int = 0

    def add(self, stats: tuple[float, float, int]) -> None:
        self.total, self.total_sq, self.n = self.total + stats[0], self.total_sq + stats[1], self.n + stats[2]

    def normalization(self) -> dict[str, float]:
        if not self.n:
            return {"mean": 0.0, "std": 1.0}
        mean = self.total / self.n
        return {"mean": float(mean), "std": float(np.sqrt(max(self.total_sq / self.n - mean * mean, 1e-12)))}

    def to_dict(self) -> dict[str, Any]:
        return {"sum": self.total, "sum_sq": self.total_sq, "n": self.n}


def build_warnings(notes: list[str], classes: list[str], splits: dict[str, Any], longest: float,
                   cfg: Config) -> list[str]:
    """What a user should know about the data: the split's notes, clips all shorter than a chunk,
    classes left without a single usable chunk."""
    warnings = list(notes)
    if 0 < longest < cfg.audio.chunk_seconds:
        warnings.append(f"audio.chunk_seconds = {cfg.audio.chunk_seconds} is longer than every clip (the longest is "
                        f"{longest:.2f} s): each clip became one chunk, padded per audio.short_clip = "
                        f"{cfg.audio.short_clip!r}; a shorter chunk may suit this data better")
    for name in classes:
        if not any(splits[s]["class_counts"][name] for s in SPLITS):
            warnings.append(f"class {name!r} has no usable chunks at all: every file was skipped")
    return warnings


def build_manifest(*, input_path: str | Path, cfg: Config, classes: list[str], splits: dict[str, Any],
                   stats: TrainStats, skipped: ListFile, ignored: dict[str, int], warnings: list[str],
                   fingerprint: str, multilabel: bool = False) -> dict[str, Any]:
    """The manifest of one build (or part build: the caller adds `part`); `splits` and `skipped` name
    the list files (`write_lists`)."""
    norm = stats.normalization()
    return BuildRecord(classes=classes, features=FeatureParams.from_config(cfg), block_size=cfg.shards.block_size,
                       mean=norm["mean"], std=norm["std"], train_stats=stats.to_dict(),
                       splits={name: SplitInfo.from_dict(info) for name, info in splits.items()},
                       settings=build_settings(cfg.to_dict()), fingerprint=fingerprint, input=str(input_path),
                       skipped_file=skipped, ignored=ignored, warnings=warnings,
                       audioshard_version=__version__, multilabel=multilabel).to_dict()


def merge_manifests(out_dir: Path) -> dict[str, Any]:
    """One manifest over the finished part builds `out_dir/part-I-of-N/` (all N of one job); writes the
    merged list files into `out_dir` (the caller writes the manifest, last)."""
    parts = _finished_parts(out_dir)
    first = parts[0][1].data
    splits: dict[str, Any] = {}
    for split in SPLITS:
        merged: dict[str, Any] = {"shards": [], "samples": 0, "class_counts": Counter(), "recordings": Counter(),
                                  "audio_seconds": 0.0, "silent_chunks": 0}
        rows: list[dict[str, Any]] = []
        for folder, part in parts:
            info = part.data["splits"][split]
            for shard in info["shards"]:
                merged["shards"].append({**shard, "file": f"{folder}/{shard['file']}", "source_offset": len(rows)})
            merged["samples"] += info["samples"]
            merged["class_counts"].update(info["class_counts"])
            merged["recordings"].update(info["recordings"])
            merged["audio_seconds"] = round(merged["audio_seconds"] + info["audio_seconds"], 3)
            merged["silent_chunks"] += info["silent_chunks"]
            rows += part.recording_rows(split)  # checked against the part's manifest on the way
        merged["class_counts"] = {c: merged["class_counts"][c] for c in first["classes"]}
        merged["recordings"] = {c: merged["recordings"][c] for c in first["classes"]}
        merged["recordings_file"] = write_list_file(out_dir, RECORDINGS_PATTERN.format(split=split), rows).to_dict()
        splits[split] = merged
    stats = [part.data["train_stats"] for _, part in parts]
    train = TrainStats(*(sum(s[k] for s in stats) for k in ("sum", "sum_sq", "n")))
    if not train.n:
        raise BuildError(f"{out_dir}: nothing usable in the training split of any part")
    skipped = write_list_file(out_dir, SKIPPED_NAME, (row for _, part in parts for row in part.skipped))
    norm, record = train.normalization(), parts[0][1].record
    return dataclasses.replace(record, fingerprint=record.part["job"], part=None, mean=norm["mean"], std=norm["std"],
                               splits={name: SplitInfo.from_dict(info) for name, info in splits.items()},
                               train_stats=train.to_dict(), skipped_file=skipped,
                               warnings=sorted({w for _, part in parts for w in part.warnings}),
                               merged_from=[folder for folder, _ in parts]).to_dict()


def _finished_parts(out_dir: Path) -> list[tuple[str, Manifest]]:
    """The part builds of one job in `out_dir`, in part order, each read and checked as a build; refused
    unless all N are there, from the same job and written by this format version."""
    parts = []
    for path in sorted(out_dir.glob("part-*-of-*/" + MANIFEST_NAME)):
        try:  # read as every manifest is: a regular file, within the size and node budgets
            data = DEFAULT_FETCHER.read_json(str(path))
        except (SourceError, ValueError) as exn:
            raise BuildError(f"{path}: not a usable part build ({exn})") from exn
        if not isinstance(data, dict):
            raise BuildError(f"{path}: not a usable part build (not a JSON object)")
        if data.get("format_version") != FORMAT_VERSION or not isinstance(data.get("part"), dict):
            raise BuildError(f"{path}: a part build of another audioshard format (version "
                             f"{data.get('format_version')!r:.20}, this one writes {FORMAT_VERSION}); rebuild the "
                             "parts with this version")
        try:
            parts.append((path.parent.name, Manifest(data, str(path.parent))))
        except ManifestError as exn:
            raise BuildError(f"{path}: not a usable part build ({exn})") from exn
    if not parts:
        raise BuildError(f"{out_dir}: no finished part builds (part-I-of-N/{MANIFEST_NAME}) to merge")
    jobs = {part.data["part"]["job"] for _, part in parts}
    counts = {part.data["part"]["count"] for _, part in parts}
    if len(jobs) != 1 or len(counts) != 1:
        raise BuildError(f"{out_dir}: the parts come from different inputs, settings or part counts; "
                         "rebuild them with the same command")
    count = counts.pop()
    parts.sort(key=lambda item: item[1].data["part"]["index"])
    missing = sorted(set(range(count)) - {part.data["part"]["index"] for _, part in parts})
    if missing:
        raise BuildError(f"{out_dir}: parts {missing} of {count} are missing or unfinished; run "
                         + ", ".join(f"--part {i}/{count}" for i in missing))
    return parts
