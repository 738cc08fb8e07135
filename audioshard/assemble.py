"""Assemble a build's manifest: what each split holds, tallied as the decoded files arrive, and the
manifest written over it; and one manifest over the manifests of part builds (`build --merge`)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audioshard import __version__
from audioshard.acquire.common import provenance_rows
from audioshard.config import Config
from audioshard.errors import BuildError
from audioshard.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, ShardInfo, SplitInfo
from audioshard.names import SPLITS
from audioshard.params import FeatureParams


@dataclass
class SplitTally:
    """One split's recordings (in write order: a chunk's `source` indexes this list), chunk and
    recording counts per class, seconds of audio and silent chunks left out."""

    sources: list[str] = field(default_factory=list)
    class_counts: Counter = field(default_factory=Counter)
    recordings: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    silent_chunks: int = 0

    def add(self, rel: str, label: str, chunks: int, seconds: float, silent: int) -> int:
        """Count one recording; returns its index in `sources`."""
        self.sources.append(rel)
        self.class_counts[label] += chunks
        self.recordings[label] += 1
        self.seconds += seconds
        self.silent_chunks += silent
        return len(self.sources) - 1

    def to_dict(self, shards: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
        """The split's entry in manifest.json (`manifest.SplitInfo`, the one description of it)."""
        return SplitInfo(shards=[ShardInfo(**s) for s in shards], samples=sum(s["samples"] for s in shards),
                         class_counts={c: self.class_counts[c] for c in classes},
                         recordings={c: self.recordings[c] for c in classes}, audio_seconds=round(self.seconds, 3),
                         sources=self.sources, silent_chunks=self.silent_chunks).to_dict()


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


def build_manifest(*, input_path: str | Path, rels: list[str], cfg: Config, classes: list[str],
                   splits: dict[str, Any], stats: TrainStats, skipped: list[dict[str, str]],
                   ignored: dict[str, int], warnings: list[str], fingerprint: str) -> dict[str, Any]:
    """The manifest of one build (or part build: the caller adds `part`)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "audioshard_version": __version__,
        "fingerprint": fingerprint,
        "input": str(input_path),
        "classes": classes,
        "features": FeatureParams.from_config(cfg).to_dict(),
        "block_size": cfg.shards.block_size,
        "normalization": stats.normalization(),
        "train_stats": stats.to_dict(),
        "splits": splits,
        "skipped": skipped,
        "ignored": ignored,
        "warnings": warnings,
        "config": cfg.to_dict(),
        # Where each input came from (RAW/sources.csv, written by `audioshard fetch`); same in every part.
        "provenance": provenance_rows(input_path, rels),
    }


def merge_manifests(out_dir: Path) -> dict[str, Any]:
    """One manifest over the finished part builds `out_dir/part-I-of-N/` (all N of one job)."""
    parts = []
    for path in sorted(out_dir.glob("part-*-of-*/" + MANIFEST_NAME)):
        parts.append((path.parent.name, json.loads(path.read_text(encoding="utf-8"))))
    if not parts:
        raise BuildError(f"{out_dir}: no finished part builds (part-I-of-N/{MANIFEST_NAME}) to merge")
    jobs = {data["part"]["job"] for _, data in parts}
    counts = {data["part"]["count"] for _, data in parts}
    if len(jobs) != 1 or len(counts) != 1:
        raise BuildError(f"{out_dir}: the parts come from different inputs, settings or part counts; "
                         "rebuild them with the same command")
    count = counts.pop()
    parts.sort(key=lambda item: item[1]["part"]["index"])
    missing = sorted(set(range(count)) - {data["part"]["index"] for _, data in parts})
    if missing:
        raise BuildError(f"{out_dir}: parts {missing} of {count} are missing or unfinished; run "
                         + ", ".join(f"--part {i}/{count}" for i in missing))
    first = parts[0][1]
    splits: dict[str, Any] = {}
    for split in SPLITS:
        merged: dict[str, Any] = {"shards": [], "samples": 0, "class_counts": Counter(), "recordings": Counter(),
                                  "audio_seconds": 0.0, "silent_chunks": 0, "sources": []}
        for folder, data in parts:
            info = data["splits"][split]
            for shard in info["shards"]:
                merged["shards"].append({**shard, "file": f"{folder}/{shard['file']}",
                                         "source_offset": len(merged["sources"])})
            merged["samples"] += info["samples"]
            merged["class_counts"].update(info["class_counts"])
            merged["recordings"].update(info["recordings"])
            merged["audio_seconds"] = round(merged["audio_seconds"] + info["audio_seconds"], 3)
            merged["silent_chunks"] += info.get("silent_chunks", 0)
            merged["sources"] += info["sources"]
        merged["class_counts"] = {c: merged["class_counts"][c] for c in first["classes"]}
        merged["recordings"] = {c: merged["recordings"][c] for c in first["classes"]}
        splits[split] = merged
    stats = [data["train_stats"] for _, data in parts]
    train = TrainStats(*(sum(s[k] for s in stats) for k in ("sum", "sum_sq", "n")))
    if not train.n:
        raise BuildError(f"{out_dir}: nothing usable in the training split of any part")
    manifest = {**first, "fingerprint": jobs.pop(), "splits": splits, "normalization": train.normalization(),
                "train_stats": train.to_dict(),
                "skipped": [s for _, data in parts for s in data["skipped"]],
                "warnings": sorted({w for _, data in parts for w in data["warnings"]}),
                "merged_from": [folder for folder, _ in parts]}
    manifest.pop("part")
    return manifest

