"""The build's process pool: the calling process and `workers - 1` forked helpers work through a
list of tasks, and the results come back in task order, so the output is byte-identical for any
worker count. Also the memory settings that make many similar allocations cheap (glibc)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import multiprocessing.connection
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from audioshard.errors import BuildError

T = TypeVar("T")
R = TypeVar("R")


def init_worker() -> None:
    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
# Where glibc's own dynamic threshold ends for large buffers (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: 4 MiB x
# sizeof(long)), with the trim threshold it pairs with it (twice): the state a long-lived process is restored to.
_GLIBC_DYNAMIC_MMAP_MAX = 32 << 20


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist in glibc only
    except (AttributeError, OSError, TypeError):  # not glibc (macOS, musl, Windows): nothing to tune
        return None
    return libc


def _keep_freed_memory() -> None:
    """Serve large buffers from the heap and keep freed memory (glibc only; elsewhere a no-op).

    Every file allocates and frees the same few MB of audio, spectra and features. glibc hands
    buffers over its mmap threshold out as fresh mappings (a fresh process starts that threshold at
    128 kB), so each buffer was page-faulted in anew, several times the page faults and system time
    of keeping them (docs/benchmarks.md)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)


@contextlib.contextmanager
def keeping_freed_memory():
    """`_keep_freed_memory` for the duration of an in-process build, in a process that may live on (a
    notebook, a server, a recipe that trains next): afterwards the memory kept is given back and the
    thresholds are set where glibc's own dynamic rule takes them for large buffers, not to its initial
    128 kB. Why: once a threshold is set, glibc never moves it by itself again, and at 128 kB every
    tensor of a training step was a fresh mapping, page-faulted in anew each step: training after an
    in-process build ran 1.6x slower (2.1x for sepcnn) until this (docs/benchmarks.md)."""
    _keep_freed_memory()
    try:
        yield
    finally:
        libc = _glibc()
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DYNAMIC_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_DYNAMIC_MMAP_MAX)
            libc.malloc_trim(0)


def ordered_map(work: Callable[[T], list[R]], tasks: list[T], workers: int) -> Iterator[R]:
    """`work(task)` for every task, yielding the items of each task's result in task order (so the
    output does not depend on the worker count).

    The calling process works through the tasks itself, beside `workers - 1` helper processes: each
    process claims the next unclaimed task and helpers send their results back. On 2 cores this beat a
    pool of 2 workers feeding a third, writing process (docs/benchmarks.md): no process waits on
    another, and nothing runs beside them to take their cores."""
    workers = min(workers, len(tasks))
    helpers = _Helpers(work, tasks, workers - 1) if workers > 1 else None  # started first: they start at once
    threads = torch.get_num_threads()
    init_worker()
    try:
        with keeping_freed_memory():
            own: dict[int, list[R]] = {}  # tasks this process did, until their turn to be handed on
            next_out = 0
            while next_out < len(tasks):
                claimed = helpers.claim() if helpers else next_out
                if claimed < len(tasks):
                    own[claimed] = work(tasks[claimed])
                # Hand on every task that is next in order and done; once nothing is left to claim, wait for it.
                while next_out < len(tasks):
                    results = own.pop(next_out, None)
                    if results is None and helpers is not None:
                        results = helpers.take(next_out, wait=claimed >= len(tasks))
                    if results is None:  # a helper is still working on it
                        break
                    yield from results
                    next_out += 1
    finally:
        torch.set_num_threads(threads)
        if helpers is not None:
            helpers.close()


def _helper_main(work: Callable[[T], list[R]], tasks: list[T], next_task, results_pipe) -> None:
    """A helper process: claim tasks until none are left, sending each task's results back."""
    init_worker()
    _keep_freed_memory()  # a helper ends with the build: nothing to restore
    try:
        while (index := _claim(next_task)) < len(tasks):
            results_pipe.send((index, work(tasks[index])))
    except BaseException:  # a bug or MemoryError here: the build says what it was instead of a bare exit code
        with contextlib.suppress(Exception):
            results_pipe.send((-1, traceback.format_exc()))
        raise
    finally:
        results_pipe.close()


def _claim(next_task, give_up=lambda: None) -> int:
    """The next unclaimed task index from the counter shared by all build processes. (`give_up` is called
    while waiting for the lock: a helper killed while holding it would block everyone else.)"""
    lock = next_task.get_lock()
    while not lock.acquire(timeout=1.0):
        give_up()
    try:
        index = next_task.value
        next_task.value = index + 1
    finally:
        lock.release()
    return index


class _Helpers:
    """`count` helper processes working through `tasks` beside the calling process, and a thread that
    collects what they send, so a helper never waits for the caller to finish a long file of its own."""

    def __init__(self, work: Callable[[T], list[R]], tasks: list[T], count: int):
        context = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self._next_task = context.Value("q", 0)
        self._results: dict[int, list[R]] = {}
        self._failure: BaseException | None = None
        self._arrived = threading.Condition()
        self._processes: dict[Any, mp.Process] = {}  # result pipe -> its helper
        self._collector: threading.Thread | None = None
        # Forked helpers share this process's memory copy-on-write; a garbage collection in a helper would
        # touch every inherited object (torch's included) and copy those pages. Frozen objects are skipped.
        gc.freeze()
        try:
            for _ in range(count):
                reader, writer = context.Pipe(duplex=False)
                helper = context.Process(target=_helper_main, args=(work, tasks, self._next_task, writer),
                                         name="audioshard-build-helper", daemon=True)
                helper.start()
                writer.close()  # the helper holds the only write end: its exit reads as end-of-file here
                self._processes[reader] = helper
        except BaseException:
            self.close()
            raise
        finally:
            gc.unfreeze()  # the helpers keep their own frozen copy
        self._collector = threading.Thread(target=self._collect, name="audioshard-build-results", daemon=True)
        self._collector.start()  # after the forks: a child must not inherit a thread mid-way

    def claim(self) -> int:
        return _claim(self._next_task, self._raise_if_failed)

    def take(self, index: int, wait: bool) -> list[R] | None:
        """Task `index`'s results once a helper has sent them (None if not yet and not `wait`)."""
        with self._arrived:
            while index not in self._results:
                self._raise_if_failed()
                if not wait:
                    return None
                self._arrived.wait()
            return self._results.pop(index)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _collect(self) -> None:
        pending = dict(self._processes)
        while pending:
            for reader in mp.connection.wait(list(pending)):
                try:
                    index, results = reader.recv()
                except (EOFError, OSError):  # the helper has exited: all tasks claimed, or it was killed
                    helper = pending.pop(reader)
                    helper.join()
                    if helper.exitcode != 0:
                        self._fail(BuildError(
                            f"a build worker process died (exit code {helper.exitcode}: killed from outside, or by "
                            "the system when memory ran out); nothing was replaced. Run the same command again; "
                            "for very long recordings use fewer --workers, since each worker holds one whole file "
                            "in memory"))
                    continue
                if index < 0:
                    self._fail(BuildError(f"a build worker process failed:\n{results}"))
                    continue
                with self._arrived:
                    self._results[index] = results
                    self._arrived.notify()

    def _fail(self, failure: BaseException) -> None:
        with self._arrived:
            self._failure = self._failure or failure
            self._arrived.notify()

    def close(self) -> None:
        """Stop the helpers (at once, after a failure; they have exited already after a full build)."""
        for helper in self._processes.values():
            if helper.is_alive():
                helper.terminate()
        for helper in self._processes.values():
            helper.join()
        if self._collector is not None:
            self._collector.join()  # ends once every helper's pipe has reached its end
        for reader in self._processes:
            reader.close()
