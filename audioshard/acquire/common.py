"""What the YouTube and Google Drive fetchers share: provenance in RAW/sources.csv, the download
archive built from it, safe file names, retries with backoff, and the end-of-run summary.

A fetch writes every file into `RAW/<label>/` and appends one row per file to `RAW/sources.csv`
(columns `SOURCE_COLUMNS`; `path` is relative to RAW, as the build names sources). That file is
also the download archive: an item whose (label, segment, extractor, id) is listed there is not
fetched again, so re-running a fetch only fetches what is new. `audioshard build RAW` copies the
rows of the files it uses into the manifest's `provenance`.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import soundfile as sf

from audioshard.audio import SOUNDFILE_EXTENSIONS
from audioshard.csvsafe import cell
from audioshard.errors import AudioshardError

SOURCES_NAME = "sources.csv"
STAGING_NAME = ".audioshard-fetch"  # hidden: `audioshard build` never reads it
SOURCE_COLUMNS = ["path", "label", "url", "link", "extractor", "id", "title", "uploader", "duration", "start", "end",
                  "license", "fetched_at", "tool"]
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
MAX_BACKOFF_S = 60.0

T = TypeVar("T")


class AcquireError(AudioshardError, RuntimeError):
    """A fetch cannot start (bad link file, bad label, missing ffmpeg for cuts...); the message says why."""


class ItemError(Exception):
    """One item could not be fetched. `status` is "skipped" (not available to us) or "failed"."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def check_label(label: str, where: str = "") -> str:
    """Return `label` if it can name a class folder (letters, digits, `_.+-`; no leading dot), else raise."""
    label = (label or "").strip()
    if not LABEL_RE.match(label):
        raise AcquireError(f"{where}label {label!r} cannot name a class folder: use letters, digits and _.+- "
                           "(not starting with '.' or '-'), e.g. drone or car_engine")
    return label


def safe_name(text: str, max_len: int = 80) -> str:
    """A file-name stem made of ASCII letters, digits and `_.-` only (never empty, never hidden)."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")
    return text[:max_len].rstrip("._-") or "item"


def format_seconds(value: float | None) -> str:
    """Seconds as the shortest exact text ("30", "45.5"); "" for None."""
    if value is None:
        return ""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def segment_suffix(start: float | None, end: float | None) -> str:
    """File-name suffix of a segment: `_30-45.5`, `_30-end`, or "" for the whole recording."""
    if start is None and end is None:
        return ""
    return f"_{format_seconds(start or 0.0)}-{format_seconds(end) if end is not None else 'end'}"


def find_ffmpeg() -> str | None:
    """Path of the ffmpeg executable, or None when it is not installed."""
    return shutil.which("ffmpeg")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def archive_key(extractor: str, item_id: str) -> str:
    """yt-dlp's archive id: lower-case extractor key, a space, the item id."""
    return f"{extractor.lower()} {item_id}"


# Columns whose text comes from the site (a video's title...) and is only shown, never used as a key:
# these are made spreadsheet-safe; path, label, id and the rest must read back exactly as written.
SITE_TEXT = ("title", "uploader", "license")


class SourcesFile:
    """RAW/sources.csv: provenance rows, and the download archive derived from them.

    Rows are appended (and flushed) one at a time, right after each file is in place, so an
    interrupted fetch leaves an accurate file. An existing file with other columns keeps them.
    """

    def __init__(self, raw_dir: str | Path):
        self.path = Path(raw_dir) / SOURCES_NAME
        self.rows = read_sources(raw_dir)
        self.columns = list(SOURCE_COLUMNS)
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="", encoding="utf-8-sig") as stream:
                header = next(csv.reader(stream), [])
            if header != SOURCE_COLUMNS:  # hand-edited or older file: keep its columns, add ours, rewrite once
                self.columns = header + [c for c in SOURCE_COLUMNS if c not in header]
                self._rewrite()
        self._done = {self._key(r["label"], r.get("start", ""), r.get("end", ""), r.get("extractor", ""),
                                r.get("id", "")) for r in self.rows}

    @staticmethod
    def _key(label: str, start: str, end: str, extractor: str, item_id: str) -> tuple[str, str, str, str]:
        return label, start, end, archive_key(extractor, item_id)

    def archived(self, label: str, start: float | None, end: float | None) -> set[str]:
        """Archive ids (`extractor id`) already fetched for this label and segment."""
        start_s, end_s = format_seconds(start), format_seconds(end)
        return {k[3] for k in self._done if k[:3] == (label, start_s, end_s)}

    def has(self, label: str, start: float | None, end: float | None, key: str) -> bool:
        return (label, format_seconds(start), format_seconds(end), key) in self._done

    def add(self, row: dict[str, object]) -> None:
        """Append one provenance row (missing columns are left empty; None becomes "")."""
        row = {c: "" if row.get(c) is None else str(row.get(c)) for c in self.columns}
        for column in SITE_TEXT:  # free text from the site: shown, never run, by a spreadsheet
            row[column] = cell(row[column])
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=self.columns)
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.rows.append(row)
        self._done.add(self._key(row["label"], row["start"], row["end"], row["extractor"], row["id"]))

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{SOURCES_NAME}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows({c: r.get(c, "") for c in self.columns} for r in self.rows)
        os.replace(tmp, self.path)


def read_sources(raw_dir: str | Path) -> list[dict[str, str]]:
    """The rows of RAW/sources.csv ([] when there is none), every value a string."""
    path = Path(raw_dir) / SOURCES_NAME
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8-sig") as stream:
        return [{k: v or "" for k, v in row.items() if k is not None} for row in csv.DictReader(stream)]


def provenance_rows(input_path: str | Path, rels: Iterable[str]) -> list[dict[str, str]]:
    """Provenance of the build's inputs: the RAW/sources.csv rows whose `path` is one of `rels`.

    Args:
        input_path: the build input (a class-per-folder RAW directory; anything else has no sources.csv).
        rels: input paths relative to RAW, "/"-separated (the manifest's source names).
    """
    if not Path(input_path).is_dir():
        return []
    wanted = set(rels)
    return [row for row in read_sources(input_path) if row.get("path") in wanted]


def place_file(src: Path, raw_dir: Path, label: str, stem: str, subdirs: Iterable[str] = ()) -> str:
    """Move a downloaded file to `RAW/<label>/[subdirs/]<stem><ext>`, never replacing an existing file.

    A taken name gets `-2`, `-3`... appended. Returns the new path relative to RAW, "/"-separated.
    """
    folder = raw_dir / label
    for part in subdirs:
        folder = folder / safe_name(part)
    folder.mkdir(parents=True, exist_ok=True)
    ext = src.suffix.lower()
    target, n = folder / f"{stem}{ext}", 2
    while target.exists():
        target, n = folder / f"{stem}-{n}{ext}", n + 1
    shutil.move(str(src), str(target))
    return target.relative_to(raw_dir).as_posix()


def check_audio_file(path: Path) -> str | None:
    """Why a freshly downloaded file is unusable (empty, no samples), or None when it looks fine."""
    if not path.is_file() or path.stat().st_size == 0:
        return "the download produced an empty file"
    if path.suffix.lower() in (".wav", ".flac"):
        try:
            frames = sf.info(str(path)).frames
        except Exception as exn:  # libsndfile raises its own error types for bad data
            return f"the downloaded file is not readable audio ({exn})"
        if frames == 0:
            return "the file holds no audio samples (is the segment beyond the end of the recording?)"
    return None


def with_retries(action: Callable[[], T], classify: Callable[[Exception], tuple[str, str]], retries: int,
                 backoff: float, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `action`, retrying transient errors with exponential backoff.

    Args:
        classify: maps an exception to (kind, reason): kind "transient" (retried), "skipped" or "failed";
            it re-raises exceptions that are not download errors (bugs must not become "failed" items).
        retries: further attempts after the first; waits are backoff, 2 x backoff, 4 x ... (at most 60 s).

    Raises:
        ItemError: with status "skipped" or "failed" and the reason (after all attempts, if transient).
    """
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as exn:
            kind, reason = classify(exn)
            if kind != "transient":
                raise ItemError(kind, reason) from exn
            if attempt == retries:
                tries = f"{retries + 1} attempts" if retries else "1 attempt"
                raise ItemError("failed", f"{reason} (gave up after {tries})") from exn
            sleep(min(backoff * 2**attempt, MAX_BACKOFF_S))
    raise AssertionError("unreachable")


def one_line(text: str, limit: int = 300) -> str:
    """Collapse an error message to one line, without yt-dlp's "ERROR: " prefix."""
    text = " ".join(str(text).split()).removeprefix("ERROR: ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Outcome:
    """What happened to one item: status "fetched", "already", "skipped" or "failed"."""

    status: str
    item: str  # the URL (or Drive path) the user can look up
    reason: str = ""
    path: str = ""  # relative to RAW, for fetched items


@dataclass
class FetchSummary:
    """Everything one fetch did; `format()` is the report, `exit_code` is 1 only if nothing could be fetched."""

    out_dir: Path
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)
    build_input: Path | None = None  # what `audioshard build` should read, when not out_dir (a CSV inside it)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def fetched(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "fetched"]

    @property
    def exit_code(self) -> int:
        """0 when something was fetched now or before (archive); 1 when nothing could be fetched at all."""
        return 0 if self.count("fetched") or self.count("already") else 1

    def format(self) -> str:
        labels = Counter(o.path.split("/", 1)[0] for o in self.fetched)
        where = f" into {self.out_dir}/" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(labels.items()))})"
                                             if labels else "")
        lines = [f"fetched {self.count('fetched')}, already there {self.count('already')}, "
                 f"skipped {self.count('skipped')}, failed {self.count('failed')}{where}"]
        for o in self.outcomes:
            if o.status in ("skipped", "failed"):
                lines.append(f"  {o.status:<7}  {o.item}: {o.reason}")
        if self.ignored:
            lines.append("  ignored: " + ", ".join(f"{n} {what}" for what, n in sorted(self.ignored.items())))
        lines += [f"  note: {n}" for n in self.notes]
        if self.exit_code:
            lines.append("nothing could be fetched (see the reasons above)")
        elif self.count("fetched"):
            lines.append(f"provenance in {self.out_dir / SOURCES_NAME}; next: audioshard build "
                         f"{self.build_input or self.out_dir} --out shards/")
        return "\n".join(lines)


def ffmpeg_note(paths: Iterable[str]) -> str | None:
    """A note for files that only ffmpeg decodes, when ffmpeg is not installed (None otherwise)."""
    if find_ffmpeg() is not None:
        return None
    exts = Counter(Path(p).suffix.lower() or "(none)" for p in paths
                   if Path(p).suffix.lower() not in SOUNDFILE_EXTENSIONS)
    if not exts:
        return None
    kinds = ", ".join(f"{n} {e}" for e, n in sorted(exts.items()))
    return (f"ffmpeg is not installed, so {kinds} file(s) were kept in their original container: `audioshard build` "
            "needs ffmpeg to decode them (install it, e.g. `sudo apt-get install ffmpeg`, before building)")


def staging_dir(raw_dir: Path) -> Path:
    """A fresh folder for partial downloads inside RAW (hidden, so a build never sees it)."""
    path = raw_dir / STAGING_NAME / f"run-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    return path


def remove_staging(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when no other run is using it
