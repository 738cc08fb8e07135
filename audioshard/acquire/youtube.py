"""Fetch labelled audio with yt-dlp: YouTube videos, playlists and channels, or any site yt-dlp knows
(including direct links to audio files and podcast RSS feeds).

    audioshard fetch youtube --label drone --out raw/ https://www.youtube.com/watch?v=VIDEO_ID
    audioshard fetch youtube --links links.csv --out raw/ --max-items 20

`links.csv` has columns `url,label` and optional `start,end` (seconds or [hh:]mm:ss) to keep only a
segment. Each item becomes `RAW/<label>/<id>[_<start>-<end>].wav` (best audio-only format, extracted
to WAV or FLAC with ffmpeg; the segment is cut while downloading) plus one provenance row in
`RAW/sources.csv`, which is also the download archive: a re-run fetches only what is new.

Without ffmpeg, segments are refused up front (cutting needs it) and whole recordings are kept in
their downloaded container (often .webm/.m4a, which `audioshard build` then needs ffmpeg to decode).
"""

from __future__ import annotations

import csv
import math
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yt_dlp
import yt_dlp.utils
import yt_dlp.version

from audioshard.acquire.common import (
    AcquireError,
    FetchSummary,
    ItemError,
    Outcome,
    SourcesFile,
    archive_key,
    check_audio_file,
    check_label,
    ffmpeg_note,
    find_ffmpeg,
    format_seconds,
    now_iso,
    one_line,
    place_file,
    remove_staging,
    safe_name,
    segment_suffix,
    staging_dir,
    with_retries,
)

AUDIO_FORMATS = ("wav", "flac")
LINK_COLUMNS = ("url", "label", "start", "end")
MAX_DEPTH = 4  # a channel is a playlist of tabs, each a playlist of videos; deeper nesting is refused

# yt-dlp reports why a video cannot be had only as text: these reasons make an item "skipped"
# (the source is not available to us; retrying will not help). Order matters: "Video unavailable.
# The uploader has not made this video available in your country" is geo-blocking, not removal.
_SKIP_REASONS = [
    (r"private video|video is private", "private video"),
    (r"available in your country|geo.?restrict|blocked it in your (country|region)|not available from your location",
     "geo-blocked"),
    (r"copyright", "blocked on copyright grounds"),
    (r"confirm your age|age.?restrict|inappropriate for some users", "age-restricted (needs a signed-in account)"),
    (r"members.?only|join this channel", "members-only"),
    (r"premieres? in|live event will begin|this live event|is upcoming", "not available yet (premiere or live event)"),
    (r"terminated|removed|no longer available|video unavailable|does not exist|http error 40[4]|http error 410",
     "removed or not found"),
]
_TRANSIENT = re.compile(r"timed? ?out|temporar|connection (reset|refused|aborted)|remote end closed|broken pipe|"
                        r"network is unreachable|name resolution|incomplete ?read|http error (408|429|5\d\d)|"
                        r"too many requests|ssl|eof occurred", re.IGNORECASE)
# Warnings worth passing on are about the setup (e.g. "No supported JavaScript runtime"); these are
# about single items, whose errors are reported anyway, or are expected for direct links.
_NOISE = ("falling back on generic information extractor", "could be a direct video link", "retrying",
          "unable to download", "giving up", "caused by")


@dataclass(frozen=True)
class Link:
    """One line of work: a URL (video, playlist, channel, direct audio link) and where it goes.

    `start`/`end` are seconds (None: from the beginning / to the end); `where` locates the link for messages.
    `folder` is the folder under RAW when it is not `label` (AudioSet clips: one folder, several labels,
    the labels recorded in sources.csv's `label` column joined by `;`).
    """

    url: str
    label: str
    start: float | None = None
    end: float | None = None
    where: str = ""
    folder: str = ""

    @property
    def segment(self) -> bool:
        return self.start is not None or self.end is not None


def parse_time(text: str) -> float:
    """Seconds from "90", "90.5", "1:30" or "01:02:03.5"; raises ValueError for anything else."""
    text = text.strip()
    parts = text.split(":")
    if (len(parts) > 3 or not all(re.fullmatch(r"\d+", p) for p in parts[:-1])
            or not re.fullmatch(r"\d+(\.\d+)?", parts[-1])):
        raise ValueError(f"{text!r} is not seconds or [hh:]mm:ss")
    values = [int(p) for p in parts[:-1]] + [float(parts[-1])]
    if any(v >= 60 for v in values[1:]):
        raise ValueError(f"{text!r}: minutes and seconds must be below 60")
    total = 0.0
    for value in values:
        total = total * 60 + value
    return total


def _check_url(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{url!r} is not an http(s) URL")
    return url


def _link(values: dict[str, str], default_label: str | None, where: str) -> Link:
    if not values.get("url"):
        raise ValueError("empty url")
    url = _check_url(values["url"])
    label = values.get("label") or default_label
    if not label:
        raise ValueError("empty label (give one in the label column, or --label for all rows)")
    try:
        label = check_label(label)
    except AcquireError as exn:
        raise ValueError(str(exn)) from None
    start = parse_time(values["start"]) if values.get("start") else None
    end = parse_time(values["end"]) if values.get("end") else None
    if start is not None and end is not None and end <= start:
        raise ValueError(f"end ({values['end']}) is not after start ({values['start']})")
    if end == 0:
        raise ValueError("end is 0 s: the segment would be empty")
    return Link(url, label, start or None, end, where)  # start 0 means "from the beginning"


def parse_links(path: str | Path, default_label: str | None = None) -> list[Link]:
    """Read a link file: CSV with a header naming `url` and optionally `label`, `start`, `end`.

    Blank lines and lines starting with `#` are ignored; `label` may be left out (or empty) when
    `default_label` is given. Every bad row is reported with its line number, all at once.

    Raises:
        AcquireError: missing file, bad header, or any bad row (nothing is fetched then).
    """
    path = Path(path)
    if not path.is_file():
        raise AcquireError(f"{path}: no such link file")
    links: list[Link] = []
    errors: list[str] = []
    header: list[str] | None = None
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                unknown = [c for c in header if c not in LINK_COLUMNS]
                if "url" not in header or unknown or len(set(header)) != len(header):
                    raise AcquireError(f"{path} line {line}: the header must name the columns url,label and "
                                       f"optionally start,end (found {','.join(header)})")
                if "label" not in header and not default_label:
                    raise AcquireError(f"{path}: no label column; add one, or give --label for every row")
                continue
            if len(row) > len(header):
                errors.append(f"line {line}: {len(row)} fields but the header names {len(header)}")
                continue
            values = dict(zip(header, (cell.strip() for cell in row), strict=False))
            try:
                links.append(_link(values, default_label, f"{path.name} line {line}"))
            except ValueError as exn:
                errors.append(f"line {line}: {exn}")
    if errors:
        raise AcquireError(f"{path}: {len(errors)} bad row{'s' if len(errors) > 1 else ''}, nothing fetched: "
                           + "; ".join(errors))
    if not links:
        raise AcquireError(f"{path}: no links (expected a header url,label[,start,end] and one URL per line)")
    return links


def collect_links(urls: Sequence[str] = (), label: str | None = None,
                  links_file: str | Path | None = None) -> list[Link]:
    """The links of one `fetch youtube` command: URLs given with `--label`, then the rows of a link file.

    Raises:
        AcquireError: nothing to fetch, URLs without a label, a bad URL or link file.
    """
    links: list[Link] = []
    if urls:
        if not label:
            raise AcquireError("URLs on the command line need --label (the class folder they go into), "
                               "e.g. --label drone")
        label = check_label(label)
        for url in urls:
            try:
                links.append(Link(_check_url(url), label, where="command line"))
            except ValueError as exn:
                raise AcquireError(str(exn)) from None
    if links_file is not None:
        links += parse_links(links_file, label)
    if not links:
        raise AcquireError("nothing to fetch: give URLs with --label, or --links FILE (columns url,label[,start,end])")
    unique: dict[tuple[str, str, float | None, float | None], Link] = {}
    for link in links:
        unique.setdefault((link.url, link.label, link.start, link.end), link)
    return list(unique.values())


def classify_error(exn: Exception) -> tuple[str, str]:
    """(kind, reason) of a yt-dlp error: kind "skipped" (private, removed, age-/geo-blocked...),
    "transient" (worth retrying) or "failed". Other exceptions are re-raised: they are bugs.
    """
    if not isinstance(exn, yt_dlp.utils.YoutubeDLError):
        raise exn
    message = one_line(str(exn).split(" (caused by ")[0])  # the cause repeats the message
    lower = message.lower()
    for pattern, reason in _SKIP_REASONS:
        if re.search(pattern, lower):
            return "skipped", f"{reason} ({message})"
    if _TRANSIENT.search(message):
        return "transient", message
    return "failed", message


class _Logger:
    """Receives yt-dlp's output: progress is dropped, errors arrive as exceptions, warnings are kept (once each)."""

    def __init__(self, limit: int = 5):
        self.warnings: list[str] = []
        self.limit = limit

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        msg = one_line(msg).removeprefix("WARNING: ")
        if not any(n in msg.lower() for n in _NOISE) and msg not in self.warnings and len(self.warnings) < self.limit:
            self.warnings.append(msg)


@dataclass
class _Budget:
    left: float  # items still allowed from one link (--max-items)


def _page_url(info: dict[str, Any], fallback: str) -> str:
    url = info.get("webpage_url") or info.get("original_url") or fallback
    return yt_dlp.utils.unsmuggle_url(url)[0]


def _merge(info: dict[str, Any], outer: dict[str, Any] | None) -> dict[str, Any]:
    """yt-dlp's url_transparent rule: the playlist entry's metadata (e.g. an RSS item's title) wins."""
    if not outer:
        return info
    exempt = {"_type", "url", "ie_key", "id", "extractor", "extractor_key"}
    merged = dict(info)
    merged.update({k: v for k, v in outer.items() if v is not None and k not in exempt})
    return merged


class _Fetch:
    """One `fetch_youtube` run: walks each link (expanding playlists) and fetches every video in it."""

    def __init__(self, out: Path, summary: FetchSummary, sources: SourcesFile, staging: Path, *, max_items: int | None,
                 audio_format: str, ffmpeg: str | None, retries: int, timeout: float, backoff: float,
                 log: Callable[[str], None] | None):
        self.out, self.summary, self.sources, self.staging = out, summary, sources, staging
        self.max_items, self.audio_format, self.ffmpeg = max_items, audio_format, ffmpeg
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.log = log or (lambda line: None)
        self.logger = _Logger()

    def _options(self, link: Link, archive: set[str]) -> dict[str, Any]:
        def sleep(n: int) -> float:
            return min(self.backoff * 2**n, 60.0)

        options: dict[str, Any] = {
            "format": "bestaudio/best",
            "outtmpl": {"default": str(self.staging / "%(extractor_key)s-%(id)s.%(ext)s")},
            "download_archive": archive,  # a set: yt-dlp checks it; sources.csv is the file behind it
            "noplaylist": True,  # watch?v=X&list=Y means the video; pass the playlist URL for the playlist
            "ignoreerrors": False,
            "overwrites": True,
            "quiet": True,
            "noprogress": True,
            "logger": self.logger,
            "socket_timeout": self.timeout,
            "retries": self.retries,
            "fragment_retries": self.retries,
            "extractor_retries": self.retries,
            "retry_sleep_functions": {"http": sleep, "fragment": sleep, "extractor": sleep},
        }
        if self.ffmpeg:
            options["ffmpeg_location"] = self.ffmpeg
            options["postprocessors"] = [{"key": "FFmpegExtractAudio", "preferredcodec": self.audio_format}]
        if link.segment:
            end = link.end if link.end is not None else math.inf
            options["download_ranges"] = yt_dlp.utils.download_range_func(None, [(link.start or 0.0, end)])
            options["force_keyframes_at_cuts"] = True  # exact cuts (re-encode at the edges) instead of keyframes
        return options

    def _retry(self, action: Callable[[], Any]) -> Any:
        return with_retries(action, classify_error, self.retries, self.backoff)

    def _report(self, outcome: Outcome, budget: _Budget, detail: str = "") -> None:
        budget.left -= 1
        self.summary.outcomes.append(outcome)
        if outcome.status == "fetched":
            self.log(f"fetched  {outcome.path}  {detail}".rstrip())
        elif outcome.status in ("skipped", "failed"):
            self.log(f"{outcome.status:<8} {outcome.item}: {outcome.reason}")

    def link(self, link: Link) -> None:
        archive = self.sources.archived(link.label, link.start, link.end)
        budget = _Budget(self.max_items if self.max_items is not None else math.inf)
        with yt_dlp.YoutubeDL(self._options(link, archive)) as ydl:
            self._visit(ydl, link, link.url, None, None, 0, budget)

    def _visit(self, ydl: yt_dlp.YoutubeDL, link: Link, url: str, ie_key: str | None, outer: dict[str, Any] | None,
               depth: int, budget: _Budget) -> None:
        shown = yt_dlp.utils.unsmuggle_url(url)[0]
        try:
            info = self._retry(lambda: ydl.extract_info(url, download=False, process=False, ie_key=ie_key))
        except ItemError as exn:
            return self._report(Outcome(exn.status, shown, exn.reason), budget)
        if info is None:  # yt-dlp found the id in the archive before asking the site anything
            return self._report(Outcome("already", shown), budget)
        self._handle(ydl, link, info, outer, shown, depth, budget)

    def _handle(self, ydl: yt_dlp.YoutubeDL, link: Link, info: dict[str, Any], outer: dict[str, Any] | None,
                shown: str, depth: int, budget: _Budget) -> None:
        kind = info.get("_type", "video")
        if kind in ("url", "url_transparent"):
            if depth >= MAX_DEPTH:
                return self._report(Outcome("failed", shown, "too many redirections between extractors"), budget)
            return self._visit(ydl, link, info["url"], info.get("ie_key"),
                               _merge(info, outer) if kind == "url_transparent" else outer, depth + 1, budget)
        if kind in ("playlist", "multi_video"):
            return self._playlist(ydl, link, info, shown, depth, budget)
        return self._video(ydl, link, _merge(info, outer), shown, budget)

    def _playlist(self, ydl: yt_dlp.YoutubeDL, link: Link, info: dict[str, Any], shown: str, depth: int,
                  budget: _Budget) -> None:
        if depth >= MAX_DEPTH:
            return self._report(Outcome("failed", shown, f"playlists nested more than {MAX_DEPTH} deep"), budget)
        entries: Iterable[Any] = info.get("entries") or ()
        try:
            for entry in entries:  # lazy for channels: pages are fetched only as far as --max-items needs
                if budget.left <= 0:
                    break
                if not entry:
                    continue
                kind = entry.get("_type", "video")
                if kind in ("url", "url_transparent"):
                    if entry.get("id") and entry.get("ie_key") and archive_key(entry["ie_key"], entry["id"]) in (
                            ydl.archive):
                        self._report(Outcome("already", yt_dlp.utils.unsmuggle_url(entry["url"])[0]), budget)
                        continue
                    self._visit(ydl, link, entry["url"], entry.get("ie_key"),
                                entry if kind == "url_transparent" else None, depth + 1, budget)
                else:
                    self._handle(ydl, link, entry, None, shown, depth + 1, budget)
        except yt_dlp.utils.YoutubeDLError as exn:  # a page of the playlist could not be listed
            kind, reason = classify_error(exn)
            self._report(Outcome("failed" if kind == "transient" else kind, shown,
                                 f"listing stopped: {reason}"), budget)

    def _video(self, ydl: yt_dlp.YoutubeDL, link: Link, info: dict[str, Any], shown: str, budget: _Budget) -> None:
        extractor = info.get("extractor_key") or info.get("ie_key") or "generic"
        key = archive_key(extractor, str(info.get("id")))
        url = _page_url(info, shown)
        if key in ydl.archive or self.sources.has(link.label, link.start, link.end, key):
            return self._report(Outcome("already", url), budget)
        duration = info.get("duration")
        if link.start and duration and link.start >= duration:
            return self._report(Outcome("failed", url, f"the segment starts at {format_seconds(link.start)} s but the "
                                        f"recording is {format_seconds(duration)} s long ({link.where})"), budget)
        try:
            result = self._retry(lambda: ydl.process_ie_result(dict(info), download=True))
            path = Path(result["requested_downloads"][0]["filepath"])
        except ItemError as exn:
            return self._report(Outcome(exn.status, url, exn.reason), budget)
        except (KeyError, IndexError, TypeError):
            return self._report(Outcome("failed", url, "yt-dlp reported no downloaded file"), budget)
        problem = check_audio_file(path)
        if problem:
            path.unlink(missing_ok=True)
            return self._report(Outcome("failed", url, problem), budget)
        stem = safe_name(str(info["id"])) + segment_suffix(link.start, link.end)
        rel = place_file(path, self.out, link.folder or link.label, stem)
        self.sources.add({
            "path": rel, "label": link.label, "url": url, "link": link.url, "extractor": extractor.lower(),
            "id": info["id"], "title": info.get("title"), "uploader": info.get("uploader") or info.get("channel"),
            "duration": format_seconds(duration) if duration else "", "start": format_seconds(link.start),
            "end": format_seconds(link.end), "license": info.get("license"), "fetched_at": now_iso(),
            "tool": f"yt-dlp {yt_dlp.version.__version__}",
        })
        self._report(Outcome("fetched", url, path=rel), budget, detail=str(info.get("title") or ""))


def fetch_youtube(links: Sequence[Link], out: str | Path, *, max_items: int | None = None, audio_format: str = "wav",
                  retries: int = 3, timeout: float = 30.0, backoff: float = 2.0,
                  log: Callable[[str], None] | None = None) -> FetchSummary:
    """Download the audio of every link (videos; playlists and channels expanded) into `out/<label>/`.

    Args:
        links: from `collect_links` / `parse_links`.
        out: the RAW folder (created); provenance is appended to `out/sources.csv`.
        max_items: at most this many videos from each link (playlists, channels); None = all.
        audio_format: "wav" or "flac", what ffmpeg extracts to (without ffmpeg the container is kept).
        retries: further attempts after a transient error (timeouts, HTTP 429/5xx), waiting
            backoff, 2 x backoff, ... seconds; yt-dlp's own download retries use the same numbers.
        timeout: socket timeout in seconds for every request.
        log: called with one line per fetched, skipped or failed item, as it happens.

    Returns:
        The summary (`.format()` is the report; `.exit_code` is 1 only if nothing could be fetched).

    Raises:
        AcquireError: before anything is downloaded, e.g. segments requested but ffmpeg missing.
    """
    if audio_format not in AUDIO_FORMATS:
        raise AcquireError(f"audio format {audio_format!r} is not one of {', '.join(AUDIO_FORMATS)}")
    if max_items is not None and max_items < 1:
        raise AcquireError(f"--max-items must be at least 1 (got {max_items})")
    ffmpeg = find_ffmpeg()
    cuts = [link for link in links if link.segment]
    if cuts and ffmpeg is None:
        where = ", ".join(link.where or link.url for link in cuts[:5]) + (" ..." if len(cuts) > 5 else "")
        raise AcquireError(f"cutting segments (start/end) needs ffmpeg, which is not installed: install it (e.g. "
                           f"`sudo apt-get install ffmpeg`) or remove start/end from {where}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = FetchSummary(out)
    staging = staging_dir(out)
    run = _Fetch(out, summary, SourcesFile(out), staging, max_items=max_items, audio_format=audio_format, ffmpeg=ffmpeg,
                 retries=retries, timeout=timeout, backoff=backoff, log=log)
    try:
        for link in links:
            run.link(link)
    finally:
        remove_staging(staging)
    summary.notes += [f"yt-dlp: {w}" for w in run.logger.warnings]
    note = ffmpeg_note(o.path for o in summary.fetched)
    if note:
        summary.notes.append(note)
    return summary
