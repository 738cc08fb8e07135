"""Look inside a build: the manifest as tables, one chunk as a picture, a few batches described.

What `audioshard info`, `show` and `check` print, as functions a script can call too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from pathlib import Path

import numpy as np

from audioshard.config import Config, ConfigError
from audioshard.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest
from audioshard.remote import DEFAULT_FETCHER
from audioshard.split import SPLITS


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                  strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_info(manifest: Manifest, where: str, verbose: bool = False) -> str:
    """A readable summary of a build: classes x splits (chunks and recordings), features, problems."""
    classes = manifest.classes
    splits = {s: manifest.split(s) for s in SPLITS if s in manifest.split_names}
    header = ["class"] + [f"{s} chunks (recs)" for s in splits]
    rows = [header]
    for name in classes:
        rows.append([name] + [f"{info.class_counts[name]} ({info.recordings[name]})" for info in splits.values()])
    rows.append(["total"] + [f"{info.samples} ({info.recording_count})" for info in splits.values()])
    f = manifest.features
    lines = [
        f"audioshard build at {where} (format v{manifest.format_version}, {len(classes)} classes)",
        "",
        _table(rows),
        "",
        "audio: " + ", ".join(f"{s} {info.audio_seconds / 60:.1f} min" for s, info in splits.items()),
        "shards: " + ", ".join(f"{s} {len(info.shards)}" for s, info in splits.items())
        + f" ({manifest.block_size} chunks per block)",
        f"features: {f.n_mels} mels x {f.frames} frames, {f.chunk_seconds} s chunks at {f.sample_rate} Hz, "
        f"n_fft {f.n_fft}, hop {f.hop_length}, {f.f_min:.0f}-{f.f_max:.0f} Hz, top_db {f.top_db}",
        f"normalisation (train): mean {manifest.mean:.2f} dB, std {manifest.std:.2f} dB",
    ]
    silent = {s: info.silent_chunks for s, info in splits.items()}
    if any(silent.values()):
        lines.append("silent chunks left out (audio.skip_silent): " + ", ".join(f"{s} {n}" for s, n in silent.items()))
    # The list of skipped inputs (a list file in version 2) is read only when there is something to show.
    skipped, ignored = manifest.skipped if manifest.skipped_count else [], manifest.ignored
    lines.append(f"skipped inputs: {len(skipped)}" + (f"; ignored: {', '.join(f'{v} {k}' for k, v in ignored.items())}"
                                                       if ignored else ""))
    for item in skipped if verbose else skipped[:10]:
        lines.append(f"  - {item['path']}: {item['reason']}")
    if not verbose and len(skipped) > 10:
        lines.append(f"  ... and {len(skipped) - 10} more (--verbose lists all)")
    lines += [f"warning: {warning}" for warning in manifest.warnings]
    if verbose:
        for info in splits.values():
            lines += [f"  {shard.file}: {shard.samples} chunks, {shard.bytes} bytes, sha256 {shard.sha256[:16]}..."
                      for shard in info.shards]
            if info.recordings_file is not None:
                listed = info.recordings_file
                lines.append(f"  {listed.file}: {listed.rows} recordings, {listed.bytes} bytes, "
                             f"sha256 {listed.sha256[:16]}...")
    return "\n".join(lines)


def show_chunk(source: str, split: str, index: int, out: str | Path, fetcher=None) -> str:
    """Plot chunk `index` of a split (in shard order) with its label, source recording and start time.
    `fetcher`: how build files are read (`Config.fetcher()`: [shards] timeouts, retries, cache)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from audioshard.stream import ShardStream

    manifest = load_manifest(source, fetcher or DEFAULT_FETCHER)
    total = manifest.samples(split)
    if not 0 <= index < total:
        raise ConfigError(f"--index {index} is out of range: the {split} split has {total} chunks (0 to {total - 1})")
    seen = 0
    for batch in ShardStream(manifest, split, batch_size=manifest.block_size):
        if index < seen + len(batch.y):
            i = index - seen
            mel, label = batch.x[i, 0].float().numpy(), _class_names(manifest, batch.y[i])
            rec, start = manifest.sources(split)[int(batch.source[i])], float(batch.start[i])
            break
        seen += len(batch.y)
    f = manifest.features
    fig, ax = plt.subplots(figsize=(8, 4))
    image = ax.imshow(mel, origin="lower", aspect="auto", cmap="magma",
                      extent=(start, start + f.chunk_seconds, 0, f.n_mels))
    fig.colorbar(image, ax=ax, label="dB")
    ax.set_xlabel("time in recording (s)")
    ax.set_ylabel("mel bin")
    ax.set_title(f"{split}[{index}]: {label[:40]} — {rec[-80:]} @ {start:.2f} s", fontsize=9, parse_math=False,
                 usetex=False)  # names as text, never math: `$...$` in them raised at savefig
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return f"{split}[{index}]: label {label}, source {rec}, start {start:.2f} s, shape {mel.shape} -> {out}"


def check_pipeline(source: str, split: str, cfg: Config, batches: int = 3) -> str:
    """Pull a few batches through the real pipeline (normalised, augmented if train) and describe them: the
    manifest read once, and every file read as `train` reads it (cfg's [shards] timeouts, retries, cache)."""
    from audioshard.loader import open_shards

    manifest = load_manifest(source, cfg.fetcher())
    loader = open_shards(manifest, split, batch_size=cfg.train.batch_size, num_workers=0, seed=cfg.train.seed,
                         augment_config=cfg.augment, shuffle_blocks=cfg.train.shuffle_blocks)
    lines = [f"{source} [{split}]: {manifest.samples(split)} chunks, {len(loader)} batches of "
             f"{cfg.train.batch_size} per epoch"]
    labels: Counter = Counter()
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        x = batch.x
        labels.update(name for y in batch.y for name in _class_names(manifest, y).split(";"))
        lines.append(f"batch {i}: x {tuple(x.shape)} {x.dtype} min {x.min():.2f} max {x.max():.2f} "
                     f"mean {x.mean():.2f} std {x.std():.2f} | y {tuple(batch.y.shape)} {batch.y.dtype} "
                     f"| finite {bool(np.isfinite(x.numpy()).all())}")
    lines.append("label mix: " + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))
    return "\n".join(lines)


def _class_names(manifest: Manifest, y) -> str:
    """A chunk's class, or a multi-label chunk's classes joined by `;`."""
    if y.dim() == 0:
        return manifest.classes[int(y)]
    return ";".join(name for name, on in zip(manifest.classes, y.tolist(), strict=True) if on)


def _verify_lists(manifest: Manifest, problems: list[str]) -> int:
    """Read every list file of a version-2 build (size, sha256, then each row), adding what is wrong to
    `problems`; returns how many there are."""
    if manifest.format_version == 1:
        return 0
    reads = [functools.partial(manifest.recording_rows, split) for split in manifest.split_names]
    for read in [*reads, lambda: manifest.skipped]:
        try:
            read()
        except ManifestError as exn:
            problems.append(str(exn))
    return len(reads) + 1


def verify_build(source: str, fetcher=None) -> tuple[bool, str]:
    """Check every shard of a build against its manifest: size, sha256, and every block's contents.

    Returns:
        (all good, a report naming each bad shard and why)
    """
    from audioshard.remote import SourceError
    from audioshard.shardfile import ShardDataError
    from audioshard.stream import ShardStream, block_sizes

    # sha256 always, whatever shards.verify_local says and whatever was verified before: checking is what
    # this command is for.
    manifest = load_manifest(source, dataclasses.replace(fetcher or DEFAULT_FETCHER, verify_local=True,
                                                         remember_verified=False))
    problems: list[str] = []
    checked = 0
    for split in manifest.split_names:
        for shard in manifest.shards(split):
            checked += 1
            # One read per shard through the real reader: size and sha256, then every block and the counts.
            single = ShardStream(manifest, split, batch_size=max(block_sizes(shard, manifest.block_size) or [1]),
                                 strict=True, shards=[shard])
            try:
                for _ in single:
                    pass
            except (ShardDataError, SourceError) as exn:
                problems.append(str(exn))
    lists = _verify_lists(manifest, problems)
    header = f"{source}: {checked} shards" + (f" and {lists} list files" if lists else "") + f" checked against " \
        f"{MANIFEST_NAME}"
    if not problems:
        return True, f"{header}: all sizes, sha256 checksums, blocks and counts match"
    return False, "\n".join([f"{header}: {len(problems)} problem(s)", *[f"  - {p}" for p in problems]])
