"""Part builds on a real executor, in a process of their own (run by tests/test_cluster.py): a Dask cluster starts
helper processes (its workers, a resource tracker) that would otherwise outlive the test inside pytest.

    python tests/cluster_run.py RAW OUT pool|dask|ray [--kill]

Prints one JSON line: {"killed_while_writing": bool or null}."""

import argparse
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SMALL_BUILD  # noqa: E402

from audioshard.cluster import ProcessPool, build_on  # noqa: E402
from audioshard.config import load_config  # noqa: E402


def kill_a_worker_once_a_part_is_being_written(worker_pids, out: Path, result: dict) -> None:
    """SIGKILL one worker process while some part's staging folder exists (a part half written)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(out.glob("part-*-of-*/.staging")):
        time.sleep(0.01)
    pids = worker_pids()
    result["killed_while_writing"] = any(out.glob("part-*-of-*/.staging"))
    os.kill(pids[0], signal.SIGKILL)


def killer(worker_pids, out: Path, result: dict) -> threading.Thread:
    thread = threading.Thread(target=kill_a_worker_once_a_part_is_being_written, args=(worker_pids, out, result))
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("raw", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("executor", choices=["pool", "dask", "ray"])
    parser.add_argument("--kill", action="store_true")
    args = parser.parse_args()
    cfg, result = load_config(overrides=SMALL_BUILD), {"killed_while_writing": None}
    if args.executor == "pool":  # the CLI's `build --parts N` without --scheduler
        with ProcessPool(2) as pool:
            thread = killer(lambda: [p.pid for p in multiprocessing.active_children()], args.out, result) \
                if args.kill else None
            build_on(pool, args.raw, args.out, cfg, parts=3, log=lambda line: None)
            if thread:
                thread.join()
    elif args.executor == "ray":
        import ray

        from audioshard.cluster import RayExecutor

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            build_on(RayExecutor(), args.raw, args.out, cfg, parts=2, log=lambda line: None)
        finally:
            ray.shutdown()
    else:
        import distributed

        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            thread = killer(lambda: list(client.run(os.getpid).values()), args.out, result) if args.kill else None
            build_on(client.get_executor(), args.raw, args.out, cfg, parts=2, log=lambda line: None)
            if thread:
                thread.join()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
