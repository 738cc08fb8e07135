"""Part builds as tasks on real executors: a pool of local processes, a real Dask LocalCluster (2 worker
processes), one of whose workers is killed with SIGKILL in the middle of a part; the command line's
`build --parts N --scheduler local`. Each ends merged and verified, with the chunks of a one-shot build."""

import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import distributed
import pytest
from conftest import SMALL_BUILD, chunk_table, link_tree

from audioshard.build import build_shards
from audioshard.cli import main
from audioshard.cluster import build_on
from audioshard.config import load_config
from audioshard.info import verify_build


@pytest.fixture(scope="module")
def raw_and_whole(tmp_path_factory):
    raw = link_tree(tmp_path_factory.mktemp("raw"), {"drone": 8, "car": 6, "speech": 8})
    whole = tmp_path_factory.mktemp("whole") / "shards"
    build_shards(raw, whole, load_config(overrides=SMALL_BUILD), workers=1, progress=False)
    return raw, chunk_table(whole)


def test_parts_on_a_process_pool_merge_into_the_one_shot_build(raw_and_whole, tmp_path):
    raw, whole = raw_and_whole
    with ProcessPoolExecutor(2) as pool:
        build_on(pool, raw, tmp_path / "out", load_config(overrides=SMALL_BUILD), parts=3, log=lambda line: None)
    assert chunk_table(tmp_path / "out") == whole
    assert verify_build(str(tmp_path / "out"))[0]


def test_a_worker_killed_mid_part_on_a_dask_cluster_is_recovered(raw_and_whole, tmp_path):
    raw, whole = raw_and_whole
    out = tmp_path / "out"
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    killed = []

    def kill_a_worker_once_a_part_is_being_written():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(out.glob("part-*-of-*/.staging")):
            time.sleep(0.01)
        pids = list(client.run(os.getpid).values())
        writing = any(out.glob("part-*-of-*/.staging"))
        os.kill(pids[0], signal.SIGKILL)
        killed.append(writing)

    try:
        killer = threading.Thread(target=kill_a_worker_once_a_part_is_being_written)
        killer.start()
        lines = []
        build_on(client.get_executor(), raw, out, load_config(overrides=SMALL_BUILD), parts=2, log=lines.append)
        killer.join()
    finally:
        client.close()
        cluster.close()
    assert killed == [True]  # a worker really died while a part was being written
    assert chunk_table(out) == whole
    assert verify_build(str(out))[0]  # no manifest names a file the killed task half wrote


def test_build_parts_on_a_local_dask_cluster_from_the_command_line(raw_and_whole, tmp_path, capsys):
    raw, whole = raw_and_whole
    settings = [a for s in SMALL_BUILD for a in ("--set", s)]
    assert main(["build", str(raw), "--out", str(tmp_path / "out"), "--parts", "2", "--scheduler", "local",
                 *settings]) == 0
    assert chunk_table(tmp_path / "out") == whole
    out = capsys.readouterr().out
    assert "part 1/2 done" in out and "part 2/2 done" in out
