"""The loader: a ShardStream in a torch DataLoader, its workers, and how their batches reach the caller.

    open_shards(build, "train") -> make_loader(ShardStream(...)) -> _SizedLoader -> Batch, Batch, ...

What lives here (as MosaicML streaming's `dataloader.py` beside its dataset):
- `open_shards`, the one call for any PyTorch loop: manifest, dataset, normalisation/augmentation, loader;
- `make_loader` and `_SizedLoader`: a DataLoader that knows its length per epoch and resumes mid-epoch;
- the hand-over: loader workers send their batches PACK_BATCHES at a time, through reused shared-memory
  slots (`HandOver`) when they fit, as one `Packed` transfer otherwise;
- how workers start (forked, or from the forkserver under torch.distributed).
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from audioshard.distributed import in_process_group
from audioshard.manifest import Manifest, load_manifest
from audioshard.remote import DEFAULT_FETCHER
from audioshard.stream import Batch, ShardStream

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
    """(y, source, start) of the batches as one (rows, 3) float64 tensor (exact for all three); a multi-label
    build's y is a multi-hot row per chunk, so (rows, classes + 2)."""
    return torch.cat([torch.cat([b.y.double().reshape(len(b.y), -1), b.source.double()[:, None],
                                 b.start.double()[:, None]], dim=1) for b in batches], out=out)


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
                 context, y_columns: int = 1):
        self.worker = worker
        self.x = torch.empty((slots, rows, *x_shape), dtype=x_dtype).share_memory_()
        self.meta = torch.empty((slots, rows, y_columns + 2), dtype=torch.float64).share_memory_()
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
        y_columns = len(dataset.manifest.classes) if dataset.manifest.multilabel else 1
        per_row = math.prod(features.shape) * dtype.itemsize + 8 * (y_columns + 2)
        if slots * rows * per_row > HAND_OVER_BYTES:
            return None
        try:
            return [cls(worker, slots, rows, (1, *features.shape), dtype, context, y_columns)
                    for worker in range(workers)]
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
    y_columns = packed.meta.shape[1] - 2  # 1, or a multi-label build's classes
    for x, meta in zip(packed.x.split(sizes), packed.meta.split(sizes), strict=True):
        y = meta[:, 0].long() if y_columns == 1 else meta[:, :y_columns].long()
        yield Batch(x, y, meta[:, -2].long(), meta[:, -1].float())


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
        self._set_senders(hand_overs)  # fresh slots for the workers this iteration starts
        items = iter(self.loader)  # loader workers start here, each with a copy of the resume position
        self.dataset.resume_batches, self.dataset.senders = 0, None  # the next iteration starts afresh
        pin = self.loader.pin_memory and torch.cuda.is_available()
        for item in items:
            if isinstance(item, InSlot):
                item = hand_overs[item.worker].take(item, pin)
            for batch in _unpack(item) if isinstance(item, Packed) else (item,):
                self.consumed += 1
                yield batch

    def _set_senders(self, hand_overs: list[HandOver] | None) -> None:
        """How each loader worker sends its batches: PACK_BATCHES at a time, through its slots when it has them."""
        workers = self.loader.num_workers
        if workers:
            self.dataset.senders = [h.put for h in hand_overs] if hand_overs else [_pack] * workers
            self.dataset.pack_batches = PACK_BATCHES

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
                pin_memory: bool = False, augment_config=None, fetcher=None, balanced: bool = False) -> _SizedLoader:
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
        balanced: (train, shuffled) draw each batch's rows with replacement so that every class comes about
            equally often; the same number of batches, still resumable exactly (`ShardStream`, docs/training.md).

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
                          transform=transform, balanced=balanced)
    return make_loader(dataset, num_workers=num_workers, pin_memory=pin_memory)
