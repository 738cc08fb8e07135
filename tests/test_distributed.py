"""A real `torchrun` with 2 processes on gloo (CPU), reading shards from a real HTTP server."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from conftest import TINY_TRAIN, children
from http_server import ShardServer

from audioshard.evaluate import evaluate_checkpoint
from audioshard.manifest import load_manifest
from audioshard.stream import ShardStream

DDP_TRAIN = [*TINY_TRAIN, "train.num_workers=3", "train.batch_size=8"]


def torchrun(args: list[str], env: dict, *extra: str, timeout: int = 420) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra,
               "-m", "audioshard", "train", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def base_env(tmp_path, trace: bool = True) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", AUDIOSHARD_HTTP_TIMEOUT="10")
    if trace:
        env["AUDIOSHARD_TRACE_DIR"] = str(tmp_path / "trace")
    return env


def settings(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def all_chunks(manifest, split):
    return sorted((int(s), float(t)) for b in ShardStream(manifest, split, 10_000)
                  for s, t in zip(b.source, b.start, strict=True))


def test_torchrun_2_ranks_from_http(real_build, tmp_path):
    manifest = load_manifest(real_build)
    shards = manifest.shards("train")
    assert manifest.samples("train") % (2 * 8) != 0 and len(shards) % (2 * 3) != 0  # nothing divides evenly
    with ShardServer(real_build) as server:
        proc = torchrun(["--shards", server.url, "--out", str(tmp_path / "run"), "--quiet", *settings(DDP_TRAIN)],
                        base_env(tmp_path))
        out, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, out
    assert out.count("epoch   1/3") == 1  # rank 0 alone prints
    expected = all_chunks(manifest, "train")
    for epoch in range(3):
        ranks = [np.load(tmp_path / "trace" / f"epoch{epoch}-rank{r}.npz") for r in range(2)]
        assert int(ranks[0]["steps"]) == int(ranks[1]["steps"]) > 0  # the same number of steps on both ranks
        seen = [{(int(s), float(t)) for s, t in r["pairs"]} for r in ranks]
        assert not seen[0] & seen[1]  # disjoint
        assert sorted(seen[0] | seen[1]) == expected  # and together the whole split
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    single = evaluate_checkpoint(tmp_path / "run" / "best_model.pt", str(real_build), "val", tmp_path / "eval")
    assert metrics["val"]["chunk"] == single["chunk"] and metrics["val"]["clip"] == single["clip"]
    assert (tmp_path / "run" / "val_confusion_matrix.png").exists()


def test_killed_rank_restarts_and_resumes_from_last_checkpoint(real_build, tmp_path):
    run = tmp_path / "run"
    overrides = [*DDP_TRAIN, "train.epochs=6", "train.num_workers=0"]
    proc = torchrun(["--shards", str(real_build), "--out", str(run), "--quiet", *settings(overrides)],
                    base_env(tmp_path, trace=False), "--max-restarts=1")
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "last.pt").exists():
        time.sleep(0.05)
    assert (run / "last.pt").exists(), proc.communicate()[0]
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies mid-run
    out, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, out
    assert "resuming from" in out
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 5
    assert (run / "metrics.json").exists() and (run / "test_report.txt").exists()
