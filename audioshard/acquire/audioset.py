"""Fetch the clips of an AudioSet segment list (several sounds in one clip) with the yt-dlp machinery of
`youtube.py`, and write the multi-label CSV that `audioshard build` reads.

    audioshard fetch youtube --audioset balanced_train_segments.csv --ontology ontology.json \\
        --classes Speech Car Dog --out raw/
    audioshard build raw/audioset.csv --out shards/

A segment list (AudioSet's published CSVs) has `#` comment lines, then one segment a line, fields
separated by `, ` and the labels quoted:

    # YTID, start_seconds, end_seconds, positive_labels
    --PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"

Labels are ontology ids (MIDs). With `--ontology ontology.json` (AudioSet's, downloaded by the user:
audioshard downloads nothing but the audio) they become the ontology's names in a form safe for class
names (`check_label`): "Male speech, man speaking" is `Male_speech_man_speaking`; two ids with one name
are one class. Without it the MIDs are the class names: `/m/09x0r` is `m_09x0r`. `--classes` keeps only
those classes: each segment's labels are cut down to them, and a segment with none of them is not
fetched (counted in the summary).

Each clip becomes `RAW/audioset/<YTID>_<start>-<end>.wav` (the id made file-system safe, as for any
video) with a provenance row in RAW/sources.csv whose `label` holds all the segment's classes joined by
`;`. `RAW/audioset.csv` (columns path,label,group) lists each segment of the list whose clip is in RAW,
fetched now or before: `path` relative to RAW, `label` its wanted classes, sorted, joined by `;`,
`group` the YouTube id (segments of one video stay in one split). It is rewritten on every run, in the
list's order. A clip is fetched once, whatever --classes or --ontology say: sources.csv is the archive.
"""

from __future__ import annotations

import csv
import difflib
import itertools
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from audioshard.acquire.common import (
    AcquireError,
    FetchSummary,
    Outcome,
    check_label,
    format_seconds,
    read_sources,
)
from audioshard.acquire.youtube import Link, fetch_youtube

FOLDER = "audioset"  # RAW/audioset/: one folder for every multi-label clip
MANIFEST_NAME = "audioset.csv"
MANIFEST_COLUMNS = ["path", "label", "group"]
SEPARATOR = ";"  # what a multi-label build splits a label cell on
# Where a YouTube id is fetched from. The tests point it at a local HTTP server (the only seam they use).
VIDEO_URL = "https://www.youtube.com/watch?v={}"

# A list is read whole before anything is fetched, so a hostile or mistaken file is bounded: AudioSet's
# largest list (unbalanced_train_segments.csv) has about 2.05 million rows in about 130 MB, and its rows
# are well under 1 KB.
MAX_LIST_BYTES = 512 << 20
MAX_LIST_ROWS = 3_000_000
MAX_LINE_CHARS = 16_384
MAX_ONTOLOGY_BYTES = 64 << 20
MAX_ONTOLOGY_ENTRIES = 100_000
MAX_REPORTED = 20  # bad rows named in one error; the rest are counted

YTID_RE = re.compile(r"^[A-Za-z0-9_-]{11}$")
MID_RE = re.compile(r"^/[a-z]/[A-Za-z0-9_]{1,40}$")
SECONDS_RE = re.compile(r"^\d{1,7}(\.\d{1,6})?$")


@dataclass(slots=True)
class Segment:
    """One clip of a list: YouTube id, seconds, and its classes (`labels`: the wanted ones, `every`: all)."""

    ytid: str
    start: float
    end: float
    labels: tuple[str, ...]
    every: tuple[str, ...]
    line: int

    @property
    def key(self) -> tuple[str, str, str]:
        return self.ytid, format_seconds(self.start), format_seconds(self.end)


@dataclass
class SegmentList:
    """What a list holds: the segments to fetch (duplicates merged), and what was left out."""

    path: Path
    segments: list[Segment] = field(default_factory=list)
    unwanted: int = 0  # segments with none of the --classes
    seen: dict[str, str] = field(default_factory=dict)  # every class name in the list -> the MID it came from


class _Errors:
    """Bad rows, all reported at once; only the first MAX_REPORTED are spelled out."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.shown) < MAX_REPORTED:
            self.shown.append(text)

    def text(self) -> str:
        more = self.count - len(self.shown)
        return "; ".join(self.shown) + (f"; ... and {more} more" if more else "")


def class_name(text: str, where: str = "") -> str:
    """A class name made from an ontology name or a MID: ASCII letters, digits and `_.+-`, as `check_label`
    wants ("Male speech, man speaking" -> `Male_speech_man_speaking`, `/m/09x0r` -> `m_09x0r`).

    Raises:
        AcquireError: nothing usable is left (a name of symbols or non-Latin letters only).
    """
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)
    text = re.sub(r"^[^A-Za-z0-9]+", "", text)[:64].rstrip("_.-")
    return check_label(text, where)


def load_ontology(path: str | Path) -> dict[str, str]:
    """AudioSet's ontology.json as {MID: name as written}: a JSON list of objects with "id" and "name"
    (other keys ignored). Every name is checked to give a class name (`class_name`).

    Raises:
        AcquireError: missing, too large or not JSON, or entries without a string id and name (each named).
    """
    path = Path(path)
    if not path.is_file():
        raise AcquireError(f"{path}: no such ontology file (AudioSet's ontology.json, from "
                           "https://github.com/audioset/ontology)")
    if path.stat().st_size > MAX_ONTOLOGY_BYTES:
        raise AcquireError(f"{path}: over {MAX_ONTOLOGY_BYTES >> 20} MiB, not an ontology (AudioSet's is 0.3 MB)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise AcquireError(f"{path}: not a JSON file ({exn}); expected AudioSet's ontology.json") from None
    if not isinstance(entries, list) or not entries or len(entries) > MAX_ONTOLOGY_ENTRIES:
        raise AcquireError(f"{path}: expected a JSON list of up to {MAX_ONTOLOGY_ENTRIES:,} objects with \"id\" "
                           "and \"name\" (AudioSet's ontology.json)")
    names: dict[str, str] = {}
    errors = _Errors()
    for index, entry in enumerate(entries):
        try:
            mid, name = _ontology_entry(entry, names)
            class_name(name)
            names[mid] = name
        except (ValueError, AcquireError) as exn:
            errors.add(f"entry {index}: {exn}")
    if errors.count:
        raise AcquireError(f"{path}: {errors.count} bad entr{'ies' if errors.count > 1 else 'y'}: {errors.text()}")
    return names


def _ontology_entry(entry: object, names: dict[str, str]) -> tuple[str, str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not isinstance(entry.get("name"), str):
        raise ValueError("needs a string \"id\" and a string \"name\"")
    mid, name = entry["id"].strip(), entry["name"]
    if not MID_RE.match(mid):
        raise ValueError(f"id {mid[:50]!r} is not an ontology id such as /m/09x0r")
    if mid in names:
        raise ValueError(f"id {mid} is listed twice")
    return mid, name


def wanted_classes(classes: Sequence[str], ontology: dict[str, str] | None, source: str | Path = "") -> set[str]:
    """The class names meant by --classes. With an ontology ({MID: name}) each may be a name (any case), its
    class name or a MID; an unknown one is an error listing close names. Without one each is a MID or its
    class name (checked against the list later, in `check_seen`)."""
    if ontology is None:
        return {class_name(c) if MID_RE.match(c.strip()) else c.strip() for c in classes}
    aliases: dict[str, str] = {}  # lower-case alias -> class name
    shown: dict[str, str] = {}  # lower-case name -> the name as written, for suggestions
    for mid, name in ontology.items():
        cls = class_name(name)
        aliases[mid.lower()] = aliases[name.lower()] = aliases[cls.lower()] = cls
        shown[name.lower()] = name
    wanted = set()
    for requested in classes:
        cls = aliases.get(requested.strip().lower())
        if cls is None:
            raise AcquireError(f"--classes {requested!r} is not a class of {source or 'the ontology'}: "
                               + _suggest(requested, shown, "names"))
        wanted.add(cls)
    return wanted


def _suggest(requested: str, shown: dict[str, str], what: str) -> str:
    close = difflib.get_close_matches(requested.strip().lower(), list(shown), n=5, cutoff=0.6)
    if close:
        return "did you mean " + ", ".join(repr(shown[c]) for c in close) + "?"
    return f"no close match; see the {what} in the file"


def check_seen(wanted: set[str], listed: SegmentList, with_ontology: bool) -> list[str]:
    """Notes for --classes that no segment has; without an ontology such a class is an error (a typo in a MID
    cannot be told from a class the list lacks), listing close MIDs of the list."""
    missing = sorted(wanted - set(listed.seen))
    if missing and not with_ontology:
        shown = {mid.lower(): mid for mid in listed.seen.values()} | {c.lower(): c for c in listed.seen}
        raise AcquireError(f"--classes {missing[0]!r} is in no segment of {listed.path}: "
                           + _suggest(missing[0], shown, "labels (MIDs)")
                           + " (give --ontology ontology.json to use class names)")
    return [f"--classes {cls}: in no segment of {listed.path.name}" for cls in missing]


def _lines(stream: IO[str], path: Path) -> Iterator[str]:
    """The file's lines, refusing one longer than MAX_LINE_CHARS (so one line cannot fill the memory)."""
    for number in itertools.count(1):
        line = stream.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        if len(line) > MAX_LINE_CHARS:
            raise AcquireError(f"{path} line {number}: longer than {MAX_LINE_CHARS:,} characters; not an AudioSet "
                               "segment list (YTID, start_seconds, end_seconds, \"labels\")")
        yield line


def parse_segment_list(path: str | Path, names: dict[str, str] | None = None,
                       wanted: set[str] | None = None) -> SegmentList:
    """Read an AudioSet segment list: `#` comments, then `YTID, start, end, "MID,MID..."` a line.

    Args:
        names: {MID: class name} from `load_ontology`; None: the MIDs' safe forms are the class names.
        wanted: keep only these classes (None: all); segments with none of them are counted, not kept.

    Raises:
        AcquireError: missing or oversized file, or any bad row (every one named by its line; nothing is
            fetched then).
    """
    path = Path(path)
    if not path.is_file():
        raise AcquireError(f"{path}: no such segment list")
    if path.stat().st_size > MAX_LIST_BYTES:
        raise AcquireError(f"{path}: over {MAX_LIST_BYTES:,} bytes; AudioSet's largest list is about 130 MB: "
                           "not a segment list?")
    listed, errors = SegmentList(path), _Errors()
    merged: dict[tuple[str, str, str], Segment] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            _read_rows(csv.reader(_lines(stream, path), skipinitialspace=True), listed, merged, errors,
                       names, wanted)
    except UnicodeDecodeError as exn:
        raise AcquireError(f"{path}: not UTF-8 text ({exn.reason} at byte {exn.start}); expected AudioSet's "
                           "segment CSV") from None
    if errors.count:
        raise AcquireError(f"{path}: {errors.count} bad row{'s' if errors.count > 1 else ''}, nothing fetched: "
                           + errors.text())
    listed.segments = list(merged.values())
    if not listed.segments and not listed.unwanted:
        raise AcquireError(f"{path}: no segments (expected lines such as --PJHxphWEs, 30.000, 40.000, "
                           "\"/m/09x0r,/t/dd00088\")")
    return listed


def _read_rows(reader, listed: SegmentList, merged: dict[tuple[str, str, str], Segment], errors: _Errors,
               names: dict[str, str] | None, wanted: set[str] | None) -> None:
    rows = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exn:  # a NUL byte, an unclosed quote at the end of the file
            errors.add(f"line {reader.line_num}: {exn}")
            continue
        if not any(c.strip() for c in row) or row[0].lstrip().startswith("#") or row[0].strip().lower() == "ytid":
            continue
        rows += 1
        if rows > MAX_LIST_ROWS:
            raise AcquireError(f"{listed.path}: more than {MAX_LIST_ROWS:,} segments; split the list")
        try:
            segment = _segment(row, reader.line_num, names, listed.seen)
        except ValueError as exn:
            errors.add(f"line {reader.line_num}: {exn}")
            continue
        _keep(segment, wanted, listed, merged)


def _segment(row: list[str], line: int, names: dict[str, str] | None, seen: dict[str, str]) -> Segment:
    if len(row) != 4:
        raise ValueError(f"{len(row)} fields, expected 4: YTID, start_seconds, end_seconds, \"labels\" (the "
                         "labels quoted when there are several)")
    ytid, start_text, end_text, label_text = (c.strip() for c in row)
    if not YTID_RE.match(ytid):
        raise ValueError(f"{ytid[:40]!r} is not an 11-character YouTube id")
    start, end = _seconds(start_text, "start"), _seconds(end_text, "end")
    if end <= start:
        raise ValueError(f"end ({end_text}) is not after start ({start_text})")
    mids = [m.strip() for m in label_text.split(",") if m.strip()]
    if not mids:
        raise ValueError("no labels")
    classes = set()
    for mid in mids:
        if not MID_RE.match(mid):
            raise ValueError(f"label {mid[:40]!r} is not an ontology id such as /m/09x0r")
        if names is not None and mid not in names:
            raise ValueError(f"label {mid} is not in the ontology (an ontology.json of another AudioSet release?)")
        cls = names[mid] if names is not None else class_name(mid)
        seen.setdefault(cls, mid)
        classes.add(cls)
    every = tuple(sorted(classes))
    return Segment(ytid, start, end, every, every, line)


def _seconds(text: str, what: str) -> float:
    if not SECONDS_RE.match(text):
        raise ValueError(f"{what} {text[:20]!r} is not a number of seconds")
    return float(text)


def _keep(segment: Segment, wanted: set[str] | None, listed: SegmentList,
          merged: dict[tuple[str, str, str], Segment]) -> None:
    """Cut the segment's labels down to the wanted classes; count it when none is left; merge a repeat of a
    kept segment into it (one clip with the labels of both rows)."""
    if wanted is not None:
        segment.labels = tuple(c for c in segment.every if c in wanted)
    first = merged.get(segment.key)
    if first is not None:
        first.labels = tuple(sorted(set(first.labels) | set(segment.labels)))
        first.every = tuple(sorted(set(first.every) | set(segment.every)))
    elif segment.labels:
        merged[segment.key] = segment
    else:
        listed.unwanted += 1


def fetched_clips(raw_dir: Path) -> dict[tuple[str, str, str], str]:
    """{(YouTube id, start, end): path relative to RAW} of the clips RAW/sources.csv lists under RAW/audioset/,
    whatever labels they were fetched with (so a new --classes or --ontology never fetches a clip again)."""
    clips = {}
    for row in read_sources(raw_dir):
        if not row.get("path", "").startswith(FOLDER + "/"):
            continue
        try:
            start = format_seconds(float(row.get("start") or 0))  # a clip from 0 s is written with no start
        except ValueError:  # a hand-edited row: not ours to judge here
            continue
        clips.setdefault((row.get("id", ""), start, row.get("end", "")), row["path"])
    return clips


def write_manifest(raw_dir: Path, segments: Iterable[Segment], clips: dict[tuple[str, str, str], str]
                   ) -> tuple[int, int]:
    """Write RAW/audioset.csv (path,label,group) for the segments whose clip is in RAW, in list order.

    Returns:
        (rows written, segments whose clip sources.csv lists but whose file is gone).
    """
    rows, gone = [], 0
    for segment in segments:
        rel = clips.get(segment.key)
        if rel is None:
            continue
        if not (raw_dir / rel).is_file():
            gone += 1
            continue
        # path, label and group are keys: written as they are (a YouTube id may start with "-").
        rows.append({"path": rel, "label": SEPARATOR.join(segment.labels), "group": segment.ytid})
    target = raw_dir / MANIFEST_NAME
    tmp = target.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, target)  # a reader never sees half a file
    return len(rows), gone


def _link(segment: Segment, list_name: str) -> Link:
    return Link(VIDEO_URL.format(segment.ytid), SEPARATOR.join(segment.every), segment.start or None, segment.end,
                where=f"{list_name} line {segment.line}", folder=FOLDER)


def fetch_audioset(list_path: str | Path, out: str | Path, *, ontology: str | Path | None = None,
                   classes: Sequence[str] = (), audio_format: str = "wav", retries: int = 3, timeout: float = 30.0,
                   backoff: float = 2.0, log: Callable[[str], None] | None = None) -> FetchSummary:
    """Fetch every segment of an AudioSet list (those with one of `classes`, when given) into
    `out/audioset/`, then write `out/audioset.csv` for `audioshard build`.

    Args:
        list_path: the segment list (e.g. balanced_train_segments.csv).
        out: the RAW folder; provenance is appended to `out/sources.csv`, which is also the archive.
        ontology: AudioSet's ontology.json, to name classes; None: the MIDs (made safe) are the names.
        classes: keep only these classes (names, safe names or MIDs); empty: all.
        audio_format, retries, timeout, backoff, log: as for `fetch_youtube`.

    Returns:
        The summary; its notes count the segments without any of `classes`, and name the CSV.

    Raises:
        AcquireError: before anything is fetched: a bad list or ontology, an unknown class, no segment
            with any of `classes`, ffmpeg missing (segments are cut while downloading).
    """
    names = load_ontology(ontology) if ontology is not None else None
    wanted = wanted_classes(classes, names, ontology) if classes else None
    listed = parse_segment_list(list_path, {m: class_name(n) for m, n in names.items()} if names else None, wanted)
    notes = check_seen(wanted, listed, names is not None) if wanted else []
    if not listed.segments:
        raise AcquireError(f"{listed.path}: none of its {listed.unwanted:,} segments has any of --classes "
                           f"{' '.join(classes)}; nothing to fetch")
    out = Path(out)
    done = fetched_clips(out)
    new = [s for s in listed.segments if s.key not in done]
    summary = fetch_youtube([_link(s, listed.path.name) for s in new], out, audio_format=audio_format,
                            retries=retries, timeout=timeout, backoff=backoff, log=log)
    summary.outcomes[:0] = [Outcome("already", VIDEO_URL.format(s.ytid)) for s in listed.segments if s.key in done]
    rows, gone = write_manifest(out, listed.segments, fetched_clips(out))
    if listed.unwanted:
        summary.notes.append(f"{listed.unwanted:,} segment{'s' if listed.unwanted > 1 else ''} had none of the "
                             f"--classes ({', '.join(sorted(wanted or ()))}): not fetched")
    summary.notes += notes
    if gone:
        summary.notes.append(f"{gone} clip(s) listed in {out / 'sources.csv'} have no file any more and are left "
                             "out of the CSV (delete their sources.csv rows to fetch them again)")
    summary.notes.append(f"build CSV: {out / MANIFEST_NAME}, {rows} segment{'s' if rows != 1 else ''} "
                         "(label: the classes joined by ';'; group: the YouTube id)")
    summary.build_input = out / MANIFEST_NAME
    return summary
