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
import ctypes
import dataclasses
import fcntl
import gc
import hashlib
import io
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from audioshard import __version__
from audioshard.acquire.common import provenance_rows
from audioshard.audio import AudioError, choppinator, load, peak_amplitude, silent_chunks
from audioshard.config import Config
from audioshard.errors import AudioshardError
from audioshard.features import FeatureParams, log_mel
from audioshard.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, block_problem, write_json_atomic
from audioshard.names import SPLITS
from audioshard.split import Source, group_of, split_sources

MARKER_NAME = ".audioshard-build"
STAGING_NAME = ".staging"  # a build writes here first; shards move into place only when all are written
SHARD_PATTERN = "{split}-{index:06d}.tar"


class BuildError(AudioshardError, RuntimeError):
    """The build cannot go on (bad input folder, nothing usable, refusing to overwrite)."""


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
    found = Discovery(sources=[])
    lines: list[int] = []  # the CSV line of each source
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
            if not path.is_file():
                found.skipped.append({"path": rel, "reason": f"{csv_path.name} line {line}: file not found ({path})"})
                continue
            group = (row.get("group") or "").strip() or group_of(rel, cfg.split.group_regex)
            found.sources.append(Source(str(path.resolve()), rel, label, group, split))
            lines.append(line)
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
                result.stats = (float(values.sum()), float(np.dot(values, values)), values.size)
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
    chunks, starts = choppinator(samples, params.sample_rate, cfg.audio.chunk_seconds, cfg.audio.hop_seconds,
                                 cfg.audio.min_fraction, cfg.audio.short_clip)
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


class _HashingFile:
    """A binary file open for writing that hashes and counts what passes through: a shard's sha256
    without reading the finished file back (that re-read was part of every build's serial tail)."""

    def __init__(self, path: Path):
        # 1 MB buffer: tarfile hands over 10 KB records, one write() system call each with the default one
        self._file = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed by SplitWriter._close_shard / abort
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._file.write(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        self._file.close()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class SplitWriter:
    """Packs one split's chunks into blocks and blocks into tar shards of `chunks_per_shard` chunks."""

    def __init__(self, out_dir: Path, split: str, block_size: int, chunks_per_shard: int):
        self.out_dir, self.split, self.block_size = out_dir, split, block_size
        self.blocks_per_shard = max(1, chunks_per_shard // block_size)
        self.pending: list[tuple[np.ndarray, ...]] = []
        self.pending_count = 0
        self.blocks_written = 0
        self.writer: wds.TarWriter | None = None
        self.file: _HashingFile | None = None
        self.shards: list[dict[str, Any]] = []

    def add(self, mel: np.ndarray, label: int, source_index: int, starts: np.ndarray) -> None:
        n = len(mel)
        self.pending.append((mel, np.full(n, label, np.int16), np.full(n, source_index, np.int32), starts))
        self.pending_count += n
        while self.pending_count >= self.block_size:
            self._write_block(self.block_size)

    def _write_block(self, size: int) -> None:
        fields = [np.concatenate(parts) for parts in zip(*self.pending, strict=True)]
        block, rest = [f[:size] for f in fields], [f[size:] for f in fields]
        self.pending = [tuple(rest)] if len(rest[0]) else []
        self.pending_count = len(rest[0])
        if self.writer is None:
            name = SHARD_PATTERN.format(split=self.split, index=len(self.shards))
            # mtime fixed: the same input gives byte-identical shards (and checksums) on every run.
            self.file = _HashingFile(self.out_dir / name)
            self.writer = wds.TarWriter(self.file, mtime=0, user="audioshard", group="audioshard")
            self.shards.append({"file": name, "samples": 0})
        mel, label, source, start = block
        self.writer.write({"__key__": f"{self.split}-{self.blocks_written:08d}", "mel.npy": _npy_bytes(mel),
                           "label.npy": _npy_bytes(label), "source.npy": _npy_bytes(source),
                           "start.npy": _npy_bytes(start)})
        self.shards[-1]["samples"] += len(mel)
        self.blocks_written += 1
        if self.blocks_written % self.blocks_per_shard == 0:
            self._close_shard()

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()  # writes the tar's end blocks into self.file, which it leaves open
            self.file.close()
            self.shards[-1].update(sha256=self.file.hexdigest(), bytes=self.file.size)
            self.writer = self.file = None

    def abort(self) -> None:
        """Close after a failure (e.g. disk full) without raising again; the files are discarded."""
        closers = [self.writer.tarstream.close] if self.writer is not None else []
        closers += [self.file.close] if self.file is not None else []
        for close in closers:
            with contextlib.suppress(Exception):  # the original error is being raised already
                close()
        self.writer = self.file = None

    def close(self) -> list[dict[str, Any]]:
        if self.pending_count:
            self._write_block(self.pending_count)
        self._close_shard()
        return self.shards


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    up_to_date: bool = False


def _fingerprint(sources: list[Source], cfg: Config) -> str:
    """Identifies a build's inputs and settings, so a re-run with nothing changed does nothing."""
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
    paths += [p for p in (out_dir / MANIFEST_NAME, out_dir / MARKER_NAME) if p.exists()]
    paths += list(out_dir.glob(f".{MANIFEST_NAME}.*.tmp"))
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


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # both parameters' initial value (DEFAULT_MMAP_THRESHOLD_MIN)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist in glibc only
    except (AttributeError, OSError, TypeError):  # not glibc (macOS, musl, Windows): nothing to tune
        return None
    return libc


def _keep_freed_memory() -> None:
    """Serve large buffers from the heap and keep freed memory (glibc only; elsewhere a no-op).

    Every file allocates and frees the same few MB of audio, spectra and features. glibc hands
    buffers over its mmap threshold out as fresh mappings (a fresh process starts that threshold at
    128 kB), so each buffer was page-faulted in anew, several times the page faults and system time
    of keeping them (docs/benchmarks.md)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)


@contextlib.contextmanager
def _keeping_freed_memory():
    """`_keep_freed_memory` for the duration of an in-process build, in a process that may live on (a
    notebook, a server): afterwards glibc's initial values are restored and the memory kept is given
    back. (glibc then no longer raises its mmap threshold by itself, as it does from the start in
    programs that set MALLOC_MMAP_THRESHOLD_; harmless, large buffers just stay mappings.)"""
    _keep_freed_memory()
    try:
        yield
    finally:
        libc = _glibc()
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            libc.malloc_trim(0)


def _results(jobs: list[tuple[Source, bool]], cfg: Config, workers: int):
    """`process_files` over the jobs, FILES_PER_TASK at a time, yielding one result per job in job order
    (so the output does not depend on the worker count).

    The calling process works through the tasks itself, beside `workers - 1` helper processes: each
    process claims the next unclaimed task and helpers send their results back. On 2 cores this beat a
    pool of 2 workers feeding a third, writing process (1.65-1.7x vs ~1.35-1.5x 2-worker speed-up, paired
    runs): no process waits on another, and nothing runs beside them to take their cores."""
    tasks = [jobs[i:i + FILES_PER_TASK] for i in range(0, len(jobs), FILES_PER_TASK)]
    workers = min(workers, len(tasks))
    helpers = _Helpers(tasks, cfg, workers - 1) if workers > 1 else None  # started first: they start working at once
    threads = torch.get_num_threads()
    _init_worker()
    try:
        with _keeping_freed_memory():
            own: dict[int, list[FileResult]] = {}  # tasks this process did, until their turn to be written
            next_out = 0
            while next_out < len(tasks):
                claimed = helpers.claim() if helpers else next_out
                if claimed < len(tasks):
                    own[claimed] = process_files(tasks[claimed], cfg)
                # Hand on every task that is next in order and done; once nothing is left to claim, wait for it.
                while next_out < len(tasks):
                    results = own.pop(next_out, None)
                    if results is None and helpers is not None:
                        results = helpers.take(next_out, wait=claimed >= len(tasks))
                    if results is None:  # a helper is still working on it
                        break
                    yield from results
                    next_out += 1
    finally:
        torch.set_num_threads(threads)
        if helpers is not None:
            helpers.close()


def _helper_main(tasks: list[list[tuple[Source, bool]]], cfg: Config, next_task, results_pipe) -> None:
    """A helper process: claim tasks until none are left, sending each task's results back."""
    _init_worker()
    _keep_freed_memory()  # a helper ends with the build: nothing to restore
    try:
        while (index := _claim(next_task)) < len(tasks):
            results_pipe.send((index, process_files(tasks[index], cfg)))
    except BaseException:  # a bug or MemoryError here: the build says what it was instead of a bare exit code
        with contextlib.suppress(Exception):
            results_pipe.send((-1, traceback.format_exc()))
        raise
    finally:
        results_pipe.close()


def _claim(next_task, give_up=lambda: None) -> int:
    """The next unclaimed task index from the counter shared by all build processes. (`give_up` is called
    while waiting for the lock: a helper killed while holding it would block everyone else.)"""
    lock = next_task.get_lock()
    while not lock.acquire(timeout=1.0):
        give_up()
    try:
        index = next_task.value
        next_task.value = index + 1
    finally:
        lock.release()
    return index


class _Helpers:
    """`count` helper processes working through `tasks` beside the calling process, and a thread that
    collects what they send, so a helper never waits for the caller to finish a long file of its own."""

    def __init__(self, tasks: list[list[tuple[Source, bool]]], cfg: Config, count: int):
        context = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self._next_task = context.Value("q", 0)
        self._results: dict[int, list[FileResult]] = {}
        self._failure: BaseException | None = None
        self._arrived = threading.Condition()
        self._processes: dict[Any, mp.Process] = {}  # result pipe -> its helper
        self._collector: threading.Thread | None = None
        # Forked helpers share this process's memory copy-on-write; a garbage collection in a helper would
        # touch every inherited object (torch's included) and copy those pages. Frozen objects are skipped.
        gc.freeze()
        try:
            for _ in range(count):
                reader, writer = context.Pipe(duplex=False)
                helper = context.Process(target=_helper_main, args=(tasks, cfg, self._next_task, writer),
                                         name="audioshard-build-helper", daemon=True)
                helper.start()
                writer.close()  # the helper holds the only write end: its exit reads as end-of-file here
                self._processes[reader] = helper
        except BaseException:
            self.close()
            raise
        finally:
            gc.unfreeze()  # the helpers keep their own frozen copy
        self._collector = threading.Thread(target=self._collect, name="audioshard-build-results", daemon=True)
        self._collector.start()  # after the forks: a child must not inherit a thread mid-way

    def claim(self) -> int:
        return _claim(self._next_task, self._raise_if_failed)

    def take(self, index: int, wait: bool) -> list[FileResult] | None:
        """Task `index`'s results once a helper has sent them (None if not yet and not `wait`)."""
        with self._arrived:
            while index not in self._results:
                self._raise_if_failed()
                if not wait:
                    return None
                self._arrived.wait()
            return self._results.pop(index)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _collect(self) -> None:
        pending = dict(self._processes)
        while pending:
            for reader in mp.connection.wait(list(pending)):
                try:
                    index, results = reader.recv()
                except (EOFError, OSError):  # the helper has exited: all tasks claimed, or it was killed
                    helper = pending.pop(reader)
                    helper.join()
                    if helper.exitcode != 0:
                        self._fail(BuildError(
                            f"a build worker process died (exit code {helper.exitcode}: killed from outside, or by "
                            "the system when memory ran out); nothing was replaced. Run the same command again; "
                            "for very long recordings use fewer --workers, since each worker holds one whole file "
                            "in memory"))
                    continue
                if index < 0:
                    self._fail(BuildError(f"a build worker process failed:\n{results}"))
                    continue
                with self._arrived:
                    self._results[index] = results
                    self._arrived.notify()

    def _fail(self, failure: BaseException) -> None:
        with self._arrived:
            self._failure = self._failure or failure
            self._arrived.notify()

    def close(self) -> None:
        """Stop the helpers (at once, after a failure; they have exited already after a full build)."""
        for helper in self._processes.values():
            if helper.is_alive():
                helper.terminate()
        for helper in self._processes.values():
            helper.join()
        if self._collector is not None:
            self._collector.join()  # ends once every helper's pipe has reached its end
        for reader in self._processes:
            reader.close()


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
                         f"({sum(found.ignored.values())} ignored, {len(found.skipped)} skipped)")
    fingerprint = job = _fingerprint(found.sources, cfg)
    if part is not None:
        index, count = part
        if not 0 <= index < count:
            raise BuildError(f"--part {index}/{count}: expected 0 <= I < N")
        out_dir = out_dir / f"part-{index}-of-{count}"
        fingerprint = f"{job}-part-{index}-of-{count}"
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
    params = FeatureParams.from_config(cfg)
    assignment, split_notes = split_sources(found.sources, cfg.split.val_fraction, cfg.split.test_fraction,
                                            cfg.split.seed)
    classes = sorted({s.label for s in found.sources})
    class_index = {name: i for i, name in enumerate(classes)}
    # Write order: per split, recordings in a seeded random order, so each shard mixes classes.
    rng = np.random.default_rng(cfg.split.seed)
    ordered: dict[str, list[Source]] = {}
    for split in SPLITS:
        members = [s for s in found.sources if assignment[s.rel] == split]
        ordered[split] = [members[i] for i in rng.permutation(len(members))]
    jobs = [(s, split == "train") for split in SPLITS for s in ordered[split]]
    if part is not None:
        jobs = jobs[part[0]::part[1]]  # disjoint parts, each in the one-shot build's order
    by_rel = {s.rel: s for s in found.sources}

    writers = {split: SplitWriter(staging, split, cfg.shards.block_size, cfg.shards.chunks_per_shard)
               for split in SPLITS}
    split_sources_list: dict[str, list[str]] = {split: [] for split in SPLITS}
    class_counts = {split: Counter() for split in SPLITS}
    recording_counts = {split: Counter() for split in SPLITS}
    seconds = {split: 0.0 for split in SPLITS}
    silent = Counter()
    skipped = list(found.skipped)
    total, total_sq, total_n = 0.0, 0.0, 0
    workers = workers if workers is not None else cfg.shards.workers
    workers = max(1, workers or os.cpu_count() or 1)
    audio_hours = 0.0
    longest = 0.0
    bar = tqdm(total=len(jobs), desc="build", unit="file", disable=not progress, dynamic_ncols=True)
    results = _results(jobs, cfg, workers)
    try:
        for result in results:
            bar.update(1)
            audio_hours += result.seconds / 3600
            longest = max(longest, result.seconds if not result.error else 0.0)
            bar.set_postfix_str(f"{audio_hours:.2f} h audio, {len(skipped)} skipped", refresh=False)
            source = by_rel[result.rel]
            if result.error:
                skipped.append({"path": result.rel, "reason": result.error})
                continue
            split = assignment[result.rel]
            index = len(split_sources_list[split])
            split_sources_list[split].append(result.rel)
            writers[split].add(result.mel, class_index[source.label], index, result.starts)
            class_counts[split][source.label] += len(result.mel)
            recording_counts[split][source.label] += 1
            seconds[split] += result.seconds
            silent[split] += result.silent_chunks
            total, total_sq, total_n = total + result.stats[0], total_sq + result.stats[1], total_n + result.stats[2]
        bar.close()
        shards_of = {split: writers[split].close() for split in SPLITS}
    except BaseException:
        bar.close()
        results.close()  # stops the helper processes now, not whenever the generator is collected
        for writer in writers.values():
            writer.abort()  # close half-written tars quietly; the caller discards the staging folder
        raise

    splits = {}
    for split in SPLITS:
        shards = shards_of[split]
        splits[split] = {
            "shards": shards,
            "samples": sum(s["samples"] for s in shards),
            "class_counts": {c: class_counts[split][c] for c in classes},
            "recordings": {c: recording_counts[split][c] for c in classes},
            "audio_seconds": round(seconds[split], 3),
            "silent_chunks": silent[split],
            "sources": split_sources_list[split],
        }
    if not total_n and part is None:
        raise BuildError(f"{input_path}: nothing usable in the training split: all {len(skipped)} inputs were "
                         "skipped (see the reasons above) or none were assigned to train")
    mean, std = _mean_std(total, total_sq, total_n)
    warnings = list(found.warnings) + split_notes
    if 0 < longest < cfg.audio.chunk_seconds:
        warnings.append(f"audio.chunk_seconds = {cfg.audio.chunk_seconds} is longer than every clip (the longest is "
                        f"{longest:.2f} s): each clip became one chunk, padded per audio.short_clip = "
                        f"{cfg.audio.short_clip!r}; a shorter chunk may suit this data better")
    for name in classes:
        if not any(splits[s]["class_counts"][name] for s in SPLITS):
            warnings.append(f"class {name!r} has no usable chunks at all: every file was skipped")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "audioshard_version": __version__,
        "fingerprint": fingerprint,
        "input": str(input_path),
        "classes": classes,
        "features": params.to_dict(),
        "block_size": cfg.shards.block_size,
        "normalization": {"mean": mean, "std": std},
        "train_stats": {"sum": total, "sum_sq": total_sq, "n": total_n},  # lets part builds be merged exactly
        "splits": splits,
        "skipped": skipped,
        "ignored": dict(found.ignored),
        "warnings": warnings,
        "config": cfg.to_dict(),
    }
    # Where each input came from (RAW/sources.csv, written by `audioshard fetch`); same in every part.
    manifest["provenance"] = provenance_rows(input_path, (s.rel for s in found.sources))
    if part is not None:
        manifest["part"] = {"index": part[0], "count": part[1], "job": job}
    return manifest


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


def _mean_std(total: float, total_sq: float, n: int) -> tuple[float, float]:
    if not n:
        return 0.0, 1.0
    mean = total / n
    return float(mean), float(np.sqrt(max(total_sq / n - mean * mean, 1e-12)))


def merge_parts(out_dir: str | Path) -> dict[str, Any]:
    """Write `out_dir/manifest.json` over the part builds `out_dir/part-I-of-N/` (all N must be complete).

    Shards stay where the parts wrote them (the manifest names them `part-I-of-N/train-000000.tar`);
    each shard records the offset of its part's sources in the merged `sources` list.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BuildError(f"{out_dir}: no such folder (the --out of the part builds)")
    with locked(out_dir):
        return _merge_parts(out_dir)


def _merge_parts(out_dir: Path) -> dict[str, Any]:
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
    total, total_sq, n = (sum(s[k] for s in stats) for k in ("sum", "sum_sq", "n"))
    if not n:
        raise BuildError(f"{out_dir}: nothing usable in the training split of any part")
    mean, std = _mean_std(total, total_sq, n)
    manifest = {**first, "fingerprint": jobs.pop(), "splits": splits, "normalization": {"mean": mean, "std": std},
                "train_stats": {"sum": total, "sum_sq": total_sq, "n": n},
                "skipped": [s for _, data in parts for s in data["skipped"]],
                "warnings": sorted({w for _, data in parts for w in data["warnings"]}),
                "merged_from": [folder for folder, _ in parts]}
    manifest.pop("part")
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return manifest

