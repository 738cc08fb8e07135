"""A build's parts run on any `concurrent.futures.Executor`: local processes, or a Dask cluster.

    audioshard build raw/ --out shards/ --parts 8 --scheduler tcp://scheduler:8786   # a Dask cluster
    audioshard build raw/ --out shards/ --parts 8 --scheduler local                  # a LocalCluster here

    from concurrent.futures import ProcessPoolExecutor
    from audioshard.cluster import build_on
    with ProcessPoolExecutor(4) as pool:
        manifest = build_on(pool, "raw/", "shards/", cfg, parts=8)

A build is split into N parts that share nothing but the input list (the split and write order are
decided from the whole list, so each part knows its own share: `build_shards(..., part=(I, N))`). Each
part is one task; a task that fails (a worker killed, a machine lost) is submitted again, up to
`retries` times, and a part that still fails is named in the error. Only then are the parts merged
(`merge_parts`, which reads and checks every part's manifest) and the merged build verified (every
shard's size, sha256 and blocks). A part's files appear only when the part is finished (it is built in
a staging folder and moved into place), so no manifest ever names a file that a failed task half wrote.
Workers must see the same input and output paths (a shared file system).

Dask: `Client.get_executor()` is a `concurrent.futures.Executor`, so a Dask cluster needs nothing else
(the optional extra `cluster` installs `distributed`). Ray: `ray.util.multiprocessing.Pool` is not an
Executor; run `build_shards(..., part=(I, N))` as one Ray task per part, then `merge_parts(out)`.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future, wait
from pathlib import Path
from typing import Any

from audioshard.build import build_shards, merge_parts
from audioshard.config import Config
from audioshard.errors import BuildError


def build_part(input_path: str, out_dir: str, cfg: Config, index: int, count: int, workers: int | None) -> str:
    """One part, as a task: returns the part's folder."""
    build_shards(input_path, out_dir, cfg, workers=workers, progress=False, part=(index, count))
    return str(Path(out_dir) / f"part-{index}-of-{count}")


def build_on(executor: Executor, input_path: str | Path, out_dir: str | Path, cfg: Config, parts: int,
             retries: int = 2, workers: int | None = 1, log=print) -> dict[str, Any]:
    """Build `parts` parts on `executor`, retrying failed ones, then merge and verify.

    Args:
        workers: decoding processes inside each part (1: the executor's own processes are the parallelism).
        retries: further submissions of a part whose task failed.
        log: where progress lines go (one per finished part).

    Returns:
        The merged manifest.

    Raises:
        BuildError: a part failed `retries + 1` times (named, with its last error), or the merged build
            does not verify.
    """
    if parts < 1:
        raise BuildError(f"--parts must be at least 1, got {parts}")
    args = (str(input_path), str(out_dir), cfg)
    pending: dict[Future, int] = {executor.submit(build_part, *args, i, parts, workers): i for i in range(parts)}
    failures: dict[int, list[str]] = {}
    while pending:
        done, _ = wait(pending, return_when="FIRST_COMPLETED")
        for future in done:
            index = pending.pop(future)
            error = future.exception()
            if error is None:
                log(f"part {index + 1}/{parts} done: {future.result()}")
                continue
            failures.setdefault(index, []).append(f"{type(error).__name__}: {error}")
            if len(failures[index]) > retries:
                raise BuildError(f"part {index} of {parts} failed {len(failures[index])} times; last: "
                                 f"{failures[index][-1]}")
            log(f"part {index + 1}/{parts} failed ({failures[index][-1]}); submitting it again")
            pending[executor.submit(build_part, *args, index, parts, workers)] = index
    manifest = merge_parts(out_dir)
    _verify(str(out_dir))
    return manifest


def _verify(out_dir: str) -> None:
    from audioshard.info import verify_build

    good, report = verify_build(out_dir)
    if not good:
        raise BuildError(f"{out_dir}: the merged build does not verify:\n{report}")


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
