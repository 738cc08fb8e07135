"""Build shards once: raw audio -> chunks -> log-mel -> leak-free split -> WebDataset tars + manifest.

    audioshard build RAW_DIR --out shards/            # one subfolder per class
    audioshard build files.csv --out shards/          # columns path,label[,group][,split]

Each tar member group ("block") holds up to `shards.block_size` chunks as one array per field
(`mel.npy` float16 (N, n_mels, frames), `label.npy` int16, `source.npy` int32 index into the
split's `sources`, `start.npy` float32 seconds): tar overhead is paid once per block instead of
once per chunk, which is what lets the stream run far faster than one chunk per member, and the
files stay standard tars that webdataset reads. Output is byte-identical for any worker count.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audioshard.assemble import (
    SplitTally,
    TrainStats,
    build_manifest,
    build_warnings,
    merge_manifests,
    origins,
    write_lists,
)
from audioshard.audio import AudioError, ChunkRules, cut_chunks, load, peak_amplitude, silent_chunks
from audioshard.config import Config
from audioshard.errors import BuildError
from audioshard.features import FeatureParams, log_mel
from audioshard.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    RECORDINGS_PATTERN,
    SKIPPED_NAME,
    block_problem,
    write_json_atomic,
)
from audioshard.names import SPLITS
from audioshard.parallel import ordered_map
from audioshard.progress import progress as progress_bar
from audioshard.split import Source, group_of, split_sources
from audioshard.writer import SplitWriter

MARKER_NAME = ".audioshard-build"
STAGING_NAME = ".staging"  # a build writes here first; shards move into place only when all are written


@dataclass
class Discovery:
    """What `discover` found in the input: usable sources, skipped files and ignored ones."""

    sources: list[Source]
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)


def _files_under(folder: str, found: Discovery) -> list[tuple[str, ...]]:
    """Every file below `folder` as a tuple of path parts relative to it, sorted the way pathlib sorts
    paths. Symlinks to files count; symlinked folders are not entered (as `Path.rglob`). Broken
    links are counted in `found.ignored`, folders that cannot be read named in `found.warnings`.

    One `os.scandir` per folder instead of `rglob` + `is_file` + `resolve` per file: the directory
    entries already say what is a file, and every build spends this time before any worker can start."""
    files: list[tuple[str, ...]] = []
    pending: list[tuple[str, ...]] = [()]
    while pending:
        parts = pending.pop()
        where = os.path.join(folder, *parts)
        try:
            with os.scandir(where) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((*parts, entry.name))
                    elif entry.is_file():  # follows a symlink
                        files.append((*parts, entry.name))
                    elif entry.is_symlink() and not entry.is_dir():  # points at nothing (or at nothing readable)
                        found.ignored["broken symlinks"] += 1
        except OSError as exn:  # e.g. no permission: say so, since its files would silently be missing
            found.warnings.append(f"folder {where} could not be read ({exn.strerror or exn}); its files are "
                                  "left out. Fix its permissions and build again")
    return sorted(files)


def discover(input_path: str | Path, cfg: Config) -> Discovery:
    """List the recordings of a class-per-folder tree or a CSV manifest.

    Hidden files/folders and files without an audio extension are ignored and counted; class
    folders with no audio file are reported and left out.
    """
    input_path = Path(input_path)
    if input_path.is_file() and input_path.suffix.lower() == ".csv":
        return _discover_csv(input_path, cfg)
    if not input_path.is_dir():
        raise BuildError(f"{input_path}: not a folder or a .csv file. Give a folder with one subfolder per class "
                         "(e.g. raw/drone/*.wav, raw/car/*.wav) or a CSV with columns path,label")
    extensions = {e.lower() for e in cfg.audio.extensions}
    found = Discovery(sources=[])
    root = str(input_path.resolve())
    with os.scandir(root) as entries:
        top = sorted(entries, key=lambda entry: entry.name)
    class_names = [e.name for e in top if e.is_dir() and not e.name.startswith(".")]
    outside = sum(1 for e in top if e.is_file() and e.name != "sources.csv")
    if outside:
        found.ignored["files outside class folders"] = outside
    if not class_names:
        raise BuildError(f"{input_path}: no class subfolders. Put each class's recordings in its own folder, "
                         "e.g. raw/drone/*.wav and raw/car/*.wav, or pass a CSV with columns path,label")
    for name in class_names:
        count = 0
        for parts in _files_under(os.path.join(root, name), found):
            suffix = os.path.splitext(parts[-1])[1].rstrip(".")  # as Path.suffix: "a." has none
            if any(part.startswith(".") for part in parts):
                found.ignored["hidden files"] += 1
            elif suffix.lower() not in extensions:
                found.ignored[f"non-audio files ({suffix or 'no extension'})"] += 1
            else:
                rel = "/".join((name, *parts))
                found.sources.append(Source(os.path.join(root, name, *parts), rel, name,
                                            group_of(rel, cfg.split.group_regex)))
                count += 1
        if count == 0:
            found.warnings.append(f"class folder {input_path / name} has no audio files (extensions: "
                                  f"{', '.join(sorted(extensions))}); class {name!r} is left out")
    if not cfg.split.group_regex:
        found.sources = _group_by_origin(input_path, found.sources)
    return found


def _group_by_origin(input_path: Path, sources: list[Source]) -> list[Source]:
    """Files fetched from one video (several segments of it) form one group, per RAW/sources.csv,
    so that no recording straddles two splits."""
    listing = input_path / "sources.csv"
    if not listing.is_file():
        return sources
    with open(listing, newline="", encoding="utf-8-sig") as stream:
        origin = {row["path"]: f"{row.get('extractor', '')}:{row['id']}" for row in csv.DictReader(stream)
                  if row.get("path") and row.get("id")}
    return [dataclasses.replace(s, group=origin[s.rel]) if s.rel in origin else s for s in sources]


def _discover_csv(csv_path: Path, cfg: Config) -> Discovery:
    """The rows of a CSV manifest. Rows naming a file outside the CSV's folder (after `..` and links) are refused
    unless `shards.csv_allow_outside` is set: a CSV from someone else must not pull other files of this machine
    into a build that may be published. That test comes first and needs no file, so the skip reasons do not tell
    which paths outside exist."""
    found = Discovery(sources=[])
    lines: list[int] = []  # the CSV line of each source
    folder, outside = Path(os.path.realpath(csv_path.parent)), 0
    with open(csv_path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        columns = set(reader.fieldnames or [])
        if not {"path", "label"} <= columns:
            raise BuildError(f"{csv_path}: needs columns 'path' and 'label' (optional 'group', 'split'); "
                             f"found {sorted(columns)}")
        for line, row in enumerate(reader, start=2):
            rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            split = (row.get("split") or "").strip() or None
            if not rel or not label:
                found.skipped.append({"path": rel or f"{csv_path.name}:{line}",
                                      "reason": f"{csv_path.name} line {line}: empty path or label"})
                continue
            if split is not None and split not in SPLITS:
                found.skipped.append({"path": rel, "reason": f"{csv_path.name} line {line}: split {split!r} is not "
                                      f"one of {', '.join(SPLITS)}"})
                continue
            path = Path(rel) if Path(rel).is_absolute() else csv_path.parent / rel
            if not cfg.shards.csv_allow_outside and not Path(os.path.realpath(path)).is_relative_to(folder):
                outside += 1
                found.skipped.append({"path": rel, "reason": f"{csv_path.name} line {line}: outside the CSV's folder; "
                                      "refused (shards.csv_allow_outside = true uses such rows)"})
                continue
            if not path.is_file():
                found.skipped.append({"path": rel, "reason": f"{csv_path.name} line {line}: file not found ({path})"})
                continue
            group = (row.get("group") or "").strip() or group_of(rel, cfg.split.group_regex)
            found.sources.append(Source(str(path.resolve()), rel, label, group, split))
            lines.append(line)
    if outside:
        found.warnings.append(f"{outside} rows of {csv_path.name} name files outside its folder {folder} and were "
                              "refused (a CSV must not pull in other files of this machine); if the CSV is yours, "
                              "set shards.csv_allow_outside = true (--set shards.csv_allow_outside=true)")
    return _drop_duplicates(found, lines, csv_path.name)


def _drop_duplicates(found: Discovery, lines: list[int], name: str) -> Discovery:
    """One recording listed twice is used once; listed with two labels it is not used at all (which label
    is right is for the CSV's author to say). Each dropped row is reported with its line."""
    first: dict[str, tuple[int, Source]] = {}
    labels: dict[str, set[str]] = {}
    for line, source in zip(lines, found.sources, strict=True):
        first.setdefault(source.path, (line, source))
        labels.setdefault(source.path, set()).add(source.label)
    kept = []
    for line, source in zip(lines, found.sources, strict=True):
        first_line = first[source.path][0]
        if len(labels[source.path]) > 1:
            found.skipped.append({"path": source.rel, "reason": f"{name} line {line}: the same file is listed with "
                                  f"labels {', '.join(sorted(labels[source.path]))}; give it one label"})
        elif first_line != line:
            found.skipped.append({"path": source.rel, "reason": f"{name} line {line}: the same file as line "
                                  f"{first_line} (used once)"})
        else:
            kept.append(source)
    found.sources = kept
    return found


@dataclass
class FileResult:
    """One recording after decoding: its chunks' features, or why it was skipped."""

    rel: str
    mel: np.ndarray | None = None  # (C, n_mels, frames) float16
    starts: np.ndarray | None = None  # (C,) seconds
    seconds: float = 0.0
    error: str | None = None
    stats: tuple[float, float, int] = (0.0, 0.0, 0)  # sum, sum of squares, count of the mel values (train only)
    silent_chunks: int = 0  # chunks left out as silent (audio.skip_silent)


FILES_PER_TASK = 8  # files a worker claims at a time: fewer round trips, a few files to batch
FEATURE_BATCH = 16  # chunks, from one or several files, featurised in one log_mel call


def process_files(sources: list[tuple[Source, bool]], cfg: Config) -> list[FileResult]:
    """Decode, resample, chunk and featurise a few files in a row (one task, in any build process).

    Their chunks go through `log_mel` together, FEATURE_BATCH at a time: most recordings give only
    a few chunks, and a call's fixed cost (torch dispatch) paid per file was a large share of a
    build of short clips. A long file is featurised on its own right away, so memory stays at one
    file plus a batch. The features of a chunk do not depend on its batch-mates (checked byte for
    byte in the tests). The flag beside each source asks for the sums behind the train split's
    mean/std, computed here so the main process stays light."""
    params = FeatureParams.from_config(cfg)
    results: list[FileResult] = []
    pending: list[tuple[FileResult, np.ndarray, bool]] = []  # decoded, not yet featurised

    def featurise() -> None:
        chunks = pending[0][1] if len(pending) == 1 else np.concatenate([c for _, c, _ in pending])
        mel = log_mel(chunks, params)
        first = 0
        for result, part, want_stats in pending:
            result.mel = mel[first:first + len(part)]
            first += len(part)
            if want_stats:
                values = result.mel.astype(np.float64).ravel()
                # einsum, not np.dot: np.dot is BLAS, whose own thread pool (OpenBLAS: one thread per core,
                # spinning between calls) in every build process took the cores from the other processes:
                # a 2-worker build of 637 files took 1.2-2.0 s instead of 0.4 s (docs/benchmarks.md)
                result.stats = (float(values.sum()), float(np.einsum("i,i->", values, values)), values.size)
        pending.clear()

    for source, want_stats in sources:
        result, chunks = _decode_and_cut(source, cfg, params)
        results.append(result)
        if chunks is not None:
            pending.append((result, chunks, want_stats))
            if sum(len(c) for _, c, _ in pending) >= FEATURE_BATCH:
                featurise()
    if pending:
        featurise()
    return results


def _decode_and_cut(source: Source, cfg: Config, params: FeatureParams) -> tuple[FileResult, np.ndarray | None]:
    """One file's chunks (C, chunk_samples) and its result so far, or the result saying why it is skipped."""
    try:
        samples = load(source.path, params.sample_rate)
    except AudioError as exn:
        return FileResult(source.rel, error=str(exn)), None
    except Exception as exn:  # noqa: BLE001 - a decoder bug on one odd file must not end a long build
        return FileResult(source.rel, error=f"{source.rel}: could not be decoded ({type(exn).__name__}: {exn}); "
                          "skipped. Convert it to WAV or FLAC (e.g. with ffmpeg) if you need it"), None
    seconds = len(samples) / params.sample_rate
    peak = peak_amplitude(samples)
    if cfg.audio.skip_silent and peak < cfg.audio.silence_peak:
        return FileResult(source.rel, seconds=seconds, error=f"{source.rel}: silent (peak {peak:.1e} < "
                          f"audio.silence_peak {cfg.audio.silence_peak})"), None
    chunks, starts = cut_chunks(samples, ChunkRules.from_config(cfg))
    if len(chunks) == 0:
        return FileResult(source.rel, seconds=seconds,
                          error=f"{source.rel}: {seconds:.2f} s is shorter than one chunk "
                                f"({cfg.audio.chunk_seconds} s) and audio.short_clip = {cfg.audio.short_clip!r}"), None
    dropped = 0
    if cfg.audio.skip_silent:
        # A silent chunk (a clip padded to length, a gap) carries its recording's label but nothing of
        # the class: noise for training, and a pull towards "silence" in a recording's mean. Kept only
        # when the recording has nothing else (its sound may sit in a tail too short to be a chunk).
        silent = silent_chunks(chunks, cfg.audio.silence_peak)
        if not silent.all():
            dropped = int(silent.sum())
            chunks, starts = chunks[~silent], starts[~silent]
    return FileResult(source.rel, starts=starts.astype(np.float32), seconds=seconds, silent_chunks=dropped), chunks


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    up_to_date: bool = False


def _job_id(sources: list[Source], cfg: Config) -> str:
    """What a build is made of, the same on every machine: the settings that shape the output and each input's
    name, label, group, split and size. Part builds of one job carry it, and only parts with the same one merge:
    copies of the input made at different times (a download, `aws s3 sync`) are the same job."""
    settings = cfg.to_dict()
    settings["shards"] = {k: settings["shards"][k] for k in ("block_size", "chunks_per_shard")}  # what shapes output
    settings = {k: settings[k] for k in ("audio", "features", "split", "shards")}
    files = [(s.rel, s.label, s.group, s.split, os.stat(s.path).st_size) for s in sources]
    blob = json.dumps({"settings": settings, "files": files, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _fingerprint(sources: list[Source], cfg: Config) -> str:
    """The job's inputs and settings and when each input was last written here, so a re-run with nothing
    changed does nothing and a file edited in place (same size) is built again."""
    settings = cfg.to_dict()
    settings["shards"] = {k: settings["shards"][k] for k in ("block_size", "chunks_per_shard")}  # what shapes output
    files = []
    for s in sources:
        stat = os.stat(s.path)
        files.append((s.rel, s.label, s.group, s.split, stat.st_size, stat.st_mtime_ns))
    settings = {k: settings[k] for k in ("audio", "features", "split", "shards")}
    blob = json.dumps({"settings": settings, "files": files, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def own_outputs(out_dir: Path) -> list[Path]:
    """Files a build writes into `out_dir` (and `clean` removes)."""
    paths = [p for split in SPLITS for p in out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")]
    names = [MANIFEST_NAME, *(RECORDINGS_PATTERN.format(split=split) for split in SPLITS), SKIPPED_NAME]
    paths += [out_dir / name for name in (*names, MARKER_NAME) if (out_dir / name).exists()]
    paths += [path for name in names for path in out_dir.glob(f".{name}.*.tmp")]  # left by a killed writer
    return sorted(paths)


def clean(out_dir: str | Path) -> list[Path]:
    """Remove what a build wrote in `out_dir`; refuse folders that are not audioshard outputs."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BuildError(f"{out_dir}: no such folder")
    if not (out_dir / MANIFEST_NAME).exists() and not (out_dir / MARKER_NAME).exists():
        raise BuildError(f"{out_dir}: does not look like an audioshard build (no {MANIFEST_NAME} or {MARKER_NAME}); "
                         "refusing to delete anything there")
    with locked(out_dir):
        removed = own_outputs(out_dir)
        for path in removed:
            path.unlink()
    for part_dir in sorted(out_dir.glob("part-*-of-*")):  # part builds of a job array
        if part_dir.is_symlink():  # a link to another build's folder: that build is not ours to delete
            continue
        if part_dir.is_dir() and ((part_dir / MANIFEST_NAME).exists() or (part_dir / MARKER_NAME).exists()):
            removed += clean(part_dir)
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
    return removed


def _prepare_out_dir(out_dir: Path, fingerprint: str, force: bool) -> bool:
    """Make `out_dir` ready; returns True when it already holds this exact build."""
    manifest_path, marker = out_dir / MANIFEST_NAME, out_dir / MARKER_NAME
    if out_dir.exists() and any(out_dir.iterdir()):
        if manifest_path.exists() and not force:
            try:
                done = json.loads(manifest_path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
            except ValueError:
                done = False
            if done:
                return True
            raise BuildError(f"{out_dir} already holds a different build (other inputs or settings). "
                             f"Use --force to replace it, or `audioshard clean {out_dir}` first")
        if not force and not marker.exists():
            raise BuildError(f"{out_dir} is not empty and is not an audioshard build; choose an empty or new "
                             "folder, or pass --force to write into it anyway")
        # --force, or an interrupted build (marker, no manifest): build anew; old outputs go at commit.
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        marker.write_text(json.dumps({"fingerprint": fingerprint, "started": time.time()}), encoding="utf-8")
    except OSError as exn:
        raise BuildError(f"cannot start a build in {out_dir} ({exn.strerror or exn}); nothing was replaced. "
                         "Free some space (or fix the permission) and run the same command again") from exn
    return False


def build_shards(input_path: str | Path, out_dir: str | Path, cfg: Config, workers: int | None = None,
                 force: bool = False, progress: bool = True, part: tuple[int, int] | None = None) -> BuildResult:
    """Build train/val/test shards and `manifest.json` from a class-folder tree or CSV.

    Args:
        input_path: folder with one subfolder per class, or a CSV with columns path,label[,group][,split].
        out_dir: output folder (created); refused if it holds something else, unless `force`.
        workers: decoding processes (None: `shards.workers`, 0 there meaning all cores).
        part: (I, N) builds only part I of N into `out_dir/part-I-of-N/` (for job arrays on many
            machines); the split is still decided from the whole file list. `merge_parts(out_dir)`
            then writes one manifest over all parts.

    Returns:
        BuildResult with the manifest as written (or as found, when the build was already up to date).
    """
    out_dir = Path(out_dir)
    if problem := block_problem(cfg.shards.block_size, FeatureParams.from_config(cfg)):
        raise BuildError(f"these settings would make shards no reader accepts: {problem}")  # before any work
    found = discover(input_path, cfg)
    if not found.sources:
        raise BuildError(f"{input_path}: no usable audio files found "
                         f"({sum(found.ignored.values())} ignored, {len(found.skipped)} skipped)"
                         + "".join(f"; {warning}" for warning in found.warnings[:3]))
    job, fingerprint = _job_id(found.sources, cfg), _fingerprint(found.sources, cfg)
    if part is not None:
        index, count = part
        if not 0 <= index < count:
            raise BuildError(f"--part {index}/{count}: expected 0 <= I < N")
        out_dir = out_dir / f"part-{index}-of-{count}"
        fingerprint = f"{fingerprint}-part-{index}-of-{count}"
    with locked(out_dir):
        if _prepare_out_dir(out_dir, fingerprint, force):
            manifest = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
            return BuildResult(out_dir, manifest, up_to_date=True)

        staging = out_dir / STAGING_NAME
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted build
        staging.mkdir()
        try:
            manifest = _build_into(staging, input_path, found, cfg, workers, progress, part, fingerprint, job)
        except BaseException as exn:  # the previous build (if any) stays intact
            shutil.rmtree(staging, ignore_errors=True)
            (out_dir / MARKER_NAME).unlink(missing_ok=True)
            if not isinstance(exn, OSError):
                raise
            where = f" ({exn.filename})" if exn.filename else ""
            raise BuildError(f"writing the build failed{where}: {exn.strerror or exn}; nothing in {out_dir} was "
                             "replaced. Free some space (or fix the permission) and run the same command again"
                             ) from exn
        try:
            _commit(out_dir, staging, manifest)
        except OSError as exn:  # no manifest is written unless the commit completes: the next run rebuilds
            raise BuildError(f"writing the build into {out_dir} failed at the end ({exn.strerror or exn}); it has "
                             "no manifest now. Free some space and run the same command again") from exn
        return BuildResult(out_dir, manifest)


@contextlib.contextmanager
def locked(out_dir: Path):
    """Hold an exclusive flock on the folder itself while a build (or merge, or clean) works in it: a
    second one fails at once instead of writing a manifest that describes the other's shards. A lock on
    the folder leaves no file behind, and the kernel releases it when the process dies (never stale)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"{out_dir}: another audioshard build, merge or clean is working in this folder now; "
                             "wait for it to finish, or choose another --out") from None
        except OSError:  # a file system without flock on folders (some NFS): go on unlocked, as before
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _build_into(staging: Path, input_path: str | Path, found: Discovery, cfg: Config, workers: int | None,
                progress: bool, part: tuple[int, int] | None, fingerprint: str, job: str) -> dict[str, Any]:
    """Decode, featurise and write every shard into `staging`; returns the manifest to commit."""
    assignment, split_notes = split_sources(found.sources, cfg.split.val_fraction, cfg.split.test_fraction,
                                            cfg.split.seed)
    classes = sorted({s.label for s in found.sources})
    jobs = _write_order(found.sources, assignment, cfg.split.seed)
    if part is not None:
        jobs = jobs[part[0]::part[1]]  # disjoint parts, each in the one-shot build's order
    packer = _Packer(staging, found, assignment, classes, cfg)
    workers = max(1, (workers if workers is not None else cfg.shards.workers) or os.cpu_count() or 1)
    tasks = [jobs[i:i + FILES_PER_TASK] for i in range(0, len(jobs), FILES_PER_TASK)]
    results = ordered_map(functools.partial(process_files, cfg=cfg), tasks, workers)
    bar = progress_bar(len(jobs), "build", "file", enabled=progress)
    try:
        for result in results:
            bar.update(1)
            packer.add(result)
            bar.set_postfix_str(f"{packer.audio_hours:.2f} h audio, {len(packer.skipped)} skipped", refresh=False)
        bar.close()
        shards_of = packer.close()
    except BaseException:
        bar.close()
        results.close()  # stops the helper processes now, not whenever the generator is collected
        packer.abort()  # close half-written tars quietly; the caller discards the staging folder
        raise
    if not packer.stats.n and part is None:
        raise BuildError(f"{input_path}: nothing usable in the training split: all {len(packer.skipped)} inputs were "
                         "skipped (see the reasons above) or none were assigned to train")
    lists = write_lists(staging, packer.tallies, packer.skipped, origins(input_path, [s.rel for s in found.sources]))
    splits = {split: packer.tallies[split].to_dict(shards_of[split], classes, lists[split]) for split in SPLITS}
    manifest = build_manifest(input_path=input_path, cfg=cfg, classes=classes, splits=splits, stats=packer.stats,
                              skipped=lists["skipped"], ignored=dict(found.ignored),
                              warnings=build_warnings(list(found.warnings) + split_notes, classes, splits,
                                                      packer.longest, cfg),
                              fingerprint=fingerprint)
    if part is not None:
        manifest["part"] = {"index": part[0], "count": part[1], "job": job}
    return manifest


def _write_order(sources: list[Source], assignment: dict[str, str], seed: int) -> list[tuple[Source, bool]]:
    """(source, is_train) per split, recordings in a seeded random order, so each shard mixes classes."""
    rng = np.random.default_rng(seed)
    jobs = []
    for split in SPLITS:
        members = [s for s in sources if assignment[s.rel] == split]
        jobs += [(members[i], split == "train") for i in rng.permutation(len(members))]
    return jobs


class _Packer:
    """Routes each decoded file to its split's shard writer and tallies what the manifest reports."""

    def __init__(self, staging: Path, found: Discovery, assignment: dict[str, str], classes: list[str],
                 cfg: Config):
        self.writers = {split: SplitWriter(staging, split, cfg.shards.block_size, cfg.shards.chunks_per_shard)
                        for split in SPLITS}
        self.tallies = {split: SplitTally() for split in SPLITS}
        self.stats = TrainStats()
        self.skipped = list(found.skipped)
        self.assignment = assignment
        self.label_of = {s.rel: s.label for s in found.sources}
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.audio_hours = self.longest = 0.0

    def add(self, result: FileResult) -> None:
        self.audio_hours += result.seconds / 3600
        if result.error:
            self.skipped.append({"path": result.rel, "reason": result.error})
            return
        self.longest = max(self.longest, result.seconds)
        split, label = self.assignment[result.rel], self.label_of[result.rel]
        index = self.tallies[split].add(result.rel, label, len(result.mel), result.seconds, result.silent_chunks)
        self.writers[split].add(result.mel, self.class_index[label], index, result.starts)
        self.stats.add(result.stats)

    def close(self) -> dict[str, list[dict[str, Any]]]:
        return {split: self.writers[split].close() for split in SPLITS}

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()

def _commit(out_dir: Path, staging: Path, manifest: dict[str, Any]) -> None:
    """Swap the staged shards in: old manifest out first, new shards in, new manifest last."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # from here on no manifest can describe mixed files
    for path in own_outputs(out_dir):
        if path.name != MARKER_NAME:
            path.unlink()
    for path in sorted(staging.iterdir()):
        os.replace(path, out_dir / path.name)
    staging.rmdir()
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)  # the commit point: written last
    (out_dir / MARKER_NAME).unlink(missing_ok=True)


def merge_parts(out_dir: str | Path) -> dict[str, Any]:
    """Write `out_dir/manifest.json` over the part builds `out_dir/part-I-of-N/` (all N must be complete).

    Shards stay where the parts wrote them (the manifest names them `part-I-of-N/train-000000.tar`);
    each shard records the offset of its part's sources in the merged `sources` list.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BuildError(f"{out_dir}: no such folder (the --out of the part builds)")
    with locked(out_dir):
        manifest = merge_manifests(out_dir)
        write_json_atomic(out_dir / MANIFEST_NAME, manifest)
        return manifest


