"""Fetch the audio files of shared Google Drive folders (recursively) with gdown.

    audioshard fetch drive --label speech --out raw/ https://drive.google.com/drive/folders/FOLDER_ID
    audioshard fetch drive --label speech --out raw/ FOLDER_ID

The folder must be shared as "Anyone with the link". Audio files (by extension, `audio.extensions`)
keep their names and subfolders under `RAW/<label>/` (made file-system safe; a taken name gets
`-2`); other files are counted and left out. Every file gets a provenance row in `RAW/sources.csv`,
which is also the archive: a re-run fetches only files it has not fetched before.

The folder is listed first (`gdown.download_folder(skip_download=True)`), then each file is
downloaded on its own (`gdown.download`), so a quota-exceeded or permission error is reported for
that file and the others still come. gdown before 6.0 cannot list more than 50 files per folder
and raises `FolderContentsMaximumLimitError`; that is reported with what to do.
"""

from __future__ import annotations

import inspect
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import gdown
import requests

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
    now_iso,
    one_line,
    place_file,
    remove_staging,
    safe_name,
    staging_dir,
    with_retries,
)

OLD_LISTING_LIMIT = 50  # files per folder that gdown < 6 could list (Drive's folder page showed no more)
LIMIT_ADVICE = ("gdown {version} lists at most 50 files per Drive folder. Upgrade it (`pip install -U 'gdown>=6'`, "
                "which lists folders of any size), or split the folder into subfolders of at most 50 files "
                "and fetch again (files already fetched are not fetched twice)")
_ID_RE = re.compile(r"^[-\w]{10,}$")
_QUOTA = re.compile(r"too many users|quota", re.IGNORECASE)
_PERMISSION = re.compile(r"permission|anyone with the link|public link|access denied|sign in|status code 403|"
                         r"403 client error", re.IGNORECASE)
_NOT_FOUND = re.compile(r"not found|does not exist|status code 404", re.IGNORECASE)
_TRANSIENT = re.compile(r"timed? ?out|connection (reset|aborted|refused)|status code (429|5\d\d)|"
                        r"(429|5\d\d) (client|server) error", re.IGNORECASE)


def parse_folder_id(text: str) -> str:
    """The folder id of a Drive folder URL (`.../drive/folders/ID?usp=sharing`, `...?id=ID`) or a bare id."""
    text = text.strip()
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme in ("http", "https"):
        match = re.search(r"/folders/([-\w]+)", parsed.path)
        found = match.group(1) if match else (urllib.parse.parse_qs(parsed.query).get("id") or [""])[0]
        if parsed.netloc.endswith("google.com") and _ID_RE.match(found):
            return found
    elif _ID_RE.match(text):
        return text
    raise AcquireError(f"{text!r} is not a Google Drive folder URL (https://drive.google.com/drive/folders/ID) "
                       "or folder id")


def _gdown_errors() -> tuple[type[BaseException], ...]:
    names = ("DownloadError", "FileURLRetrievalError", "FolderContentsMaximumLimitError")
    found = (getattr(gdown.exceptions, name, None) for name in names)
    return tuple(c for c in found if isinstance(c, type))


def classify_error(exn: Exception) -> tuple[str, str]:
    """(kind, reason) of a gdown/requests error: "skipped" (no access, not found), "transient" or "failed".

    A quota-exceeded file is "failed" (it is worth fetching again later) with what to do. Other
    exceptions are re-raised: they are bugs, not download problems.
    """
    message = one_line(str(exn) or type(exn).__name__)
    if type(exn).__name__ == "FolderContentsMaximumLimitError":
        return "failed", LIMIT_ADVICE.format(version=gdown.__version__) + f" ({message})"
    if isinstance(exn, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        requests.exceptions.ChunkedEncodingError)):
        return "transient", message
    if not isinstance(exn, (*_gdown_errors(), requests.exceptions.RequestException, OSError)):
        raise exn
    if _QUOTA.search(message):
        return "failed", ("download quota exceeded: Google Drive allows a shared file only so many downloads a day; "
                          f"fetch again later, or 'Make a copy' into your own Drive and share that ({message})")
    if _PERMISSION.search(message):
        return "skipped", f"no access: share it as 'Anyone with the link' ({message})"
    if _NOT_FOUND.search(message):
        return "skipped", f"not found ({message})"
    if _TRANSIENT.search(message):
        return "transient", message
    return "failed", message


def _supported(function: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments `function` accepts (gdown 5 has no `timeout`, for example)."""
    params = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _fetch_folder(folder_id: str, label: str, out: Path, summary: FetchSummary, sources: SourcesFile, staging: Path,
                  extensions: set[str], retries: int, timeout: float, backoff: float,
                  log: Callable[[str], None]) -> None:
    folder_url = f"https://drive.google.com/drive/folders/{folder_id}"
    try:
        listed = with_retries(lambda: gdown.download_folder(
            id=folder_id, output=str(staging) + "/", **_supported(gdown.download_folder, quiet=True,
                                                                  skip_download=True, timeout=timeout)),
            classify_error, retries, backoff)
    except ItemError as exn:
        summary.outcomes.append(Outcome(exn.status, folder_url, f"cannot list the folder: {exn.reason}"))
        log(f"{exn.status:<8} {folder_url}: cannot list the folder: {exn.reason}")
        return
    files = sorted(listed or [], key=lambda f: f.path)
    per_folder: dict[str, int] = {}
    for item in files:
        parent = posixpath.dirname(item.path.replace("\\", "/"))
        per_folder[parent] = per_folder.get(parent, 0) + 1
    if any(hasattr(gdown.exceptions, "FolderContentsMaximumLimitError") and n == OLD_LISTING_LIMIT
           for n in per_folder.values()):
        full = [p or "(top)" for p, n in per_folder.items() if n == OLD_LISTING_LIMIT]
        summary.notes.append(f"{folder_url}: {', '.join(full)} listed exactly {OLD_LISTING_LIMIT} files; "
                             "the listing may be cut short. " + LIMIT_ADVICE.format(version=gdown.__version__))
    for item in files:
        rel_in_folder = item.path.replace("\\", "/")
        name = posixpath.basename(rel_in_folder)
        ext = posixpath.splitext(name)[1].lower()
        shown = f"{folder_url} {rel_in_folder}"
        if ext not in extensions:
            summary.ignored[f"non-audio files ({ext or 'no extension'})"] += 1
            continue
        key = archive_key("drive", item.id)
        if sources.has(label, None, None, key):
            summary.outcomes.append(Outcome("already", shown))
            continue
        tmp = staging / f"{safe_name(item.id)}{ext}"
        try:
            result = with_retries(lambda item=item, tmp=tmp: gdown.download(
                id=item.id, output=str(tmp), **_supported(gdown.download, quiet=True, timeout=timeout)),
                classify_error, retries, backoff)
            if not result:  # gdown < 5 returns None after printing the error
                raise ItemError("failed", "gdown returned no file")
            problem = check_audio_file(tmp)
            if problem:
                raise ItemError("failed", problem)
        except ItemError as exn:
            tmp.unlink(missing_ok=True)
            summary.outcomes.append(Outcome(exn.status, shown, exn.reason))
            log(f"{exn.status:<8} {shown}: {exn.reason}")
            continue
        stem = safe_name(posixpath.splitext(name)[0])
        rel = place_file(tmp, out, label, stem, subdirs=posixpath.dirname(rel_in_folder).split("/")
                         if posixpath.dirname(rel_in_folder) else ())
        sources.add({"path": rel, "label": label, "url": f"https://drive.google.com/file/d/{item.id}/view",
                     "link": folder_url, "extractor": "drive", "id": item.id, "title": rel_in_folder,
                     "fetched_at": now_iso(), "tool": f"gdown {gdown.__version__}"})
        summary.outcomes.append(Outcome("fetched", shown, path=rel))
        log(f"fetched  {rel}  ({rel_in_folder})")


def fetch_drive(folders: Sequence[str], label: str, out: str | Path, *, extensions: Iterable[str] | None = None,
                retries: int = 3, timeout: float = 60.0, backoff: float = 2.0,
                log: Callable[[str], None] | None = None) -> FetchSummary:
    """Download the audio files of Google Drive folders (recursively) into `out/<label>/`.

    Args:
        folders: folder URLs or ids, shared as "Anyone with the link".
        label: class folder name under `out`.
        out: the RAW folder (created); provenance is appended to `out/sources.csv`.
        extensions: file extensions to fetch (lower case, with the dot); default `audio.extensions`.
        retries: further attempts after a network error (waits backoff, 2 x backoff, ... seconds).
        timeout: seconds gdown waits for the server (gdown >= 6; older versions wait forever).
        log: called with one line per fetched, skipped or failed file, as it happens.

    Returns:
        The summary (`.format()` is the report; `.exit_code` is 1 only if nothing could be fetched).

    Raises:
        AcquireError: bad label or folder id, before anything is downloaded.
    """
    from audioshard.config import load_config

    label = check_label(label)
    if not _supported(gdown.download_folder, skip_download=True):
        raise AcquireError(f"gdown {gdown.__version__} cannot list a folder without downloading it; "
                           "upgrade it: pip install -U 'gdown>=6'")
    ids = [parse_folder_id(f) for f in folders]
    if not ids:
        raise AcquireError("nothing to fetch: give one or more Drive folder URLs or ids")
    exts = {e.lower() for e in (extensions if extensions is not None else load_config().audio.extensions)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = FetchSummary(out)
    sources = SourcesFile(out)
    staging = staging_dir(out)
    try:
        for folder_id in dict.fromkeys(ids):
            _fetch_folder(folder_id, label, out, summary, sources, staging, exts, retries, timeout, backoff,
                          log or (lambda line: None))
    finally:
        remove_staging(staging)
    note = ffmpeg_note(o.path for o in summary.fetched)
    if note:
        summary.notes.append(note)
    return summary
