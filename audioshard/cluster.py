"""A build's parts run on any `concurrent.futures.Executor`: local processes, or a Dask cluster.

    audioshard build raw/ --out shards/ --parts 8 --scheduler tcp://scheduler:8786   # a Dask cluster
    audioshard build raw/ --out shards/ --parts 8 --scheduler local                  # a LocalCluster here
    audioshard build s3://bucket/raw/ --out s3://bucket/shards/ --parts 8 --scheduler local   # bucket to bucket

    from audioshard.cluster import ProcessPool, build_on
    with ProcessPool(4) as pool:         # a concurrent.futures.ProcessPoolExecutor that survives a killed worker
        manifest = build_on(pool, "raw/", "shards/", cfg, parts=8)

A build is split into N parts that share nothing but the input list (the split and write order are
decided from the whole list, so each part knows its own share: `build_shards(..., part=(I, N))`). The
input is listed once, by the caller, and the list goes with every task. Each part is one task; a task
that fails (a worker killed, a machine lost) is submitted again, up to `retries` times, and a part that
still fails is named in the error. Only then are the parts merged (`merge_parts`, which reads and checks
every part's manifest) and the merged build verified (every shard's size, sha256 and blocks). A part's
files appear only when the part is finished (it is built in a staging folder and moved into place), so
no manifest ever names a file that a failed task half wrote. Workers must see the same output folder (a
shared file system) and the same input: the same local paths, or the same s3:// / gs:// / http(s) URLs.
With `--out s3://...` the parts are built, merged and verified in `staging` (shared by the workers),
then uploaded, the manifest last (`audioshard.upload`).

Dask: `Client.get_executor()` is a `concurrent.futures.Executor`, so a Dask cluster needs nothing else
(the optional extra `cluster` installs `distributed`).

Ray has no Executor of its own (a RayExecutor was proposed several times, ray-project/ray#29456, never
merged), but `ObjectRef.future()` gives a `concurrent.futures.Future`, which is all `build_on` needs:
`RayExecutor` below is that seam (the optional extra `ray` installs Ray; tests/test_cluster.py runs it on a
local Ray cluster):

    import ray
    from audioshard.cluster import RayExecutor, build_on

    ray.init(address="auto")                                   # the cluster's head (or ray.init() here)
    manifest = build_on(RayExecutor(), "s3://bucket/raw/", "/shared/shards", cfg, parts=64)

Or without build_on: `ray.get([ray.remote(build_part).remote(input, out, cfg, i, N, 1) for i in range(N)])`,
then `merge_parts(out)` and `audioshard verify out`.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from audioshard.build import Discovery, build_shards, check_usable, discover, expected_fingerprint, merge_parts
from audioshard.config import Config
from audioshard.errors import BuildError
from audioshard.upload import is_store_url, publish_build


def build_part(input_path: str, out_dir: str, cfg: Config, index: int, count: int, workers: int | None,
               found: Discovery | None = None) -> str:
    """One part, as a task: returns the part's folder."""
    build_shards(input_path, out_dir, cfg, workers=workers, progress=False, part=(index, count), found=found)
    return str(Path(out_dir) / f"part-{index}-of-{count}")


def build_on(executor: Executor, input_path: str | Path, out_dir: str | Path, cfg: Config, parts: int,
             retries: int = 2, workers: int | None = 1, log=print, staging: str | Path | None = None,
             force: bool = False) -> dict[str, Any]:
    """Build `parts` parts on `executor`, retrying failed ones, then merge and verify (and upload).

    The input is listed once, here, and the list goes to every part (a prefix or a CSV of URLs is listed and
    sized once, not once per part).

    Args:
        out_dir: a folder every worker sees, or s3://BUCKET/PREFIX/: then the parts are built in `staging`
            (a folder every worker sees; default a temporary folder here, enough for a LocalCluster), merged
            and verified there, and uploaded with the manifest last (`upload.publish_build`); nothing is built
            when the prefix already holds this build. `force` replaces a different build there.
        workers: decoding processes inside each part (1: the executor's own processes are the parallelism).
        retries: further submissions of a part whose task failed.
        log: where progress lines go (one per finished part, and what was uploaded).

    Returns:
        The merged manifest.

    Raises:
        BuildError: a part failed `retries + 1` times (named, with its last error), or the merged build
            does not verify.
    """
    if parts < 1:
        raise BuildError(f"--parts must be at least 1, got {parts}")
    found = check_usable(discover(str(input_path), cfg), input_path)
    if not is_store_url(str(out_dir)):
        return _parts_merged(executor, str(input_path), str(out_dir), cfg, parts, retries, workers, log, found)
    manifest, published = publish_build(
        str(out_dir), expected_fingerprint(found, cfg, parts=True),
        lambda folder: _parts_merged(executor, str(input_path), str(folder), cfg, parts, retries, workers, log, found),
        cfg.fetcher(), staging=staging, force=force)
    log(published.summary() if published else f"{out_dir}: already holds this build; nothing built or uploaded")
    return manifest


def _parts_merged(executor: Executor, input_path: str, out_dir: str, cfg: Config, parts: int, retries: int,
                  workers: int | None, log, found: Discovery) -> dict[str, Any]:
    """The parts as tasks (each submitted again when it fails), then merged and verified in `out_dir`."""
    args = (input_path, out_dir, cfg)
    pending: dict[Future, int] = {executor.submit(build_part, *args, i, parts, workers, found): i
                                  for i in range(parts)}
    failures: dict[int, list[str]] = {}
    while pending:
        done, _ = wait(pending, return_when="FIRST_COMPLETED")
        for future in done:
            index = pending.pop(future)
            error = future.exception()
            if error is None:
                log(f"part {index + 1}/{parts} done: {future.result()}")
                continue
            failures.setdefault(index, []).append(_failure(error))
            if len(failures[index]) > retries:
                raise BuildError(f"part {index} of {parts} failed {len(failures[index])} times; last: "
                                 f"{failures[index][-1]}")
            log(f"part {index + 1}/{parts} failed ({failures[index][-1]}); submitting it again")
            pending[executor.submit(build_part, *args, index, parts, workers, found)] = index
    manifest = merge_parts(out_dir)
    _verify(out_dir)
    return manifest


def _failure(error: BaseException) -> str:
    if isinstance(error, BrokenProcessPool):  # the pool cannot say which of its tasks the dead process ran
        return ("a worker process died (killed, or out of memory: see `dmesg`); every part running in the "
                "pool at that moment failed with it")
    return f"{type(error).__name__}: {error}"


def _verify(out_dir: str) -> None:
    from audioshard.info import verify_build

    good, report = verify_build(out_dir)
    if not good:
        raise BuildError(f"{out_dir}: the merged build does not verify:\n{report}")


class ProcessPool(Executor):
    """Local worker processes that outlive the death of one of them (`build --parts N` without a scheduler).

    A `ProcessPoolExecutor` whose process dies (SIGKILL, the kernel's out-of-memory killer) is broken for
    good: its pending tasks fail with `BrokenProcessPool` and every later `submit` raises it, so a part could
    never be submitted again. This one starts a fresh pool of the same size then, and `build_on` retries."""

    def __init__(self, workers: int):
        self._workers = workers
        self._pool = ProcessPoolExecutor(workers)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        try:
            return self._pool.submit(fn, *args, **kwargs)
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = ProcessPoolExecutor(self._workers)
            return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


class RayExecutor(Executor):
    """A `concurrent.futures.Executor` over a running Ray cluster (`ray.init()` first): each call is one Ray
    task, returned as the task's `concurrent.futures.Future`. Ray's own retries are off (`max_retries=0`):
    `build_on` retries a failed part itself and names it when it keeps failing."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        import ray

        return ray.remote(max_retries=0)(fn).remote(*args, **kwargs).future()


def dask_executor(scheduler: str):
    """A `concurrent.futures.Executor` on a Dask cluster: `scheduler` is its address (tcp://host:8786) or
    "local" for a LocalCluster of this machine's cores (one single-threaded worker process per core)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exn:
        raise BuildError("--scheduler needs Dask's distributed package: pip install distributed (from a "
                         "checkout: pip install -e '.[cluster]')") from exn
    if scheduler == "local":
        client = Client(LocalCluster(threads_per_worker=1, processes=True, dashboard_address=None))
    else:
        client = Client(scheduler)
    return client, client.get_executor()
