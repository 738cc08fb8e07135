"""Exact mid-epoch resumption: the loader's state_dict round trip, and `audioshard train` killed with SIGKILL
in the middle of an epoch and resumed, ending with the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import pytest

from audioshard.checkpoint import read_checkpoint
from audioshard.loader import open_shards
from audioshard.stream import resume_plan


def fingerprint(batch) -> tuple:
    """What identifies a batch, augmentation included: its chunks and the exact augmented values."""
    return (tuple(batch.source.tolist()), tuple(batch.start.tolist()), batch.x.sum().item(), batch.x.std().item())


def test_resume_plan_follows_the_loaders_turns():
    # two readers of 10 and 3 batches, handed over 4 at a time: A4 B3 A4 A2
    assert resume_plan([10, 3], 0, 4) == (0, [0, 0])
    assert resume_plan([10, 3], 2, 4) == (0, [2, 0])  # mid-group: A continues
    assert resume_plan([10, 3], 4, 4) == (1, [4, 0])
    assert resume_plan([10, 3], 7, 4) == (0, [4, 3])  # B is done
    assert resume_plan([10, 3], 12, 4) == (0, [9, 3])
    assert resume_plan([10, 3], 13, 4) == (1, [10, 3])
    assert resume_plan([5], 3, 1) == (0, [3])
    with pytest.raises(ValueError, match="cannot skip 14"):
        resume_plan([10, 3], 14, 4)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_state_dict_round_trip_yields_exactly_the_remaining_batches(real_build, workers):
    """Cut an epoch anywhere, with augmentation on in the loader workers: a fresh loader given the saved
    state yields exactly the batches the uninterrupted one still had, in the same order, with the same draws."""
    def loader():
        return open_shards(str(real_build), "train", batch_size=8, num_workers=workers, seed=5, shuffle_blocks=4)

    whole = loader()
    whole.set_epoch(1)
    reference = [fingerprint(b) for b in whole]
    assert len(reference) == len(whole) >= 10
    for cut in (1, 3, 5, len(reference) // 2, len(reference) - 1):
        first = loader()
        first.set_epoch(1)
        seen = []
        for batch in first:
            seen.append(fingerprint(batch))
            if len(seen) == cut:
                break
        state = first.state_dict()
        assert state["epoch"] == 1 and state["batches"] == cut
        second = loader()
        second.load_state_dict(state)
        assert len(second) == len(reference) - cut
        rest = [fingerprint(b) for b in second]
        assert seen + rest == reference, f"cut at {cut}"
        second.set_epoch(2)  # the resume position applies once: the next epoch is whole
        assert len(list(second)) == len(second) == whole.dataset.batches_per_epoch()


def test_a_state_from_another_worker_count_is_refused(real_build):
    one = open_shards(str(real_build), "train", batch_size=8, num_workers=1)
    two = open_shards(str(real_build), "train", batch_size=8, num_workers=2)
    with pytest.raises(ValueError, match="num_workers was 1, is 2"):
        two.load_state_dict(one.state_dict())


RESUMABLE = ["model.width=8", "train.epochs=3", "train.batch_size=4", "train.num_workers=2", "train.sanity_steps=0",
             "train.warmup_epochs=0", "train.ema_epochs=1", "train.save_every_steps=2"]


def train_command(build, out, *extra: str) -> list[str]:
    settings = [a for s in RESUMABLE for a in ("--set", s)]
    return [sys.executable, "-m", "audioshard", "train", "--shards", str(build), "--out", str(out), "--quiet",
            *settings, *extra]


def kill_when(proc: subprocess.Popen, marker: str, timeout: float = 300) -> list[str]:
    """SIGKILL the process as soon as it prints a line containing `marker`; its output so far."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=timeout)
    return lines


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(real_build, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = subprocess.run(train_command(real_build, tmp_path / "whole"), env=env, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(train_command(real_build, tmp_path / "cut"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = kill_when(proc, "at epoch 2 step 2")
    assert proc.returncode == -signal.SIGKILL, "".join(out)
    saved = read_checkpoint(tmp_path / "cut" / "last.pt")
    assert saved.training["position"]["epoch"] == 1 and saved.training["position"]["step"] >= 2  # mid-epoch
    resumed = subprocess.run(train_command(real_build, tmp_path / "cut", "--resume"), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at epoch 2 step {saved.training['position']['step']}" in resumed.stdout
    a, b = read_checkpoint(tmp_path / "whole" / "last.pt"), read_checkpoint(tmp_path / "cut" / "last.pt")
    assert max_difference(a.weights, b.weights) <= 1e-5  # the weight average
    assert max_difference(a.training["trained_weights"]["model"], b.training["trained_weights"]["model"]) <= 1e-5
    history = [json.loads(line) for line in (tmp_path / "cut" / "history.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "whole" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for got, want in zip(history, reference, strict=True):  # the interrupted epoch's record too
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)
        assert got["train_accuracy"] == want["train_accuracy"] and got["val_accuracy"] == want["val_accuracy"]
