"""audioshard.lightning under a real `lightning.Trainer` (CPU; two ranks on gloo): new shard orders each
epoch, equal steps on every rank with each rank its own share, an exact mid-epoch resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

from audioshard.manifest import load_manifest
from audioshard.stream import ShardStream

RUN = Path(__file__).with_name("lightning_run.py")


def trainer_run(shards: Path, out: Path, *args: str) -> dict[int, list[dict]]:
    """Run tests/lightning_run.py; {rank: its step records}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, str(RUN), str(shards), str(out), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {int(p.stem[4:]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(out.glob("rank*.jsonl"))}


def train_chunks(shards: Path) -> list[tuple[int, float]]:
    return sorted((int(s), float(t)) for b in ShardStream(load_manifest(shards), "train", 10_000)
                  for s, t in zip(b.source, b.start, strict=True))


def pairs(records: list[dict], epoch: int) -> list[tuple[int, float]]:
    return [tuple(p) for r in records if r["epoch"] == epoch for p in r["pairs"]]


def test_each_epoch_under_a_trainer_reads_every_chunk_once_in_a_new_order(real_build, tmp_path):
    steps = trainer_run(real_build, tmp_path, "--epochs", "2", "--workers", "2")[0]
    first, second = pairs(steps, 0), pairs(steps, 1)
    assert sorted(first) == sorted(second) == train_chunks(real_build)
    assert first != second  # a loader the Trainer cannot reach repeats epoch 0's order


def test_two_ranks_under_a_trainer_take_equal_steps_each_on_its_own_share(real_build, tmp_path):
    ranks = trainer_run(real_build, tmp_path, "--devices", "2", "--epochs", "2")
    assert sorted(ranks) == [0, 1]
    for epoch in (0, 1):
        counts = [sum(r["epoch"] == epoch for r in ranks[k]) for k in (0, 1)]
        assert counts[0] == counts[1] > 0  # unequal steps would hang DDP at the last all-reduce
        shares = [set(pairs(ranks[k], epoch)) for k in (0, 1)]
        assert not shares[0] & shares[1]
        assert sorted(shares[0] | shares[1]) == train_chunks(real_build)
    assert pairs(ranks[0], 0) != pairs(ranks[0], 1)


def test_a_trainer_resumed_from_a_mid_epoch_checkpoint_continues_with_the_same_batches(real_build, tmp_path):
    whole = trainer_run(real_build, tmp_path / "whole", "--epochs", "2", "--checkpoint-every", "3")[0]
    per_epoch = sum(r["epoch"] == 0 for r in whole)
    assert per_epoch > 3  # so that the checkpoint at step 3 is in the middle of epoch 0
    checkpoint = next((tmp_path / "whole" / "ckpt").glob("epoch=0-step=3.ckpt"))
    resumed = trainer_run(real_build, tmp_path / "resumed", "--epochs", "2", "--resume", str(checkpoint))[0]
    assert resumed[0]["step"] == 3
    assert [(r["epoch"], r["step"], r["pairs"]) for r in resumed] == \
        [(r["epoch"], r["step"], r["pairs"]) for r in whole[3:]]
