"""What a build reads: the recordings of an input folder, an s3:// or gs:// prefix laid out the same way, or a CSV.

    found = discover("raw/", cfg)                 # raw/<class>/**/*.wav
    found = discover("s3://bucket/raw/", cfg)     # the same layout in a bucket (sizes and ETags from the listing)
    found = discover("files.csv", cfg)            # path,label[,group][,split]; a path may be a URL

The list is made before any audio is decoded, from names, sizes and (for URLs) ETags only: the split, the
write order and a build's identity follow from it alone, the same on every machine. Whatever cannot be used
is named: a skipped input with its reason, ignored files counted by kind, a warning per class left out.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from audioshard import labels
from audioshard import sources as urls
from audioshard.config import Config
from audioshard.errors import BuildError, SourceError
from audioshard.names import SPLITS
from audioshard.sources import RemoteSource
from audioshard.split import Source, group_of


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
    folders with no audio file are reported and left out. `input_path` may also be an s3:// or gs://
    prefix laid out the same way.
    """
    if urls.is_prefix_url(str(input_path)):
        return _discover_prefix(str(input_path), cfg)
    if "://" in str(input_path):
        raise BuildError(f"{input_path}: an input URL is an s3:// or gs:// prefix with one folder per class; "
                         "http(s):// files go in a CSV's path column")
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
    class_names = _without_listed_folders(input_path, class_names, {e.name for e in top if e.is_file()}, found)
    outside = sum(1 for e in top if e.is_file() and e.name != "sources.csv")
    if outside:
        found.ignored["files outside class folders"] = outside
    if not class_names:
        raise BuildError(found.warnings[0] if found.warnings else
                         f"{input_path}: no class subfolders. Put each class's recordings in its own folder, "
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


def _without_listed_folders(input_path: Path, names: list[str], files: set[str], found: Discovery) -> list[str]:
    """Folders with a CSV of the same name beside them (RAW/audioset/ and RAW/audioset.csv, as `fetch youtube
    --audioset` writes them) hold clips whose labels are in that CSV, often several per clip: as a class
    folder they would all be one class named after the folder. They are left out, and said so."""
    listed = [name for name in names if f"{name}.csv" in files]
    for name in listed:
        found.warnings.append(f"folder {input_path / name} is left out: its clips are listed with their labels in "
                              f"{input_path / name}.csv; build from that CSV (audioshard build "
                              f"{input_path / name}.csv --out ...)")
    return [name for name in names if name not in listed]


def _group_by_origin(input_path: Path, sources: list[Source]) -> list[Source]:
    """Files fetched from one video (several segments of it) form one group, per RAW/sources.csv,
    so that no recording straddles two splits."""
    listing = input_path / "sources.csv"
    if not listing.is_file():
        return sources
    with open(listing, newline="", encoding="utf-8-sig") as stream:
        return _grouped(csv.DictReader(stream), sources)


def _grouped(rows, sources: list[Source]) -> list[Source]:
    origin = {row["path"]: f"{row.get('extractor', '')}:{row['id']}" for row in rows
              if row.get("path") and row.get("id")}
    return [dataclasses.replace(s, group=origin[s.rel]) if s.rel in origin else s for s in sources]


def _discover_prefix(prefix: str, cfg: Config) -> Discovery:
    """The objects under an s3:// or gs:// prefix laid out like a local input folder (PREFIX/CLASS/...), in
    the order a local folder lists them and named by their keys relative to the prefix as a local folder's
    files are by their paths: the same audio gives the same split, order and shards wherever it is read
    from. Sizes and ETags come with the listing; an object over the size cap is a named skip."""
    if prefix.lower().endswith(".csv"):
        raise BuildError(f"{prefix}: a CSV input is read from this machine: copy it here first (e.g. aws s3 cp "
                         f"{prefix} .); its rows may be URLs")
    urls.require_client({urls.scheme(prefix)})
    root = prefix if prefix.endswith("/") else prefix + "/"
    try:
        listed = urls.list_prefix(root, cfg.fetcher())
    except SourceError as exn:
        raise BuildError(f"cannot list the input {root}: {exn}") from exn
    if not listed:
        raise BuildError(f"{root}: no objects under this prefix. Put each class's recordings under its own "
                         f"folder, e.g. {root}drone/*.wav and {root}car/*.wav")
    entries = sorted((tuple(obj.url[len(root):].split("/")), obj) for obj in listed if not obj.url.endswith("/"))
    found = Discovery(sources=[])
    if outside := sum(1 for parts, _ in entries if len(parts) == 1 and parts[0] != "sources.csv"):
        found.ignored["files outside class folders"] = outside
    in_classes = [(parts, obj) for parts, obj in entries if len(parts) > 1 and not parts[0].startswith(".")]
    for label, members in itertools.groupby(in_classes, key=lambda entry: entry[0][0]):  # sorted: one run a class
        if not sum(_add_listed(found, parts, obj, cfg) for parts, obj in members):
            found.warnings.append(f"class folder {root}{label}/ has no audio files (extensions: "
                                  f"{', '.join(sorted(e.lower() for e in cfg.audio.extensions))}); class {label!r} "
                                  "is left out")
    if not cfg.split.group_regex and ("sources.csv",) in {parts for parts, _ in entries}:
        found.sources = _group_by_listing(root + "sources.csv", found, cfg)
    return found


def _add_listed(found: Discovery, parts: tuple[str, ...], obj, cfg: Config) -> bool:
    """One object below a class folder of a prefix: a source, or counted as ignored, or a named skip (True
    for an audio file, used or skipped)."""
    suffix = os.path.splitext(parts[-1])[1].rstrip(".")
    rel = "/".join(parts)
    if any(part.startswith(".") for part in parts[1:]):
        found.ignored["hidden files"] += 1
    elif suffix.lower() not in {e.lower() for e in cfg.audio.extensions}:
        found.ignored[f"non-audio files ({suffix or 'no extension'})"] += 1
    else:
        try:
            urls.check_size(obj.url, obj.size)
        except SourceError as exn:
            found.skipped.append({"path": rel, "reason": str(exn)})
            return True
        found.sources.append(RemoteSource(obj.url, rel, parts[0], group_of(rel, cfg.split.group_regex),
                                          size=obj.size, etag=obj.etag))
        return True
    return False


def _group_by_listing(url: str, found: Discovery, cfg: Config) -> list[Source]:
    """_group_by_origin for a prefix: its sources.csv read like a manifest (bounded); unreadable is a warning."""
    try:
        text = cfg.fetcher().read(url).decode("utf-8-sig")
    except (SourceError, UnicodeDecodeError) as exn:
        found.warnings.append(f"{url} could not be read ({exn}); recordings are grouped one per file")
        return found.sources
    return _grouped(csv.DictReader(io.StringIO(text, newline="")), found.sources)


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
            rel, label = (row.get("path") or "").strip(), labels.joined(row.get("label") or "")
            split = (row.get("split") or "").strip() or None
            if not rel or not label:
                found.skipped.append({"path": rel or f"{csv_path.name}:{line}",
                                      "reason": f"{csv_path.name} line {line}: empty path or label"})
                continue
            if split is not None and split not in SPLITS:
                found.skipped.append({"path": rel, "reason": f"{csv_path.name} line {line}: split {split!r} is not "
                                      f"one of {', '.join(SPLITS)}"})
                continue
            if "://" in rel:  # a URL: not a file of this machine, so the rule below does not apply
                _add_url_row(found, lines, rel, label, split, row, f"{csv_path.name} line {line}", line, cfg)
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
            found.sources.append(Source(str(path.resolve()), rel, label, group, split, labels.parse(label)))
            lines.append(line)
    if outside:
        found.warnings.append(f"{outside} rows of {csv_path.name} name files outside its folder {folder} and were "
                              "refused (a CSV must not pull in other files of this machine); if the CSV is yours, "
                              "set shards.csv_allow_outside = true (--set shards.csv_allow_outside=true)")
    lines = _stat_url_rows(found, lines, csv_path.name, cfg)
    return _drop_duplicates(found, lines, csv_path.name)


def _add_url_row(found: Discovery, lines: list[int], url: str, label: str, split: str | None, row: dict,
                 where: str, line: int, cfg: Config) -> None:
    """A CSV row whose path is a URL: a source to be sized by `_stat_url_rows` (or a skip, for other schemes).
    The URL is the recording's name in the manifest."""
    if not urls.is_audio_url(url):
        found.skipped.append({"path": url, "reason": f"{where}: {urls.scheme(url) or 'this'}:// URLs are not read; "
                              f"use {', '.join(s + '://' for s in urls.AUDIO_SCHEMES)} or a local path"})
        return
    group = (row.get("group") or "").strip() or group_of(url, cfg.split.group_regex)
    found.sources.append(RemoteSource(url, url, label, group, split, labels.parse(label)))
    lines.append(line)


def _stat_url_rows(found: Discovery, lines: list[int], name: str, cfg: Config) -> list[int]:
    """Size and ETag of each URL row before the build (HEAD requests, in parallel, under the Fetcher's timeouts
    and retries); a row whose URL cannot be used (404, refused redirect, over the size cap) is a named skip.
    Returns the CSV lines of the sources kept."""
    wanted = sorted({s.path for s in found.sources if isinstance(s, RemoteSource)})
    if not wanted:
        return lines
    urls.require_client({urls.scheme(url) for url in wanted})
    stats = urls.stat_urls(wanted, cfg.fetcher())
    kept, kept_lines = [], []
    for line, source in zip(lines, found.sources, strict=True):
        stat = stats.get(source.path) if isinstance(source, RemoteSource) else None
        if isinstance(stat, SourceError):
            found.skipped.append({"path": source.rel, "reason": f"{name} line {line}: {stat}"})
            continue
        kept.append(dataclasses.replace(source, size=stat.size, etag=stat.etag) if stat else source)
        kept_lines.append(line)
    found.sources = kept
    return kept_lines


def _drop_duplicates(found: Discovery, lines: list[int], name: str) -> Discovery:
    """One recording listed twice is used once; listed with two labels it is not used at all (which label
    is right is for the CSV's author to say). Each dropped row is reported with its line."""
    first: dict[str, tuple[int, Source]] = {}
    named: dict[str, set[str]] = {}
    for line, source in zip(lines, found.sources, strict=True):
        first.setdefault(source.path, (line, source))
        named.setdefault(source.path, set()).add(source.label)
    kept = []
    for line, source in zip(lines, found.sources, strict=True):
        first_line = first[source.path][0]
        if len(named[source.path]) > 1:
            found.skipped.append({"path": source.rel, "reason": f"{name} line {line}: the same file is listed with "
                                  f"labels {', '.join(sorted(named[source.path]))}; give it one row (several classes: "
                                  f"{labels.SEPARATOR.join(sorted(named[source.path]))})"})
        elif first_line != line:
            found.skipped.append({"path": source.rel, "reason": f"{name} line {line}: the same file as line "
                                  f"{first_line} (used once)"})
        else:
            kept.append(source)
    found.sources = kept
    return found


def check_usable(found: Discovery, input_path: str | Path) -> Discovery:
    """`found`, when it holds something to build; else the BuildError that says what was found instead."""
    if not found.sources:
        raise BuildError(f"{input_path}: no usable audio files found "
                         f"({sum(found.ignored.values())} ignored, {len(found.skipped)} skipped)"
                         + "".join(f"; {warning}" for warning in found.warnings[:3]))
    return found
