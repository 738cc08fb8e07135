"""Put a finished build into an object store: `audioshard build ... --out s3://BUCKET/PREFIX/`.

    audioshard build s3://bucket/raw/ --out s3://bucket/shards/                     # one process
    audioshard build s3://bucket/raw/ --out s3://bucket/shards/ --parts 8 --scheduler tcp://host:8786 \\
        --staging /shared/scratch/shards                                          # a cluster: a shared folder

The build is made in a staging folder first (a temporary one, or `--staging`, which a cluster's workers
must all see), complete, merged and verified like any local build. Its files then go up in the order a
reader can trust: an old manifest is removed before any object it names is replaced, the shards and list
files go up next, and the new manifest last, so a reader never finds a manifest naming an object that is
missing or not yet replaced. An object already there with the same size and content (its ETag is the MD5
of what audioshard uploads; or the sha256 audioshard stores in its metadata) is not uploaded again, and a
prefix whose manifest has this build's fingerprint is left alone without building anything: a re-run with
nothing changed uploads nothing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audioshard import s3
from audioshard.errors import BuildError, SourceError
from audioshard.manifest import MANIFEST_NAME, RECORDINGS_PATTERN, SKIPPED_NAME
from audioshard.names import SPLITS
from audioshard.remote import Fetcher
from audioshard.sources import RemoteObject, list_prefix, retried

UPLOAD_THREADS = 8  # objects in flight: one S3 stream runs well below a machine's network
PIECE_BYTES = 1 << 20
_LISTS = "|".join(re.escape(RECORDINGS_PATTERN.format(split=split)) for split in SPLITS)
# What a build writes, and so what a publish may replace or remove: nothing else under the prefix is touched.
OWN_NAMES = re.compile(rf"(part-[0-9]+-of-[0-9]+/)?((train|val|test)-[0-9]{{6}}\.tar|{_LISTS}|"
                       rf"{re.escape(SKIPPED_NAME)}|{re.escape(MANIFEST_NAME)})")


@dataclass
class Published:
    """What a publish did at `url`: object names uploaded, found already there, and removed as stale."""

    url: str
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    bytes: int = 0

    def summary(self) -> str:
        return (f"{self.url}: uploaded {len(self.uploaded)} files ({self.bytes / 1e6:.1f} MB, the manifest last), "
                f"{len(self.unchanged)} already there unchanged, {len(self.removed)} stale removed")


def is_store_url(text: str) -> bool:
    return str(text).startswith("s3://")


def publish_build(url: str, fingerprint: str, build_into: Callable[[Path], dict[str, Any]], fetcher: Fetcher, *,
                  staging: str | Path | None = None, force: bool = False) -> tuple[dict[str, Any], Published | None]:
    """Build into a staging folder with `build_into(folder)` (returns the manifest), then publish it at `url`.

    Returns:
        (manifest, what was published), or (the manifest found at `url`, None) when the prefix already holds
        this build (its manifest's fingerprint is `fingerprint`): nothing is built or uploaded then.
    """
    store = Store(url, fetcher)
    there = store.listing()
    current = store.manifest(there)
    if current is not None and current.get("fingerprint") == fingerprint and not force:
        return current, None
    _refuse_others(store, there, current, force)
    with _staging(staging) as folder:
        manifest = build_into(folder)
        return manifest, publish(folder, manifest, store, there)


def _refuse_others(store: Store, there: dict[str, RemoteObject], current: dict | None, force: bool) -> None:
    """As a local --out: another build, or objects that are not a build, are replaced only with --force."""
    if force:
        return
    if current is not None:
        raise BuildError(f"{store.url} already holds a different build (other inputs or settings). Use --force to "
                         "replace it, or choose another prefix")
    foreign = sorted(name for name in there if not OWN_NAMES.fullmatch(name))
    if foreign:
        raise BuildError(f"{store.url} is not empty and holds no audioshard build ({len(foreign)} other objects, e.g. "
                         f"{foreign[0]}); choose an empty or new prefix, or pass --force to write beside them")


@contextlib.contextmanager
def _staging(staging: str | Path | None) -> Iterator[Path]:
    """The folder the build is made in: `staging` (kept: a re-run finds the build there up to date), or a
    temporary one removed afterwards."""
    if staging is not None:
        Path(staging).mkdir(parents=True, exist_ok=True)
        yield Path(staging)
        return
    folder = tempfile.mkdtemp(prefix="audioshard-staging-")
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(folder: Path, manifest: dict[str, Any], store: Store, there: dict[str, RemoteObject]) -> Published:
    """Upload the files `manifest` names from `folder` that `there` lacks or holds otherwise, the manifest last,
    then remove the build's own objects that the new manifest no longer names."""
    done = Published(store.url)
    files = named_files(manifest)
    changed = [entry for entry in files if not store.holds(there.get(entry[0]), folder / entry[0], entry[2])]
    done.unchanged = [name for name, _, _ in files if name not in {c[0] for c in changed}]
    manifest_path = folder / MANIFEST_NAME
    if changed or not store.holds(there.get(MANIFEST_NAME), manifest_path, None):
        if MANIFEST_NAME in there:  # from here on no manifest can describe objects being replaced
            store.delete(MANIFEST_NAME)
        with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(lambda entry: store.put(folder / entry[0], entry[0], entry[2]), changed))
        store.put(manifest_path, MANIFEST_NAME, None)  # the commit point: last
        done.uploaded = [name for name, _, _ in changed] + [MANIFEST_NAME]
        done.bytes = sum(size for _, size, _ in changed) + manifest_path.stat().st_size
    else:
        done.unchanged.append(MANIFEST_NAME)
    wanted = {name for name, _, _ in files} | {MANIFEST_NAME}
    for name in sorted(set(there) - wanted):
        if OWN_NAMES.fullmatch(name):  # a shard of an earlier, larger build: no manifest names it now
            store.delete(name)
            done.removed.append(name)
    return done


def named_files(manifest: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(name, bytes, sha256) of every file a manifest names: the shards, then the list files."""
    shards = [(s["file"], s["bytes"], s["sha256"]) for split in SPLITS for s in manifest["splits"][split]["shards"]]
    lists = [manifest["splits"][split].get("recordings_file") for split in SPLITS] + [manifest.get("skipped_file")]
    return shards + [(f["file"], f["bytes"], f["sha256"]) for f in lists if f]


class Store:
    """One s3:// prefix: listing, reading the manifest, comparing, uploading and deleting its objects."""

    def __init__(self, url: str, fetcher: Fetcher):
        if not is_store_url(url):
            raise BuildError(f"--out {url}: an object store output is s3://BUCKET/PREFIX/ (other URLs cannot be "
                             "written; build into a folder and copy it with your store's tool)")
        self.url = url if url.endswith("/") else url + "/"
        self.bucket, _, self.prefix = self.url.removeprefix("s3://").partition("/")
        self.fetcher = fetcher

    def listing(self) -> dict[str, RemoteObject]:
        """Every object under the prefix by its name relative to it."""
        try:
            return {obj.url[len(self.url):]: obj for obj in list_prefix(self.url, self.fetcher)}
        except SourceError as exn:
            raise BuildError(f"cannot list --out {self.url}: {exn}") from exn

    def manifest(self, there: dict[str, RemoteObject]) -> dict[str, Any] | None:
        if MANIFEST_NAME not in there:
            return None
        try:
            data = self.fetcher.read_json(self.url + MANIFEST_NAME)
        except (SourceError, ValueError) as exn:
            raise BuildError(f"{self.url}{MANIFEST_NAME} cannot be read ({exn}); remove it or pass --force") from exn
        return data if isinstance(data, dict) else {}

    def holds(self, found: RemoteObject | None, path: Path, sha256: str | None) -> bool:
        """True when `found` (the listing's entry) has the size and content of the local file `path`."""
        if found is None or found.size != path.stat().st_size:
            return False
        if "-" not in found.etag:  # a single-part upload: its ETag is the MD5 of its bytes
            return found.etag == _digest(path, hashlib.md5)
        return self._stored_sha256(found.url) == (sha256 or _digest(path, hashlib.sha256))

    def _stored_sha256(self, url: str) -> str:
        key = url.removeprefix(f"s3://{self.bucket}/")
        with s3.errors(url):
            head = s3.client(self.fetcher.timeout).head_object(Bucket=self.bucket, Key=key)
        return head.get("Metadata", {}).get("sha256", "")

    def put(self, path: Path, name: str, sha256: str | None) -> None:
        """One file up, in one PUT (so that its ETag is its MD5), its sha256 in the object's metadata."""
        sha256 = sha256 or _digest(path, hashlib.sha256)
        url = self.url + name

        def once() -> None:
            with open(path, "rb") as body, s3.errors(url):
                s3.client(self.fetcher.timeout).put_object(Bucket=self.bucket, Key=self.prefix + name, Body=body,
                                                           Metadata={"sha256": sha256})
        try:
            retried(once, self.fetcher, url)
        except SourceError as exn:
            raise BuildError(f"uploading {path} to {url} failed: {exn}. The new manifest was not uploaded, so no "
                             "reader sees a half-published build; run the same command again (objects already "
                             "there are not uploaded again)") from exn

    def delete(self, name: str) -> None:
        url = self.url + name
        try:
            retried(lambda: self._delete_once(url, name), self.fetcher, url)
        except SourceError as exn:
            raise BuildError(f"removing {url} failed: {exn}; run the same command again") from exn

    def _delete_once(self, url: str, name: str) -> None:
        with s3.errors(url):
            s3.client(self.fetcher.timeout).delete_object(Bucket=self.bucket, Key=self.prefix + name)


def _digest(path: Path, kind) -> str:
    digest = kind()
    with open(path, "rb") as stream:
        while piece := stream.read(PIECE_BYTES):
            digest.update(piece)
    return digest.hexdigest()
