"""Stream batches from shards: an IterableDataset over build folders: local, http(s):// or s3://.

The pipeline, stage by stage (each a small function below):

    manifest -> shard list -> shuffle shards (per epoch) -> split by DDP rank, then by DataLoader
    worker -> read tar members (webdataset) -> safe decode of each block (np arrays only, header
    checked against the manifest before allocating, never pickle) -> shuffle buffer of blocks ->
    batches (x: (B, 1, n_mels, frames) float16, y: (B,) int64, source: (B,), start: (B,))

Normalisation and augmentation act on whole batches (`audioshard.augment.BatchTransform`): in the
worker for library users, or on the accelerator in `audioshard train`.

Work is split so that every (rank, worker) reads a disjoint part of the split and together they
read all of it once: by whole shards when there are at least as many shards as readers, otherwise
readers share a shard and take every k-th block of it. Per-reader sample counts follow from the
manifest alone, so the number of batches per epoch is known before reading anything.
"""

from __future__ import annotations

import ast
import io
import itertools
import math
import multiprocessing as mp
import os
import queue
import random
import sys
import tarfile
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from webdataset.tariterators import group_by_keys

from audioshard.distributed import in_process_group, rank_and_size
from audioshard.errors import AudioshardError
from audioshard.manifest import BLOCK_MEMBERS, Manifest, ShardInfo, load_manifest
from audioshard.remote import DEFAULT_FETCHER, IntegrityError
from audioshard.termsafe import printable

MAX_REPORTS = 20  # bad-data lines printed per stream before only counting


class ShardDataError(AudioshardError, ValueError):
    """A block in a shard is malformed (bad array, wrong shape or dtype, NaN); names shard and key."""


class Batch(NamedTuple):
    """One batch. x: (B, 1, n_mels, frames) float16 dB (float32 once transformed); y: (B,) int64 class
    index; source: (B,) int64 index into the split's `sources`; start: (B,) float32 seconds."""

    x: torch.Tensor
    y: torch.Tensor
    source: torch.Tensor
    start: torch.Tensor


@dataclass(frozen=True)
class ReadTask:
    """Part of one shard for one reader: blocks `offset, offset + stride, ...` of it."""

    shard: ShardInfo
    stride: int = 1
    offset: int = 0


def block_sizes(shard: ShardInfo, block_size: int) -> list[int]:
    """Chunks in each block of a shard (all full but possibly the last)."""
    full, rest = divmod(shard.samples, block_size)
    return [block_size] * full + ([rest] if rest else [])


def shard_order(shards: list[ShardInfo], epoch: int, seed: int, shuffle: bool) -> list[ShardInfo]:
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def reader_tasks(shards: list[ShardInfo], reader: int, readers: int) -> list[ReadTask]:
    """The disjoint part of `shards` that reader `reader` of `readers` reads (readers = ranks x workers)."""
    if len(shards) >= readers:
        return [ReadTask(s) for s in shards[reader::readers]]
    if not shards:
        return []
    index = reader % len(shards)
    sharing = len(range(index, readers, len(shards)))  # readers that split this shard between them
    return [ReadTask(shards[index], stride=sharing, offset=reader // len(shards))]


def task_samples(task: ReadTask, block_size: int) -> int:
    return sum(block_sizes(task.shard, block_size)[task.offset::task.stride])


# --- safe tar reading ---------------------------------------------------------------------------

NPY_HEADER_SLACK = 1 << 16  # magic + header dict of one .npy member (np.save writes 128 bytes)
MAX_META_BYTES = 1 << 16  # a long-name or pax header (audioshard's own shards have none)
META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
              tarfile.SOLARIS_XHDTYPE)


class UnsafeMemberError(tarfile.TarError):
    """A tar member no audioshard shard holds (sparse, a link, outsized): refused before it is read.
    Not a tarfile.HeaderError on purpose: tarfile takes those, past the first member, for the archive's end."""


class _PlainTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile reads them, the headers whose data it would read whole or inflate: a
    sparse member reads back its holes as zeros (a 10 KB tar can claim GBs), and long-name/pax headers
    are read into memory at their declared size."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeMemberError(f"member {self.name!r} is a sparse file; shards hold plain files only")
        if self.type in META_TYPES and self.size > MAX_META_BYTES:
            raise UnsafeMemberError(f"a {self.size}-byte long-name/pax header; at most {MAX_META_BYTES} are read")
        return super()._proc_member(tar)


COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _refuse_compressed(stream) -> None:
    """Name a compressed shard for what it is (tarfile alone would say "bad checksum")."""
    head = stream.read(6)
    stream.seek(0)
    for magic, name in COMPRESSED.items():
        if head.startswith(magic):
            raise UnsafeMemberError(f"{name}-compressed; audioshard reads plain tar shards only (it never "
                                    "inflates one: a small compressed shard can expand without bound)")


def member_limits(manifest: Manifest) -> dict[str, int]:
    """The most bytes each block member of this build can hold (a full block plus header room)."""
    rows, features = manifest.block_size, manifest.features
    mel = rows * math.prod(features.shape) * np.dtype(features.dtype).itemsize
    sizes = {"mel.npy": mel, "label.npy": 2 * rows, "source.npy": 4 * rows, "start.npy": 4 * rows}
    return {name: size + NPY_HEADER_SLACK for name, size in sizes.items()}


def tar_members(stream, location: str, limits: dict[str, int]) -> Iterator[dict[str, Any]]:
    """The block members of a shard, each checked before it is read, as webdataset's sample parts
    ({"fname", "data", "__url__"}), then {} at the end (what `group_by_keys` expects).

    Plain tars only: mode "r|" never decompresses, where webdataset's "r|*" would inflate a small
    gzip/bz2/xz shard to any size. Memory per member is bounded by `limits`, from the manifest.
    A shard held in memory whose headers are all plain files (what `audioshard build` writes) is read
    by `plain_members`, in place; anything else by tarfile.
    """
    _refuse_compressed(stream)
    if isinstance(stream, io.BytesIO):
        data = stream.getvalue()  # the bytes it was made from, not a copy
        spans = plain_spans(data)
        if spans is not None:
            yield from plain_members(data, spans, location, limits)
            return
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=_PlainTarInfo) as tar:
        for member in tar:
            tar.members = []  # a stream has no index to keep: drop each header once seen
            suffix = member.name.rsplit("/", 1)[-1].split(".", 1)[-1]
            if suffix not in limits:
                continue  # skipped by reading past it in small pieces, never as a whole
            if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.sparse is not None:
                raise UnsafeMemberError(f"member {member.name!r} is not a plain file (type {member.type!r})")
            if member.size > limits[suffix]:
                raise UnsafeMemberError(f"member {member.name!r} claims {member.size} bytes; a block of this "
                                        f"build holds at most {limits[suffix]}: forged or foreign shard")
            yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": location}
    yield {}


TAR_BLOCK = 512
_ZERO_HEADER = bytes(TAR_BLOCK)


def plain_spans(data: bytes) -> list[tuple[str, int, int]] | None:
    """(name, start, size) of every member of an in-memory tar when all of them are plain files with
    valid ustar headers, in bounds; None when anything else appears (long names, pax headers, links,
    sparse files, base-256 sizes, a bad checksum, data past the end), for tarfile to read or refuse.

    Python's tarfile costs ~30 us a member in pure-Python header parsing, about a third of all the
    work of streaming a shard; our own shards hold plain members only, and this reads them ~20x faster.
    """
    spans, offset, end = [], 0, len(data)
    while offset + TAR_BLOCK <= end:
        header = data[offset:offset + TAR_BLOCK]
        if header == _ZERO_HEADER:
            return spans
        if header[156:157] not in (b"0", b"\0") or header[124] & 0x80 or not _checksum_ok(header):
            return None
        try:
            size = int(header[124:136].rstrip(b"\0 ").strip() or b"0", 8)
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar: a name prefix
            return None
        start = offset + TAR_BLOCK
        if start + size > end:
            return None
        spans.append((name, start, size))
        offset = start + -(-size // TAR_BLOCK) * TAR_BLOCK
    return spans if offset >= end else None


def _checksum_ok(header: bytes) -> bool:
    """The ustar header checksum: the sum of its bytes with the checksum field read as spaces."""
    try:
        stored = int(header[148:156].rstrip(b"\0 ").strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header) - sum(header[148:156]) + 8 * 32


def plain_members(data: bytes, spans: list[tuple[str, int, int]], location: str,
                  limits: dict[str, int]) -> Iterator[dict[str, Any]]:
    """`tar_members` for a tar checked by `plain_spans`: its members as views into `data`, no copies."""
    view = memoryview(data)
    for name, start, size in spans:
        suffix = name.rsplit("/", 1)[-1].split(".", 1)[-1]
        if suffix not in limits:
            continue
        if size > limits[suffix]:
            raise UnsafeMemberError(f"member {name!r} claims {size} bytes; a block of this build holds at most "
                                    f"{limits[suffix]}: forged or foreign shard")
        yield {"fname": name, "data": view[start:start + size], "__url__": location}
    yield {}


# --- safe decoding -----------------------------------------------------------------------------

NPY_MAGIC = b"\x93NUMPY"


def decode_npy(data: bytes, dtype: str, shape_tail: tuple[int, ...], max_rows: int, where: str) -> np.ndarray:
    """Parse an .npy member without pickle, checking its header before touching the data.

    The header is read with `ast.literal_eval` (never `np.load`), dtype and shape are checked
    against what the manifest promises, and only then is the payload viewed with `np.frombuffer`;
    a forged header cannot make us allocate anything.
    """
    descr, fortran, shape, payload_start = npy_header(data, where)
    try:
        expected_dtype = isinstance(descr, str) and np.dtype(descr) == np.dtype(dtype) and fortran is False
    except TypeError:  # not a dtype numpy knows
        expected_dtype = False
    if not expected_dtype:
        raise ShardDataError(f"{where}: dtype {descr!r} (fortran={fortran}), expected {np.dtype(dtype).str}")
    if not all(type(dim) is int for dim in shape):  # 63.0 or True would pass the comparison below
        raise ShardDataError(f"{where}: shape {shape} has non-integer dimensions")
    if len(shape) != 1 + len(shape_tail) or tuple(shape[1:]) != shape_tail or not 0 < shape[0] <= max_rows:
        raise ShardDataError(f"{where}: shape {shape}, expected (1..{max_rows}, {', '.join(map(str, shape_tail))})")
    payload = memoryview(data)[payload_start:]
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(payload) != expected:
        raise ShardDataError(f"{where}: {len(payload)} data bytes, header promises {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def npy_header(data: bytes, where: str) -> tuple[Any, Any, tuple, int]:
    """(descr, fortran_order, shape, payload offset) of .npy bytes, parsed as a literal, never evaluated."""
    if bytes(data[:len(NPY_MAGIC)]) != NPY_MAGIC or len(data) < 10:  # data: bytes or a memoryview
        raise ShardDataError(f"{where}: not an .npy array")
    major = data[6]
    if major == 1:
        header_len, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        header_len, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise ShardDataError(f"{where}: unsupported .npy version {major}")
    try:
        return (*_npy_header(bytes(data[start:start + header_len])), start + header_len)
    except (ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError, MemoryError, RecursionError) as exn:
        raise ShardDataError(f"{where}: malformed .npy header") from exn


@lru_cache(maxsize=256)
def _npy_header(text: bytes) -> tuple[Any, Any, tuple]:
    """(descr, fortran_order, shape) of an .npy header dict, parsed as a literal (never evaluated).
    Cached: every full block of a build has the same header, and parsing is a third of decode time."""
    header = ast.literal_eval(text.decode("latin1"))
    return header["descr"], header["fortran_order"], tuple(header["shape"])


def _finite_float16(values: np.ndarray) -> bool:
    """np.isfinite for float16, cheaper: NaN and inf are exactly the values with all exponent bits set."""
    if values.dtype != np.float16:
        return bool(np.isfinite(values).all())
    return not np.any((values.view(np.uint16) & 0x7C00) == 0x7C00)


def decode_block(sample: dict[str, Any], manifest: Manifest, sources: int | None = None) -> dict[str, np.ndarray]:
    """Turn one block's raw tar members into checked arrays; raises ShardDataError naming shard and key.
    `sources`: how many recordings the block's `source` indices may point at (unchecked if None)."""
    where = f"{sample.get('__url__')} key {sample.get('__key__')}"
    missing = [m for m in BLOCK_MEMBERS if m not in sample]
    if missing:
        raise ShardDataError(f"{where}: missing members {missing}")
    n = manifest.block_size
    mel = decode_npy(sample["mel.npy"], manifest.features.dtype, manifest.features.shape, n, f"{where} mel.npy")
    rows = len(mel)
    label = decode_npy(sample["label.npy"], "<i2", (), rows, f"{where} label.npy")
    source = decode_npy(sample["source.npy"], "<i4", (), rows, f"{where} source.npy")
    start = decode_npy(sample["start.npy"], "<f4", (), rows, f"{where} start.npy")
    if not len(label) == len(source) == len(start) == rows:
        raise ShardDataError(f"{where}: members disagree on the number of chunks")
    if label.min() < 0 or label.max() >= len(manifest.classes):
        raise ShardDataError(f"{where}: label out of range 0..{len(manifest.classes) - 1}")
    if not _finite_float16(mel):
        raise ShardDataError(f"{where}: NaN or infinite values in mel.npy")
    # Out-of-range sources would silently merge or misattribute recordings in the recording-level results.
    if source.min() < 0 or (sources is not None and source.max() >= sources):
        raise ShardDataError(f"{where}: source index out of range 0..{(sources or 2**31) - 1}")
    if not np.isfinite(start).all() or start.min() < 0:
        raise ShardDataError(f"{where}: start times must be finite seconds >= 0")
    return {"x": mel, "y": label, "source": source, "start": start}


# --- the dataset -------------------------------------------------------------------------------


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one split of a build, streamed from its shards.

    Args:
        manifest: a loaded manifest (`load_manifest(source)`).
        split: "train", "val" or "test".
        batch_size: samples per batch; each reader ends its part with one smaller batch.
        shuffle: shuffle shards per epoch and mix samples across `shuffle_blocks` blocks.
        shuffle_blocks: blocks held in the shuffle buffer (memory: this x block_size chunks).
        seed: with the epoch, rank and worker, fixes every random draw.
        rank, world_size: the DDP process and how many there are (defaults: from torch.distributed).
        transform: optional callable on each Batch, run in the loader worker (e.g. BatchTransform).
        strict: raise on a malformed block instead of skipping it (and counting).
        shards: read only these shards of the split (default: all of them).
    """

    def __init__(self, manifest: Manifest, split: str, batch_size: int, shuffle: bool = False,
                 shuffle_blocks: int = 16, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 transform=None, strict: bool = False, shards: list[ShardInfo] | None = None):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.manifest, self.split, self.batch_size = manifest, split, batch_size
        self.shuffle, self.shuffle_blocks, self.seed = shuffle, max(1, shuffle_blocks), seed
        own_rank, own_size = rank_and_size()
        self.rank = rank if rank is not None else own_rank
        self.world_size = world_size if world_size is not None else own_size
        self.transform, self.strict = transform, strict
        self.shards = manifest.shards(split) if shards is None else shards
        self.epoch = 0
        self.resume_batches = 0  # batches of the epoch to leave out at the next iteration (`load_state_dict`)
        self.num_workers = 1  # set by `loader()` so that batch counts can be computed up front
        # Shared with loader workers (passed to them at process creation), so the trainer can report it.
        self._skipped = mp.Value("l", 0)
        self.hand_overs: list[HandOver] | None = None  # one per loader worker, set by the loader per iteration

    def share_from(self, context) -> None:
        """Make the state shared with loader workers in the multiprocessing context that starts them (a lock
        made for fork cannot be passed to a worker started by the forkserver); the count so far is kept."""
        self._skipped = context.Value("l", self._skipped.value)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.resume_batches = 0

    def _tasks(self, worker: int, workers: int) -> list[ReadTask]:
        order = shard_order(self.shards, self.epoch, self.seed, self.shuffle)
        return reader_tasks(order, self.rank * workers + worker, self.world_size * workers)

    def batches_per_epoch(self, num_workers: int | None = None, rank: int | None = None) -> int:
        """Batches this rank yields in the current epoch (exact: every reader ends with one partial batch)."""
        return sum(self.reader_batches(num_workers, rank))

    def reader_batches(self, num_workers: int | None = None, rank: int | None = None) -> list[int]:
        """Batches each loader worker of this rank yields in the current epoch, known from the manifest."""
        workers = max(1, num_workers if num_workers is not None else self.num_workers)
        rank = self.rank if rank is None else rank
        order = shard_order(self.shards, self.epoch, self.seed, self.shuffle)
        return [math.ceil(sum(task_samples(t, self.manifest.block_size)
                              for t in reader_tasks(order, rank * workers + worker, self.world_size * workers))
                          / self.batch_size) for worker in range(workers)]

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration yield epoch `state["epoch"]` without its first `state["batches"]` batches,
        in the order an uninterrupted iteration would have yielded them (same rank count and workers)."""
        self.set_epoch(int(state["epoch"]))
        total = self.batches_per_epoch()
        if not 0 <= int(state["batches"]) <= total:
            raise ValueError(f"cannot resume at batch {state['batches']} of an epoch of {total} batches "
                             "(was it saved with another batch size, world size or worker count?)")
        self.resume_batches = int(state["batches"])

    def _bad(self, exn: ShardDataError) -> None:
        """Skip and count a bad block or shard (or stop, under `strict`); never silently, never slowly."""
        if self.strict:
            raise exn
        with self._skipped.get_lock():
            self._skipped.value += 1
            reported = self._skipped.value
        if reported <= MAX_REPORTS:
            print(f"audioshard: skipping: {printable(exn)}", file=sys.stderr)
        elif reported == MAX_REPORTS + 1:
            print("audioshard: more bad data skipped; the total is counted in the run's metrics", file=sys.stderr)

    @property
    def skipped_blocks(self) -> int:
        """Bad blocks and shards skipped so far, in this process and its loader workers."""
        return self._skipped.value

    def __iter__(self) -> Iterator[Batch]:
        """The pipeline, stage by stage: this reader's share of the shards -> checked blocks -> shuffled
        batches -> (when resuming) the batches already consumed left out -> the transform -> (in a loader
        worker) packed for the hand-over to the main process."""
        info = torch.utils.data.get_worker_info()
        slot, workers = (info.id, info.num_workers) if info else (0, 1)
        # Read now, not when the generator first runs: the next iteration starts from the epoch's beginning.
        consumed, self.resume_batches = self.resume_batches, 0
        hand_over = self.hand_overs[slot] if info is not None and self.hand_overs else None
        if not consumed:  # the usual case: nothing to leave out, no plan to compute
            return self._batches(slot, workers, 0, packs=info is not None, hand_over=hand_over)
        first, skips = resume_plan(self.reader_batches(workers), consumed, PACK_BATCHES if info else 1)
        # Loader workers take turns from slot 0; rotating readers over slots restores the interrupted order.
        worker = (slot + first) % workers
        return self._batches(worker, workers, skips[worker], packs=info is not None, hand_over=hand_over)

    def _batches(self, worker: int, workers: int, skip: int, packs: bool,
                 hand_over: HandOver | None = None) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        if self.transform is not None and hasattr(self.transform, "reseed"):
            self.transform.reseed(self.seed, self.epoch, self.rank, worker)
        tasks = opened_ahead(self.manifest, self._tasks(worker, workers))
        blocks = (block for task, opening in tasks
                  for block in read_blocks(self.manifest, self.split, task, self._bad, opening))
        capacity = self.shuffle_blocks * self.manifest.block_size if self.shuffle else self.batch_size
        batches = itertools.islice(batched(blocks, self.batch_size, capacity, rng if self.shuffle else None), skip,
                                   None)
        if READ_AHEAD_BATCHES and (not packs or self.transform is not None):
            # Read in a thread while this one runs what follows: the transform, or (without loader workers)
            # the caller's own work. A worker that only reads and hands over gains nothing from it.
            batches = ahead(batches, READ_AHEAD_BATCHES)
        if self.transform is not None:
            batches = (self.transform(batch, index) for index, batch in enumerate(batches, start=skip))
        yield from packed(batches, PACK_BATCHES - skip % PACK_BATCHES, hand_over) if packs else batches


READ_AHEAD_BATCHES = 2  # batches a reader prepares in its thread while the transform or the caller runs


def ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """`items`, produced in a thread up to `depth` ahead of the consumer: reading (file reads, numpy
    copies) and the transform or a training step (torch) mostly run without the GIL, so a reader
    uses a second core instead of alternating between the two kinds of work. Same items, same order; an
    exception in the thread is raised here; leaving early stops the thread at its next item, and
    waits for it."""
    out: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def offer(entry: tuple[Any, BaseException | None]) -> bool:
        """Put `entry` for the consumer, unless it has left (then False)."""
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as exn:  # noqa: BLE001 - handed to the consumer, which raises it
            offer((done, exn))

    thread = threading.Thread(target=produce, name="audioshard-read", daemon=True)
    thread.start()
    try:
        while True:
            item, error = out.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        # Wait for the thread to stop (at most one item away): a thread left running could hold a lock
        # when the process forks next (DataLoader workers), and the child would wait on it forever.
        stop.set()
        if thread is not threading.current_thread():
            thread.join()


def resume_plan(reader_batches: list[int], consumed: int, pack: int) -> tuple[int, list[int]]:
    """(the reader whose turn is next, batches each reader has handed over) after the main process consumed
    `consumed` batches. A DataLoader takes one item (`pack` batches) from each worker in turn, skipping
    workers that are done, so the order follows from the per-reader batch counts alone."""
    skips = [0] * len(reader_batches)
    left, turn = consumed, 0
    while left > 0:
        for reader, total in enumerate(reader_batches):
            take = min(pack, total - skips[reader], left)
            if take <= 0:
                continue
            skips[reader] += take
            left -= take
            if left == 0:
                # mid-pack: the same reader continues; else the next reader with batches left
                turn = reader if skips[reader] % pack and skips[reader] < total else reader + 1
                break
        else:  # a whole round without reaching `consumed`
            if sum(skips) == sum(reader_batches):
                raise ValueError(f"cannot skip {consumed} batches of an epoch of {sum(reader_batches)}")
    return turn % max(1, len(reader_batches)), skips


def open_task(manifest: Manifest, task: ReadTask) -> BinaryIO:
    """A task's shard, read (downloaded) and checked against the manifest's size and sha256."""
    return manifest.fetcher.open_shard(manifest.shard_location(task.shard), task.shard.bytes, task.shard.sha256)


def opened_ahead(manifest: Manifest, tasks: list[ReadTask]) -> Iterator[tuple[ReadTask, Future]]:
    """Each task with its shard being opened one task ahead, in a thread: the next shard is read or
    downloaded and its sha256 checked (both release the GIL) while this one is parsed. Costs one more
    shard in memory per reader; nothing of a shard is parsed before its check has passed."""
    pending: deque[tuple[ReadTask, Future]] = deque()
    pool = ThreadPoolExecutor(1, thread_name_prefix="audioshard-open")
    try:
        for task in tasks:
            pending.append((task, pool.submit(open_task, manifest, task)))
            if len(pending) > 1:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        # Stopped early (or done). Never wait here: an abandoned generator is finalised by the garbage
        # collector in whatever thread runs it, possibly the pool's own, which would wait for itself.
        for _, opening in pending:
            opening.add_done_callback(_close_opened)
        pool.shutdown(wait=False, cancel_futures=True)


def _close_opened(opening: Future) -> None:
    """Close a shard that was opened for nothing (a cancelled or failed opening has nothing to close)."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def read_blocks(manifest: Manifest, split: str, task: ReadTask, bad: Callable[[ShardDataError], None],
                opening: Future | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The blocks of one read task (a shard, every `stride`-th block from `offset`), checked: a shard that
    is not what the manifest promised, a malformed block or a short shard goes to `bad` (skip and count,
    or raise), never silently. `opening`: the shard already being opened (`opened_ahead`)."""
    limits, sources = member_limits(manifest), manifest.source_count(split)
    location = manifest.shard_location(task.shard)
    sizes = block_sizes(task.shard, manifest.block_size)[task.offset::task.stride]
    expected, blocks, read, failed = sum(sizes), 0, 0, 0
    try:
        stream = opening.result() if opening is not None else open_task(manifest, task)
    except IntegrityError as exn:  # never read a shard that is not what the manifest promised
        bad(ShardDataError(str(exn)))
        return
    try:
        for index, sample in enumerate(group_by_keys(tar_members(stream, location, limits))):
            if index % task.stride != task.offset:
                continue
            blocks += 1
            try:
                block = decode_block(sample, manifest, sources - task.shard.source_offset)
            except ShardDataError as exn:
                failed += 1
                bad(exn)
                continue
            read += len(block["y"])
            if task.shard.source_offset:
                block["source"] = block["source"] + task.shard.source_offset
            yield block
    except (tarfile.TarError, ValueError, OSError) as exn:  # unreadable tar structure
        if isinstance(exn, ShardDataError):
            raise
        bad(ShardDataError(f"{location}: not a readable tar shard ({exn})"))
    finally:
        stream.close()
    if blocks != len(sizes) or (not failed and read != expected):
        bad(ShardDataError(f"{location}: read {blocks} blocks ({read} chunks) where the manifest "
                           f"promises {len(sizes)} ({expected} chunks): truncated or altered shard"))


def batched(blocks: Iterable[dict[str, np.ndarray]], batch_size: int, capacity: int,
            rng: np.random.Generator | None) -> Iterator[Batch]:
    """Blocks into batches. With `rng` (shuffling), a buffer of `capacity` chunks: when it is full, whole
    batches are drawn at random from half of the held chunks and the other half is kept to mix with
    the blocks that come next. Without, batches in stored order. The last batch may be smaller.

    The buffer is one preallocated array per field: each chunk is copied in once, and the kept half
    moves to its front, instead of the held blocks being concatenated again at every draw."""
    buffer: dict[str, np.ndarray] = {}
    count = 0
    for block in blocks:
        rows = len(block["y"])
        buffer = _room(buffer, block, count + rows, capacity)
        for key, values in block.items():
            buffer[key][count:count + rows] = values
        count += rows
        if count >= capacity:
            keep = capacity // 2 if rng is not None else 0
            n_emit = (count - keep) // batch_size * batch_size
            if n_emit:
                order = rng.permutation(count) if rng is not None else np.arange(count)
                yield from _emit(buffer, order[:n_emit], batch_size)  # gathers: batches never alias the buffer
                rest = order[n_emit:]
                for values in buffer.values():
                    values[:len(rest)] = values[rest]
                count = len(rest)
    if count:
        yield from _emit(buffer, rng.permutation(count) if rng is not None else np.arange(count), batch_size)


def _room(buffer: dict[str, np.ndarray], block: dict[str, np.ndarray], needed: int,
          capacity: int) -> dict[str, np.ndarray]:
    """The buffer, (re)allocated to hold at least `needed` rows (first `capacity` plus a block)."""
    if buffer and len(buffer["y"]) >= needed:
        return buffer
    rows = max(needed, capacity + len(block["y"]))
    grown = {key: np.empty((rows, *values.shape[1:]), values.dtype) for key, values in block.items()}
    for key, values in buffer.items():
        grown[key][:len(values)] = values
    return grown


def _emit(merged: dict[str, np.ndarray], order: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Batches of `merged` taken in `order` (one gather per batch, no full permuted copy)."""
    for i in range(0, len(order), batch_size):
        take = order[i:i + batch_size]
        yield Batch(torch.from_numpy(merged["x"][take]).unsqueeze(1),
                    torch.from_numpy(merged["y"][take].astype(np.int64)),
                    torch.from_numpy(merged["source"][take].astype(np.int64)),
                    torch.from_numpy(merged["start"][take]))


def packed(batches: Iterable[Batch], first: int = 0, hand_over: HandOver | None = None) -> Iterator[Packed | InSlot]:
    """In a loader worker: batches handed over PACK_BATCHES at a time (unpacked by the loader wrapper),
    through `hand_over`'s slots when there is one; the first group holds `first` (when resuming mid-group,
    the rest of the interrupted group)."""
    send = hand_over.put if hand_over is not None else _pack
    group: list[Batch] = []
    size = first or PACK_BATCHES
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield send(group)
            group, size = [], PACK_BATCHES
    if group:
        yield send(group)


# Batches a loader worker sends to the main process in one transfer. Each transfer moves every tensor
# through shared memory at a fixed cost per tensor; packing 4 batches into 2 tensors cuts that
# per-sample cost, which decides throughput when the work per sample is small.
PACK_BATCHES = 4


class Packed(NamedTuple):
    """Several batches in one worker-to-main transfer: x stacked, and (y, source, start) as float64."""

    x: torch.Tensor
    meta: torch.Tensor
    sizes: torch.Tensor


def _pack(batches: list[Batch]) -> Packed:
    return Packed(torch.cat([b.x for b in batches]), _meta(batches), torch.tensor([len(b.y) for b in batches]))


def _meta(batches: list[Batch], out: torch.Tensor | None = None) -> torch.Tensor:
    """(y, source, start) of the batches as one (rows, 3) float64 tensor (exact for all three)."""
    return torch.cat([torch.stack([b.y.double(), b.source.double(), b.start.double()], dim=1) for b in batches],
                     out=out)


class InSlot(NamedTuple):
    """What a loader worker sends instead of a Packed when its batches are in a HandOver slot."""

    worker: int
    slot: int
    sizes: tuple[int, ...]


HAND_OVER_BYTES = 256 << 20  # the most shared memory the slots of one loader worker may take
# Slots per worker beyond the DataLoader's prefetch_factor (the items it may request ahead): the pack the
# caller is reading, and the previous one until its last batch is dropped.
SPARE_SLOTS = 2


class HandOver:
    """Reused shared-memory slots through which one loader worker hands packs of batches to the main process.

    The DataLoader's own transport puts every tensor it sends in new shared memory: the worker creates
    a segment and copies into it, the main process maps it, and both fault in every page of it, once
    per batch. With loader workers that kernel time cost more than reading the shards (two page faults
    per 8 KB chunk on each side). Here a worker writes each pack into one of `slots` fixed segments and
    sends only (worker, slot, sizes). The main process hands the caller batches that *are* views of the
    slot (copying 16 MB out of every pack took most of its time) and the slot becomes free when the
    last of them is dropped (a finalizer on the array the tensors share; with CUDA pinning, after the
    copy into page-locked memory). The pages stay mapped in both processes.

    A worker never waits for a slot: when the caller still holds every one (it keeps its batches), the
    pack travels by the DataLoader's transport instead. So a worker cannot be stuck behind a caller, and
    a batch the caller holds is never written over, even after it leaves the iteration."""

    def __init__(self, worker: int, slots: int, rows: int, x_shape: tuple[int, ...], x_dtype: torch.dtype,
                 context):
        self.worker = worker
        self.x = torch.empty((slots, rows, *x_shape), dtype=x_dtype).share_memory_()
        self.meta = torch.empty((slots, rows, 3), dtype=torch.float64).share_memory_()
        self.busy = torch.zeros(slots, dtype=torch.uint8).share_memory_()  # set by the worker, cleared by main
        self.free = context.Semaphore(slots)  # never more than the slots marked free: a barrier between the two
        self.arrays: np.ndarray | None = None  # in the main process: self.x as NumPy, to make per-pack views of

    @classmethod
    def for_workers(cls, dataset: ShardStream, workers: int, prefetch_factor: int, context) -> list[HandOver] | None:
        """One per worker, sized for the dataset's batches (x float32 when a transform runs in the worker); None
        when its slots would take more than HAND_OVER_BYTES (very large chunks or batches)."""
        features = dataset.manifest.features
        dtype = torch.float32 if dataset.transform is not None else torch.from_numpy(np.empty(0, features.dtype)).dtype
        rows, slots = PACK_BATCHES * dataset.batch_size, max(1, prefetch_factor + SPARE_SLOTS)
        per_row = math.prod(features.shape) * dtype.itemsize + 24
        if slots * rows * per_row > HAND_OVER_BYTES:
            return None
        try:
            return [cls(worker, slots, rows, (1, *features.shape), dtype, context) for worker in range(workers)]
        except (RuntimeError, OSError):  # /dev/shm too small (a container's 64 MB): the DataLoader's own transport
            return None

    def put(self, batches: list[Batch]) -> InSlot | Packed:
        """In the worker: the batches copied into a free slot. Batches that do not fit the slots (a transform
        that changes shape or dtype), or that find every slot still held by the caller, travel as a Packed."""
        rows = sum(len(b.y) for b in batches)
        if rows > self.x.shape[1] or any(b.x.dtype != self.x.dtype or b.x.shape[1:] != self.x.shape[2:]
                                         for b in batches):
            return _pack(batches)
        if not self.free.acquire(block=False):
            return _pack(batches)
        slot = self.busy.tolist().index(0)  # there is one: the semaphore counts at most the free slots
        self.busy[slot] = 1
        torch.cat([b.x for b in batches], out=self.x[slot, :rows])
        _meta(batches, out=self.meta[slot, :rows])
        return InSlot(self.worker, slot, tuple(len(b.y) for b in batches))

    def take(self, item: InSlot, pin: bool = False) -> Packed:
        """In the main process: the slot's batches, as views of the slot that free it when the caller drops the
        last of them; with `pin`, copied into page-locked memory (for an asynchronous copy to the GPU)."""
        rows = sum(item.sizes)
        meta = self.meta[item.slot, :rows].clone()
        if pin:
            x = torch.empty((rows, *self.x.shape[2:]), dtype=self.x.dtype, pin_memory=True)
            x.copy_(self.x[item.slot, :rows])
            self._release(item.slot)
        else:
            if self.arrays is None:
                self.arrays = self.x.numpy()
            view = self.arrays[item.slot, :rows]  # a new array object per pack: the tensors below keep it alive
            weakref.finalize(view, self._release, item.slot).atexit = False
            x = torch.from_numpy(view)
        return Packed(x, meta, torch.tensor(item.sizes))

    def _release(self, slot: int) -> None:
        self.busy[slot] = 0
        self.free.release()


def _unpack(packed: Packed) -> Iterator[Batch]:
    sizes = packed.sizes.tolist()
    for x, meta in zip(packed.x.split(sizes), packed.meta.split(sizes), strict=True):
        yield Batch(x, meta[:, 0].long(), meta[:, 1].long(), meta[:, 2].float())


class _SizedLoader:
    """A DataLoader that also knows its length for the current epoch (for progress bars) and its position
    in it: `state_dict()` / `load_state_dict()` resume exactly mid-epoch (torchdata's StatefulDataLoader
    shape). The same world size, worker count and batch size are needed; they are checked."""

    def __init__(self, loader: torch.utils.data.DataLoader, dataset: ShardStream):
        self.loader, self.dataset = loader, dataset
        self.consumed = 0  # batches of the current epoch handed to the caller (with those skipped at resume)

    def __iter__(self) -> Iterator[Batch]:
        self.consumed = self.dataset.resume_batches
        hand_overs = self._hand_overs()
        self.dataset.hand_overs = hand_overs  # fresh slots for the workers this iteration starts
        items = iter(self.loader)  # loader workers start here, each with a copy of the resume position
        self.dataset.resume_batches, self.dataset.hand_overs = 0, None  # the next iteration starts afresh
        pin = self.loader.pin_memory and torch.cuda.is_available()
        for item in items:
            if isinstance(item, InSlot):
                item = hand_overs[item.worker].take(item, pin)
            for batch in _unpack(item) if isinstance(item, Packed) else (item,):
                self.consumed += 1
                yield batch

    def _hand_overs(self) -> list[HandOver] | None:
        """Shared-memory slots for each loader worker (see HandOver); none without workers, or with
        persistent ones (they keep the slots of the iteration that started them)."""
        loader = self.loader
        if loader.num_workers == 0 or loader.persistent_workers:
            return None
        context = loader.multiprocessing_context or torch.multiprocessing
        return HandOver.for_workers(self.dataset, loader.num_workers, loader.prefetch_factor, context)

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch() - self.dataset.resume_batches

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.consumed = 0

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its batches were consumed: enough to continue exactly from here."""
        return {"epoch": self.dataset.epoch, "batches": self.consumed, "world_size": self.dataset.world_size,
                "num_workers": self.loader.num_workers, "batch_size": self.dataset.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next iteration yields exactly the batches an uninterrupted one had left, in the same order."""
        here = {"world_size": self.dataset.world_size, "num_workers": self.loader.num_workers,
                "batch_size": self.dataset.batch_size}
        differ = {k: (state[k], v) for k, v in here.items() if k in state and state[k] != v}
        if differ:
            raise ValueError("cannot resume the loader exactly: " + ", ".join(
                f"{k} was {was}, is {now}" for k, (was, now) in differ.items()))
        self.dataset.load_state_dict(state)
        self.consumed = self.dataset.resume_batches


def make_loader(dataset: ShardStream, num_workers: int = 0, pin_memory: bool = False,
                prefetch_factor: int = 2, persistent_workers: bool = False) -> _SizedLoader:
    """Wrap a ShardStream in a DataLoader (batches are formed in the dataset, so batch_size=None)."""
    dataset.num_workers = max(1, num_workers)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor
        # Persistent workers keep their copy of the dataset, so they do not see set_epoch(): every epoch
        # then reads in the same order. Only for measurements that want long-lived workers.
        kwargs["persistent_workers"] = persistent_workers
    context = _worker_start(num_workers)
    if context is not None:
        dataset.share_from(context)
        kwargs["worker_init_fn"] = _leave_forkserver
    # A private generator for the loader's own seed draw: from the global one, every `iter(loader)` would move
    # the training's dropout draws, and a resumed run (which starts its loader at another step) would differ.
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                         generator=torch.Generator(), multiprocessing_context=context, **kwargs)
    return _SizedLoader(loader, dataset)


def _worker_start(num_workers: int):
    """How loader workers start: forked from this process, except under torch.distributed.

    A process in a process group runs the backend's threads (gloo's work loop, NCCL's watchdog), and they
    take Python's runtime lock without holding the GIL when they free finished work (pybind11 makes a
    thread state for the decref). A fork at that instant copies the lock held, and the new worker waits
    on it forever inside os.fork() (CPython gh-112275, fixed in 3.12; forking a multi-threaded process is
    unsafe in general). Measured: a 2-rank gloo run hung about once in 5-8 runs of 4 epochs. So workers of
    a rank start from the forkserver: one single-threaded process, started once, that has already
    imported this module (and torch), so a worker starts in milliseconds, not by importing torch again."""
    if num_workers == 0 or not in_process_group():
        return None  # the DataLoader's default (fork on Linux)
    context = torch.multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # read when the server starts (the first time only)
    return context


def _leave_forkserver(worker_id: int) -> None:
    """In a worker started by the forkserver: let the server exit with the process that started it.

    Every process the server starts holds the write end of the server's "alive" pipe (so that it could start
    processes of its own), and the server exits only when all of them are closed. A worker's parent is the
    server, and a worker stops when its parent is gone (the DataLoader's watchdog). So if the
    rank is killed, the server waits for its workers and the workers for the server: both live on, holding
    the rank's output open, and torchrun never restarts it. A loader worker starts no processes: it closes
    its copy, the server exits with the rank, and the workers follow."""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # CPython's module-level instance; the attribute is there since 3.4
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


def open_shards(source: str | Manifest, split: str = "train", batch_size: int = 64, *, shuffle: bool | None = None,
                augment: bool | None = None, num_workers: int = 0, seed: int = 0, shuffle_blocks: int = 16,
                pin_memory: bool = False, augment_config=None, fetcher=None) -> _SizedLoader:
    """Stream one split of a build as ready-to-train batches, for any PyTorch loop.

    Args:
        source: a build folder, or an http(s):// or s3:// URL of one, or a manifest already loaded.
        split: "train", "val" or "test".
        shuffle: default True for train, False otherwise.
        augment: apply noise and SpecAugment masks (default: True for train); the normalisation
            with the manifest's mean/std is always applied.
        augment_config: an `audioshard.config.AugmentConfig` (defaults if None).
        fetcher: how build files are read (`audioshard.remote.Fetcher`: timeouts, retries, cache; e.g.
            `config.fetcher()`); default: `remote.DEFAULT_FETCHER`. Unused when `source` is a manifest.

    Returns:
        An iterable of `Batch(x, y, source, start)` with x: (B, 1, n_mels, frames) float32,
        normalised; `len()` gives batches per epoch; call `.set_epoch(e)` before each epoch;
        `.state_dict()` / `.load_state_dict(state)` continue exactly mid-epoch (docs/training.md).

    Example:
        >>> loader = open_shards("shards/", "train", batch_size=64, num_workers=2)
        >>> for epoch in range(10):
        ...     loader.set_epoch(epoch)
        ...     for batch in loader:
        ...         loss = criterion(model(batch.x), batch.y)
    """
    from audioshard.augment import BatchTransform
    from audioshard.config import AugmentConfig

    manifest = source if isinstance(source, Manifest) else load_manifest(source, fetcher or DEFAULT_FETCHER)
    shuffle = split == "train" if shuffle is None else shuffle
    augment = split == "train" if augment is None else augment
    transform = BatchTransform.from_manifest(manifest, augment_config or AugmentConfig(), enabled=augment)
    dataset = ShardStream(manifest, split, batch_size, shuffle=shuffle, shuffle_blocks=shuffle_blocks, seed=seed,
                          transform=transform)
    return make_loader(dataset, num_workers=num_workers, pin_memory=pin_memory)
