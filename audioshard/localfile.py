"""Local build files, opened safely: regular files only, read no further than their size, and the record
of local shards whose sha256 has passed (so that they are not hashed again at every epoch), and the lock by
which processes sharing a folder take turns.

`remote.Fetcher` reads a local build through these; the checks and their reasons are here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import stat
import time
from pathlib import Path
from typing import BinaryIO

from audioshard.errors import IntegrityError

SPOOL_BYTES = 64 << 20  # files larger than this are read from the open file (or a temporary one), not memory
PIECE_BYTES = 1 << 20  # bytes per read while hashing or receiving

FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device (like /dev/zero)"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"))


@contextlib.contextmanager
def taking_turns(folder: Path):
    """Hold an exclusive flock on `folder`, waiting while another process holds it: processes that share a
    folder (a shard cache, a results file) take turns at it. A lock on the folder itself leaves no file
    behind, and the kernel drops it when its process dies (never stale)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_regular(path: str | Path, follow: bool = True) -> BinaryIO:
    """`path` open for reading, when it is a regular file (IntegrityError otherwise, naming what it is).

    A build file's size comes from the file itself, and a FIFO or a link to /dev/zero says 0, then reads
    for ever (or blocks): such files are refused before a byte is read. The open does not block on a FIFO
    (O_NONBLOCK), and the check is made on the open file (fstat), not on a path that could change. Without
    `follow`, a symbolic link is refused too (O_NOFOLLOW): for files audioshard writes itself (the cache)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exn:
        if exn.errno == errno.ELOOP and not follow:
            raise IntegrityError(f"{path}: a symbolic link where audioshard wrote a regular file; refused") from exn
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")
            raise IntegrityError(f"{path}: {kind}, not a regular file; refused before reading (a build's files are "
                                 "the regular files `audioshard build` wrote: copy or rebuild the build folder)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def in_memory_if_small(stream: BinaryIO, size: int, location: str) -> BinaryIO:
    """Up to SPOOL_BYTES: read whole (and closed), to be parsed in place from memory (see
    shardfile.tar_members), never more than `size` + 1 bytes; larger: the open file itself."""
    if size > SPOOL_BYTES:
        return stream
    with stream:
        data = stream.read(size + 1)
    if len(data) != size:
        raise IntegrityError(f"{location}: {len(data)}{'+' if len(data) > size else ''} bytes read where the file "
                             f"said {size}: it changed while read")
    return io.BytesIO(data)


def verified_open(stream: BinaryIO, path: str, identity: os.stat_result, sha256: str,
              record: VerifiedRecord | None = None) -> BinaryIO | None:
    """The open regular file `stream` (whose fstat is `identity`) as a readable stream if its sha256 matches,
    else None; `stream` is returned or closed. With `record`: not hashed when the record holds this very
    file as verified, and recorded once it has passed. Files up to SPOOL_BYTES are read once, and that one
    read serves both the check and the parsing; larger ones are hashed, then read again from the same open
    file, rather than held in memory. Never more than the file's size plus one byte is read."""
    opened = None
    size = identity.st_size
    try:
        seen = time.time()  # the stamps' age is judged as of now, not after a long hash
        if record is not None and record.holds(path, identity, sha256):
            opened = in_memory_if_small(stream, size, path)
            return opened
        if size > SPOOL_BYTES:
            matches = sha256_of(stream, size) == sha256
            stream.seek(0)
            opened = stream if matches else None
        else:
            data = stream.read(size + 1)
            opened = io.BytesIO(data) if len(data) == size and hashlib.sha256(data).hexdigest() == sha256 else None
    finally:
        if opened is not stream:
            stream.close()
    if opened is not None and record is not None:
        record.add(path, identity, sha256, seen)
    return opened


class VerifiedRecord:
    """Local shards whose sha256 passed, so that they are not hashed again at every epoch and run.

    Hashing costs more CPU than everything else streaming does (sha256 runs at ~1.5 GB/s; a shard is
    read at several times that), and a training run reads every shard once per epoch per rank. Like
    git's index, an entry is keyed by the file's identity and change stamps (device, inode, size,
    modification and change time in ns) and the sha256 the manifest expects: any write to the file,
    a copy or a replacement changes the key, and then the shard is hashed again. The change time
    cannot be set back by a program (utime sets it to now). Files changed within the last
    RACY_SECONDS are never recorded: the kernel's timestamps are coarse, and a write in the same
    tick as the check would keep the key (git's "racily clean" case).

    Entries are empty files named by the key's hash under `AUDIOSHARD_CACHE` (default
    $XDG_CACHE_HOME/audioshard, i.e. ~/.cache/audioshard) in verified/: creating one is atomic, so
    loader workers and ranks share the record without locks. The record is used only in a folder no
    one else can write to (see `trusted_folder`); a folder that cannot be used just means hashing
    every time. `audioshard verify` never uses the record.
    """

    RACY_SECONDS = 2.0

    @property
    def folder(self) -> Path:
        base = os.environ.get("AUDIOSHARD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                          "audioshard")
        return Path(base) / "verified"

    def trusted_folder(self, create: bool = False) -> Path | None:
        """The folder when only this user can write to it (owned by us, no group or other write bit, not a
        link), else None: an entry there is as good as a hash, so nobody else may be able to add one. No
        home folder, or one that cannot be created: None too (hashing every time)."""
        try:
            folder = self.folder
            if create:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            status = os.lstat(folder)
        except (OSError, RuntimeError, KeyError):  # Path.home() without HOME or a passwd entry: RuntimeError
            return None
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o022:
            return None
        return folder

    def add(self, path: str, identity: os.stat_result, sha256: str, seen: float | None = None) -> None:
        """Record `path` (as `identity` described it at time `seen`, default now) as holding `sha256`."""
        seen = time.time() if seen is None else seen
        if seen - identity.st_ctime < self.RACY_SECONDS or seen - identity.st_mtime < self.RACY_SECONDS:
            return
        folder = self.trusted_folder(create=True)
        if folder is not None:
            with contextlib.suppress(OSError):  # read-only home, full disk: no record, hashing next time
                os.close(os.open(folder / self.key(path, identity, sha256), os.O_CREAT | os.O_WRONLY, 0o600))

    def holds(self, path: str, identity: os.stat_result, sha256: str) -> bool:
        folder = self.trusted_folder()
        return folder is not None and (folder / self.key(path, identity, sha256)).exists()

    @staticmethod
    def key(path: str, identity: os.stat_result, sha256: str) -> str:
        """The entry's name: a hash of the file's identity and change stamps and the expected sha256."""
        fields = (os.path.realpath(path), identity.st_dev, identity.st_ino, identity.st_size, identity.st_mtime_ns,
                  identity.st_ctime_ns, sha256)
        return hashlib.sha256(repr(fields).encode()).hexdigest()


VERIFIED = VerifiedRecord()


def sha256_file(path: str | Path) -> str:
    with open_regular(path) as stream:
        return sha256_of(stream, os.fstat(stream.fileno()).st_size)


def sha256_of(stream: BinaryIO, size: int | None = None) -> str:
    """The sha256 of what is left of `stream`, read a piece at a time (bounded memory); with `size`, of at most
    `size` + 1 bytes ('' when the stream does not hold exactly `size`: it changed while read)."""
    digest, received = hashlib.sha256(), 0
    while piece := stream.read(PIECE_BYTES if size is None else min(PIECE_BYTES, size + 1 - received)):
        digest.update(piece)
        received += len(piece)
    return digest.hexdigest() if size is None or received == size else ""
