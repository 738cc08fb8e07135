"""Part builds as tasks on real executors: a pool of local processes, a real Dask LocalCluster (2 worker
processes), one of whose workers is killed with SIGKILL in the middle of a part; the command line's
`build --parts N --scheduler local`. Each ends merged and verified, with the chunks of a one-shot build.
The clusters run in processes of their own (tests/cluster_run.py, the CLI), so none of their helper
processes outlives a test inside pytest."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_BUILD, chunk_table, link_tree

from audioshard.build import build_shards
from audioshard.config import load_config
from audioshard.info import verify_build

RUN = Path(__file__).with_name("cluster_run.py")


@pytest.fixture(scope="module")
def raw_and_whole(tmp_path_factory):
    raw = link_tree(tmp_path_factory.mktemp("raw"), {"drone": 8, "car": 6, "speech": 8})
    whole = tmp_path_factory.mktemp("whole") / "shards"
    build_shards(raw, whole, load_config(overrides=SMALL_BUILD), workers=1, progress=False)
    return raw, chunk_table(whole)


def cluster_run(*args) -> dict:
    done = subprocess.run([sys.executable, str(RUN), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_parts_on_a_process_pool_merge_into_the_one_shot_build(raw_and_whole, tmp_path):
    raw, whole = raw_and_whole
    cluster_run(raw, tmp_path / "out", "pool")
    assert chunk_table(tmp_path / "out") == whole
    assert verify_build(str(tmp_path / "out"))[0]


def test_a_worker_killed_mid_part_in_the_local_process_pool_is_recovered(raw_and_whole, tmp_path):
    """`build --parts N` without a scheduler: a ProcessPoolExecutor is broken for good once one of its processes
    dies (every later submit raises BrokenProcessPool); `cluster.ProcessPool` starts a fresh one and the parts
    that failed with it are built again."""
    raw, whole = raw_and_whole
    result = cluster_run(raw, tmp_path / "out", "pool", "--kill")
    assert result["killed_while_writing"] is True
    assert chunk_table(tmp_path / "out") == whole
    assert verify_build(str(tmp_path / "out"))[0]


def test_parts_as_ray_tasks_merge_into_the_one_shot_build(raw_and_whole, tmp_path):
    """Ray's seam: `cluster.RayExecutor` on a real local Ray cluster (2 CPUs), one task per part."""
    raw, whole = raw_and_whole
    cluster_run(raw, tmp_path / "out", "ray")
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*-of-2")) == ["part-0-of-2", "part-1-of-2"]
    assert chunk_table(tmp_path / "out") == whole
    assert verify_build(str(tmp_path / "out"))[0]


def test_a_worker_killed_mid_part_on_a_dask_cluster_is_recovered(raw_and_whole, tmp_path):
    raw, whole = raw_and_whole
    result = cluster_run(raw, tmp_path / "out", "dask", "--kill")
    assert result["killed_while_writing"] is True  # a worker really died while a part was being written
    assert chunk_table(tmp_path / "out") == whole
    assert verify_build(str(tmp_path / "out"))[0]  # no manifest names a file the killed task half wrote


def test_build_parts_on_a_local_dask_cluster_from_the_command_line(raw_and_whole, tmp_path):
    raw, whole = raw_and_whole
    settings = [a for s in SMALL_BUILD for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "audioshard", "build", str(raw), "--out", str(tmp_path / "out"),
                           "--parts", "2", "--scheduler", "local", *settings], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "part 1/2 done" in done.stdout and "part 2/2 done" in done.stdout
    assert chunk_table(tmp_path / "out") == whole
