"""A real `torchrun` with 2 processes on gloo (CPU), reading shards from a real HTTP server."""

import json
import os
import signal
import subprocess
import sys

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


def test_killed_rank_restarts_mid_epoch_and_ends_with_the_uninterrupted_weights(real_build, tmp_path):
    """torchrun --max-restarts: a rank SIGKILLed in the middle of an epoch; the restarted ranks continue from
    the mid-epoch last.pt by themselves and end with the weights of an uninterrupted torchrun."""
    overrides = [*DDP_TRAIN, "train.epochs=4", "train.num_workers=2", "train.batch_size=4", "train.save_every_steps=2"]
    env = base_env(tmp_path, trace=False)
    whole = torchrun(["--shards", str(real_build), "--out", str(tmp_path / "whole"), "--quiet", *settings(overrides)],
                     env)
    assert whole.wait(timeout=420) == 0, whole.communicate()[0]
    run = tmp_path / "run"
    proc = torchrun(["--shards", str(real_build), "--out", str(run), "--quiet", *settings(overrides)], env,
                    "--max-restarts=1")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "at epoch 2 step 2" in line:
            workers = children(proc.pid)
            assert len(workers) == 2, workers
            os.kill(workers[-1], signal.SIGKILL)  # one rank dies in the middle of epoch 2
            break
    out = "".join(lines) + proc.communicate(timeout=420)[0]
    assert proc.returncode == 0, out
    assert "resuming from" in out and "at epoch 2 step" in out.split("resuming from", 1)[1].splitlines()[0], out
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    got, want = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (run, tmp_path / "whole"))
    assert max((got[k].double() - want[k].double()).abs().max().item() for k in got) <= 1e-5
    assert (run / "metrics.json").exists() and (run / "test_report.txt").exists()
