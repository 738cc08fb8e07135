"""Stream batches from shards: an IterableDataset over build folders: local, http(s):// or s3://.

The pipeline, stage by stage (each a small function below):

    manifest -> shard list -> shuffle shards (per epoch) -> split by reader (DDP rank x DataLoader
    worker: `distributed.World`) -> each shard opened one ahead and checked -> its blocks read and
    decoded safely (`shardfile.py`) -> shuffle buffer of blocks -> batches (x: (B, 1, n_mels, frames)
    float16, y: (B,) int64, source: (B,), start: (B,)) -> (in a loader worker) grouped for the hand-over

With `balanced` (train split only), the shuffle buffer fills each batch by drawing its rows with replacement,
each class about equally often (`balanced_draw`); how many batches, and of what sizes, stays as without it.

Normalisation and augmentation act on whole batches (`audioshard.augment.BatchTransform`): in the
worker for library users, or on the accelerator in `audioshard train`. The DataLoader around this
dataset, its workers and the hand-over of their batches are `loader.py`'s (`open_shards`).

Work is split so that every (rank, worker) reads a disjoint part of the split and together they
read all of it once: by whole shards when there are at least as many shards as readers, otherwise
readers share a shard and take every k-th block of it. Per-reader sample counts follow from the
manifest alone, so the number of batches per epoch is known before reading anything.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import queue
import random
import sys
import tarfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from webdataset.tariterators import group_by_keys

from audioshard.distributed import World
from audioshard.manifest import Manifest, ShardInfo
from audioshard.remote import IntegrityError
from audioshard.shardfile import ShardDataError, decode_block, member_limits, tar_members
from audioshard.termsafe import printable

MAX_REPORTS = 20  # bad-data lines printed per stream before only counting


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
        balanced: fill each batch with rows drawn with replacement from the shuffle buffer, every class held
            there drawn equally often (`balanced_draw`): the rare classes' chunks repeated, the common ones'
            thinned. Same batch count and sizes as without it, and as deterministic. Train split only, with
            `shuffle`; the buffer (`shuffle_blocks`) should hold several recordings of the rarest class.
    """

    def __init__(self, manifest: Manifest, split: str, batch_size: int, shuffle: bool = False,
                 shuffle_blocks: int = 16, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 transform=None, strict: bool = False, shards: list[ShardInfo] | None = None,
                 balanced: bool = False):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if balanced and split != "train":
            raise ValueError(f"balanced sampling is for the train split only, not {split!r}: evaluation must see "
                             "every chunk exactly once")
        if balanced and not shuffle:
            raise ValueError("balanced sampling draws batches at random from the shuffle buffer: it needs shuffle=True")
        self.manifest, self.split, self.batch_size = manifest, split, batch_size
        self.shuffle, self.shuffle_blocks, self.seed = shuffle, max(1, shuffle_blocks), seed
        self.world = World.of_process(rank, world_size)
        self.transform, self.strict = transform, strict
        self.shards = manifest.shards(split) if shards is None else shards
        self.balanced = balanced
        self.epoch = 0
        self.resume_batches = 0  # batches of the epoch to leave out at the next iteration (`load_state_dict`)
        self.num_workers = 1  # set by `loader()` so that batch counts can be computed up front
        # Shared with loader workers (passed to them at process creation), so the trainer can report it.
        self._skipped = mp.Value("l", 0)
        # Set by the loader (loader.py) for the iteration it starts: per loader worker, how a group of
        # `pack_batches` batches is sent to the main process. None: batches are yielded one by one.
        self.senders: list[Callable[[list[Batch]], Any]] | None = None
        self.pack_batches = 1

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    def share_from(self, context) -> None:
        """Make the state shared with loader workers in the multiprocessing context that starts them (a lock
        made for fork cannot be passed to a worker started by the forkserver); the count so far is kept."""
        self._skipped = context.Value("l", self._skipped.value)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.resume_batches = 0

    def _tasks(self, world: World) -> list[ReadTask]:
        order = shard_order(self.shards, self.epoch, self.seed, self.shuffle)
        return reader_tasks(order, world.reader, world.readers)

    def batches_per_epoch(self, num_workers: int | None = None, rank: int | None = None) -> int:
        """Batches this rank yields in the current epoch (exact: every reader ends with one partial batch)."""
        return sum(self.reader_batches(num_workers, rank))

    def reader_batches(self, num_workers: int | None = None, rank: int | None = None) -> list[int]:
        """Batches each loader worker of this rank yields in the current epoch, known from the manifest."""
        workers = max(1, num_workers if num_workers is not None else self.num_workers)
        world = self.world if rank is None else World(rank, self.world_size)
        return [math.ceil(sum(task_samples(t, self.manifest.block_size)
                              for t in self._tasks(world.with_worker(worker, workers))) / self.batch_size)
                for worker in range(workers)]

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
        here = self.world.in_worker()  # this DataLoader worker's slot (worker 0 of 1 without workers)
        # Read now, not when the generator first runs: the next iteration starts from the epoch's beginning.
        consumed, self.resume_batches = self.resume_batches, 0
        send = self.senders[here.worker] if self.senders else None  # set in loader workers only
        pack = self.pack_batches if send is not None else 1
        if not consumed:  # the usual case: nothing to leave out, no plan to compute
            return self._batches(here, 0, send, pack)
        first, skips = resume_plan(self.reader_batches(here.workers), consumed, pack)
        # Loader workers take turns from slot 0; rotating readers over slots restores the interrupted order.
        reader = here.with_worker((here.worker + first) % here.workers, here.workers)
        return self._batches(reader, skips[reader.worker], send, pack)

    def _batches(self, world: World, skip: int, send: Callable[[list[Batch]], Any] | None,
                 pack: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch, world.rank, world.worker])
        if self.transform is not None and hasattr(self.transform, "reseed"):
            self.transform.reseed(self.seed, self.epoch, world.rank, world.worker)
        tasks = opened_ahead(self.manifest, self._tasks(world))
        blocks = (block for task, opening in tasks
                  for block in read_blocks(self.manifest, self.split, task, self._bad, opening))
        capacity = self.shuffle_blocks * self.manifest.block_size if self.shuffle else self.batch_size
        batches = itertools.islice(batched(blocks, self.batch_size, capacity, rng if self.shuffle else None,
                                           self.balanced), skip, None)
        if READ_AHEAD_BATCHES and (send is None or self.transform is not None):
            # Read in a thread while this one runs what follows: the transform, or (without loader workers)
            # the caller's own work. A worker that only reads and hands over gains nothing from it.
            batches = ahead(batches, READ_AHEAD_BATCHES)
        if self.transform is not None:
            batches = (self.transform(batch, index) for index, batch in enumerate(batches, start=skip))
        yield from grouped(batches, pack, pack - skip % pack, send) if send is not None else batches


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


def balanced_draw(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` row indices into `labels` (class indices) drawn with replacement, each row with a probability of
    1 / (rows of its class) / (classes present): every class present comes equally often in expectation.

    The counts are those of the rows held, not the split's: weighting by the split's counts (as a
    WeightedRandomSampler would) leaves each draw at the mercy of how many rare chunks the buffer happens to
    hold, since a recording's chunks arrive together; on a 10:1 split that gave the rare class 40-45% instead
    of 50%. Local counts make every draw even among the classes held; only a class absent from the buffer
    misses its turn."""
    if labels.ndim != 1:  # multi-hot rows: a chunk of several classes has no one class to count it under
        raise ValueError("balanced sampling needs one class per chunk; this build's chunks are multi-label")
    counts = np.bincount(labels)
    p = 1.0 / counts[labels]
    return rng.choice(len(labels), size=size, replace=True, p=p / p.sum())


def batched(blocks: Iterable[dict[str, np.ndarray]], batch_size: int, capacity: int,
            rng: np.random.Generator | None, balanced: bool = False) -> Iterator[Batch]:
    """Blocks into batches. With `rng` (shuffling), a buffer of `capacity` chunks: when it is full, whole
    batches are drawn at random from half of the held chunks and the other half is kept to mix with
    the blocks that come next. Without, batches in stored order. The last batch may be smaller.

    With `balanced` (needs `rng`), each time batches are drawn their rows are instead drawn with replacement
    from all held chunks, each class equally often (`balanced_draw`): as many rows, so the batch count
    and sizes stay those the manifest predicts, and resuming can still regenerate and skip them. The buffer
    keeps and lets go of chunks exactly as without weights, so every chunk still passes through it.

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
                emit = balanced_draw(buffer["y"][:count], n_emit, rng) if balanced else order[:n_emit]
                yield from _emit(buffer, emit, batch_size)  # gathers: batches never alias the buffer
                rest = order[n_emit:]
                for values in buffer.values():
                    values[:len(rest)] = values[rest]
                count = len(rest)
    if count and balanced:
        yield from _emit(buffer, balanced_draw(buffer["y"][:count], count, rng), batch_size)
    elif count:
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


def grouped(batches: Iterable[Batch], size: int, first: int, send: Callable[[list[Batch]], Any]) -> Iterator[Any]:
    """In a loader worker: batches handed over `size` at a time, each group through `send` (the loader's
    hand-over); the first group holds `first` (when resuming mid-group, the rest of the interrupted group)."""
    group: list[Batch] = []
    want = first or size
    for batch in batches:
        group.append(batch)
        if len(group) == want:
            yield send(group)
            group, want = [], size
    if group:
        yield send(group)

