"""Build shards once: raw audio -> chunks -> log-mel -> leak-free split -> WebDataset tars + manifest.

    audioshard build RAW_DIR --out shards/            # one subfolder per class
    audioshard build files.csv --out shards/          # columns path,label[,group][,split]; paths or URLs
    audioshard build s3://bucket/raw/ --out s3://bucket/shards/   # inputs and outputs in an object store

Each tar member group ("block") holds up to `shards.block_size` chunks as one array per field
(`mel.npy` float16 (N, n_mels, frames), `label.npy` int16, `source.npy` int32 index into the
split's `sources`, `start.npy` float32 seconds): tar overhead is paid once per block instead of
once per chunk, which is what lets the stream run far faster than one chunk per member, and the
files stay standard tars that webdataset reads. Output is byte-identical for any worker count.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audioshard import labels
from audioshard import sources as urls
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
from audioshard.errors import BuildError, SourceError
from audioshard.features import FeatureParams, log_mel
from audioshard.inputs import Discovery, check_usable, discover  # noqa: F401 - discover is build's API too
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
from audioshard.sources import RemoteSource
from audioshard.split import Source, split_sources
from audioshard.upload import Published, is_store_url, publish_build
from audioshard.writer import SplitWriter

MARKER_NAME = ".audioshard-build"
STAGING_NAME = ".staging"  # a build writes here first; shards move into place only when all are written


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
        samples = _load(source, cfg, params.sample_rate)
    except (AudioError, SourceError) as exn:  # SourceError: a URL input that could not be downloaded
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


def _load(source: Source, cfg: Config, sample_rate: int) -> np.ndarray:
    """A local file decoded in place; a URL input downloaded into a temporary file with its suffix and decoded
    the same way (the same bytes give the same samples), its errors naming the URL."""
    if not isinstance(source, RemoteSource):
        return load(source.path, sample_rate)
    with urls.local_copy(source, cfg.fetcher()) as path:
        try:
            return load(path, sample_rate)
        except AudioError as exn:
            raise AudioError(str(exn).replace(str(path), source.path)) from None


@dataclass
class BuildResult:
    out_dir: Path | str
    manifest: dict[str, Any]
    up_to_date: bool = False
    published: Published | None = None  # what went up, when --out is an object store


def _job_id(sources: list[Source], cfg: Config) -> str:
    """What a build is made of, the same on every machine: the settings that shape the output and each input's
    name, label, group, split and size. Part builds of one job carry it, and only parts with the same one merge:
    copies of the input made at different times (a download, `aws s3 sync`) are the same job."""
    return _digest([_identity(s, times=False) for s in sources], cfg)


def _fingerprint(sources: list[Source], cfg: Config) -> str:
    """The job's inputs and settings and when each input was last written here, so a re-run with nothing
    changed does nothing and a file edited in place (same size) is built again."""
    return _digest([_identity(s, times=True) for s in sources], cfg)


def _identity(source: Source, times: bool) -> tuple:
    """One input as the job id (`times` False) and the fingerprint see it. A URL input: its name, label, group,
    split, size, ETag and URL; the store's ETag stands in for the content (a copy keeps no modification time
    there, and a changed object gets a new ETag)."""
    if isinstance(source, RemoteSource):
        return source.rel, source.label, source.group, source.split, source.size, source.etag, source.path
    stat = os.stat(source.path)
    head = (source.rel, source.label, source.group, source.split, stat.st_size)
    return (*head, stat.st_mtime_ns) if times else head


def _digest(files: list[tuple], cfg: Config) -> str:
    settings = cfg.to_dict()
    settings["shards"] = {k: settings["shards"][k] for k in ("block_size", "chunks_per_shard")}  # what shapes output
    settings = {k: settings[k] for k in ("audio", "features", "split", "shards")}
    blob = json.dumps({"settings": settings, "files": files, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def expected_fingerprint(found: Discovery, cfg: Config, parts: bool) -> str:
    """The fingerprint the manifest of a build of `found` will carry: the folder's, or (merged parts) the job id."""
    return _job_id(found.sources, cfg) if parts else _fingerprint(found.sources, cfg)


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
                 force: bool = False, progress: bool = True, part: tuple[int, int] | None = None,
                 found: Discovery | None = None, staging: str | Path | None = None) -> BuildResult:
    """Build train/val/test shards and `manifest.json` from a class-folder tree or CSV.

    Args:
        input_path: folder with one subfolder per class, or an s3:// or gs:// prefix laid out the same way,
            or a CSV with columns path,label[,group][,split] whose paths may be s3://, gs:// or http(s):// URLs.
        out_dir: output folder (created); refused if it holds something else, unless `force`. Or an
            s3://BUCKET/PREFIX/: built in `staging` (default: a temporary folder), then uploaded, the
            manifest last; left alone when it already holds this build.
        workers: decoding processes (None: `shards.workers`, 0 there meaning all cores).
        part: (I, N) builds only part I of N into `out_dir/part-I-of-N/` (for job arrays on many
            machines); the split is still decided from the whole file list. `merge_parts(out_dir)`
            then writes one manifest over all parts.
        found: the input as `discover(input_path, cfg)` lists it, when the caller has it already (a
            cluster lists and sizes the inputs once, not once per part).

    Returns:
        BuildResult with the manifest as written (or as found, when the build was already up to date).
    """
    if problem := block_problem(cfg.shards.block_size, FeatureParams.from_config(cfg)):
        raise BuildError(f"these settings would make shards no reader accepts: {problem}")  # before any work
    found = check_usable(discover(input_path, cfg) if found is None else found, input_path)
    if is_store_url(str(out_dir)):
        return _build_to_store(input_path, str(out_dir), cfg, found, workers, force, progress, part, staging)
    if "://" in str(out_dir):
        raise BuildError(f"--out {out_dir}: a build is written to a folder or to s3://BUCKET/PREFIX/")
    out_dir = Path(out_dir)
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


def _build_to_store(input_path: str | Path, out_url: str, cfg: Config, found: Discovery, workers: int | None,
                    force: bool, progress: bool, part: tuple[int, int] | None,
                    staging: str | Path | None) -> BuildResult:
    """The build made in a local folder and uploaded to `out_url` (`upload.publish_build`), or nothing done when
    the store's manifest already has this build's fingerprint."""
    if part is not None:
        raise BuildError("--part builds go into a folder all parts share: give --out a folder (then --merge, and "
                         "upload it), or build with --parts N --out s3://...")

    def build_into(folder: Path) -> dict[str, Any]:
        return build_shards(input_path, folder, cfg, workers, force=force, progress=progress, found=found).manifest

    manifest, published = publish_build(out_url, _fingerprint(found.sources, cfg), build_into, cfg.fetcher(),
                                        staging=staging, force=force)
    return BuildResult(out_url, manifest, up_to_date=published is None, published=published)


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
    classes = labels.class_names(s.names for s in found.sources)
    jobs = _write_order(found.sources, assignment, cfg.split.seed)
    if part is not None:
        jobs = jobs[part[0]::part[1]]  # disjoint parts, each in the one-shot build's order
    # Every part gets the whole discovery; only the first reports its skips, or a merge would list each N times.
    packer = _Packer(staging, found, assignment, classes, cfg, with_skips=part is None or part[0] == 0)
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
                              fingerprint=fingerprint, multilabel=packer.multilabel)
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
                 cfg: Config, with_skips: bool = True):
        self.writers = {split: SplitWriter(staging, split, cfg.shards.block_size, cfg.shards.chunks_per_shard)
                        for split in SPLITS}
        self.tallies = {split: SplitTally() for split in SPLITS}
        self.stats = TrainStats()
        self.skipped = list(found.skipped) if with_skips else []
        self.assignment = assignment
        self.label_of = {s.rel: s.label for s in found.sources}
        self.names_of = {s.rel: s.names for s in found.sources}
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.multilabel = labels.is_multilabel(self.names_of.values())  # then chunks carry multi-hot rows too
        self.audio_hours = self.longest = 0.0

    def add(self, result: FileResult) -> None:
        self.audio_hours += result.seconds / 3600
        if result.error:
            self.skipped.append({"path": result.rel, "reason": result.error})
            return
        self.longest = max(self.longest, result.seconds)
        split, label = self.assignment[result.rel], self.label_of[result.rel]
        names = self.names_of[result.rel]
        index = self.tallies[split].add(result.rel, label, len(result.mel), result.seconds, result.silent_chunks,
                                        names)
        first = self.class_index[names[0]]
        hot = labels.multi_hot(names, self.class_index) if self.multilabel else None
        self.writers[split].add(result.mel, first, index, result.starts, hot)
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


