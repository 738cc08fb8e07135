"""Checkpoints from strangers (issue 39, items 1, 4, 6, 12): every value read from a checkpoint is checked,
structurally and within a budget, before anything prints, serialises or uses it. Real checkpoints from a
real tiny training, edited and written back with torch.save; the real CLI in a child process, its peak
memory measured where memory is the point."""

from __future__ import annotations

import json
import math
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import DCS, run_measured

from audioshard.checkpoint import MAX_VALUES, CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from audioshard.config import load_config
from audioshard.train import train

# A CLI run that reads a small build peaks at ~760 MB here (importing torch alone: 650 MB); the bombs below
# took 1.7 GB (a 1 GiB tensor) or ran for minutes before they were refused.
BASELINE_MB = 1100
SECONDS = 60  # a refusal comes after start-up (~5-10 s on a busy 2-core machine); the bombs ran for minutes
TINY = ["model.width=8", "train.epochs=1", "train.batch_size=16", "train.num_workers=0", "train.sanity_steps=0",
        "train.warmup_epochs=0"]


@pytest.fixture(scope="module")
def tiny_run(real_build, tmp_path_factory) -> Path:
    """A real one-epoch run: best_model.pt, and last.pt with the training state (epoch 0, one history record)."""
    run = tmp_path_factory.mktemp("tiny_run")
    train(str(real_build), run, load_config(overrides=TINY), progress=False)
    return run


def forged(source: Path, target: Path, edit) -> Path:
    """`source` as torch.load reads it, edited, written with torch.save (what a stranger would publish)."""
    state = torch.load(source, weights_only=True)
    edit(state)
    save_checkpoint(target, state)
    return target


def forged_run(tiny_run: Path, target: Path, edit) -> Path:
    """A copy of the run whose last.pt is edited: what `train --resume` reads."""
    shutil.copytree(tiny_run, target)
    forged(tiny_run / "last.pt", target / "last.pt", edit)
    return target


def deep_bomb() -> list:
    """One list reached 2**40 times through 40 levels of pairs: ~1 KB pickled (shared references)."""
    value: list = ["a"]
    for _ in range(40):
        value = [value, value]
    return value


def wide_bomb() -> list:
    """1000**4 reaches of one string, 4 levels deep (within the depth bound): ~12 KB pickled."""
    value: object = "a"
    for _ in range(4):
        value = [value] * 1000
    return value  # type: ignore[return-value]


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 1000, lines[:3]
    return lines[0]


# --- 1: shared-reference bombs ---------------------------------------------------------------------------------

def _put(state: dict, where: str, bomb: list) -> None:
    if where == "model_args":
        state["model_args"]["name"] = bomb  # was repr'd in full by the error message
    elif where == "metrics":
        state["metrics"]["notes"] = bomb
    else:
        # was json.dumps'd into history.jsonl by --resume (a copy: last.pt's metrics are the same dict)
        state["history"][0] = dict(state["history"][0], notes=bomb)


@pytest.mark.parametrize("command, where, bomb, found", [
    ("predict", "model_args", deep_bomb, "values nested more than 8 deep at model_args/name/0/0"),
    ("evaluate", "metrics", wide_bomb, f"more than {MAX_VALUES} values (a value shared by reference counts"),
    ("export", "model_args", wide_bomb, f"more than {MAX_VALUES} values"),
    ("resume", "history", deep_bomb, "values nested more than 8 deep at history/0/notes/0"),
    ("resume", "history", wide_bomb, f"more than {MAX_VALUES} values"),
])
def test_a_shared_reference_bomb_is_refused_fast_by_every_reader(tiny_run, real_build, tmp_path, command, where,
                                                                  bomb, found):
    run = forged_run(tiny_run, tmp_path / "run", lambda s: _put(s, where, bomb()))
    path = run / "last.pt"
    assert path.stat().st_size < 400_000  # the bomb adds a few KB to a 330 KB last.pt
    args = {"predict": ["predict", "--checkpoint", path, next((DCS / "drone").glob("*.wav"))],
            "evaluate": ["evaluate", "--checkpoint", path, "--shards", real_build, "--out", tmp_path / "eval"],
            "export": ["export", "--checkpoint", path, "--format", "torchscript", "--out", tmp_path / "m.ts"],
            "resume": ["train", "--shards", real_build, "--out", run, "--resume", "--quiet", "--set",
                       "train.epochs=2"]}[command]
    before = (run / "history.jsonl").read_bytes()
    proc, peak_mb, seconds = run_measured(*args, timeout=300)
    line = one_error_line(proc)
    assert f"{path}: not a usable audioshard checkpoint: it holds " in line and found in line, line
    assert "use a best_model.pt or last.pt that `audioshard train` wrote" in line
    print(f"{command} {where}: peak {peak_mb:.0f} MB, {seconds:.1f} s")
    assert peak_mb < BASELINE_MB, peak_mb
    assert seconds < SECONDS, seconds  # before: predict > 20 s and --resume > 60 s, killed (2**40 reprs / dumps)
    assert (run / "history.jsonl").read_bytes() == before and not (tmp_path / "m.ts.json").exists()


@pytest.mark.parametrize("name, shown", [
    ("x" * 4000, "got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'..."),
    (list(range(100_000)), "got a list of 100000 items"),
    ({"k": 1}, "got a dict of 1 items"),
])
def test_error_messages_summarise_a_value_never_repr_it(tiny_run, tmp_path, name, shown):
    path = forged(tiny_run / "best_model.pt", tmp_path / "x.pt", lambda s: s["model_args"].update(name=name))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a usable audioshard checkpoint: model_args must name one of")
    assert message.endswith(shown + ")") and len(message) < 300, message


@pytest.mark.parametrize("edit, found", [
    (lambda s: s["metrics"].update(big="x" * 5000), "a text of 5000 characters (at most 4096) at metrics/big"),
    (lambda s: s["metrics"].update(big=10**40), "an integer of 133 bits at metrics/big"),
    (lambda s: s["metrics"].update(odd={1, 2}), "a set, which audioshard never writes at metrics/odd"),
    (lambda s: s["metrics"].update(odd=torch.device("cpu")), "a device, which audioshard never writes"),
    (lambda s: s["model"].update(view=torch.zeros(1).expand(10**8)), "tensors of more than"),  # stride 0: 400 MB
    # from 4 bytes of storage
    (lambda s: s.update(notes=[s["classes"]] * 10), ""),  # shared but small, in a key no reader uses: fine
])
def test_every_value_is_walked_within_the_budget(tiny_run, tmp_path, edit, found):
    path = forged(tiny_run / "best_model.pt", tmp_path / "x.pt", edit)
    if not found:
        assert load_checkpoint(path)["notes"][9] == ["car", "drone", "speech"]
        return
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a usable audioshard checkpoint: it holds ")
                       + ".*" + re.escape(found)):
        load_checkpoint(path)


# --- 4: chunking rules ----------------------------------------------------------------------------------------

def audio(**values):
    return lambda s: s["config"]["audio"].update(values)


def test_a_hop_of_one_sample_is_refused_before_predict_cuts_anything(tiny_run, tmp_path):
    path = forged(tiny_run / "best_model.pt", tmp_path / "hop.pt", audio(hop_seconds=1 / 16000))
    proc, peak_mb, seconds = run_measured("predict", "--checkpoint", path, next((DCS / "drone").glob("*.wav")))
    line = one_error_line(proc)
    assert f"{path}: not a usable audioshard checkpoint: config audio.hop_seconds = 6.25e-05, expected 0 (no " \
           "overlap) or chunk_seconds / 100 = 0.02 s up to the chunk length 2 s" in line
    print(f"hop of one sample: peak {peak_mb:.0f} MB, {seconds:.1f} s")
    assert peak_mb < BASELINE_MB and seconds < SECONDS, (peak_mb, seconds)  # before: > 120 s (killed) on a 5-s file


def test_export_refuses_a_negative_hop_and_writes_nothing(tiny_run, tmp_path):
    path = forged(tiny_run / "best_model.pt", tmp_path / "neg.pt", audio(hop_seconds=-1.0))
    proc, _, _ = run_measured("export", "--checkpoint", path, "--format", "torchscript", "--out", tmp_path / "m.ts")
    line = one_error_line(proc)  # before: exit 0, "hop_seconds": -1.0 in the sidecar
    assert f"{path}: not a usable audioshard checkpoint: config audio.hop_seconds = -1.0, expected a finite " \
           "number >= 0" in line
    assert not (tmp_path / "m.ts").exists() and not (tmp_path / "m.ts.json").exists()


def huge_chunk(state):
    """50 minutes at 768 kHz, no overlap: features within their bounds (5761 frames), 9 GB per chunk."""
    state["features"].update(chunk_seconds=3000.0, hop_length=400_000, sample_rate=768_000, f_max=8000.0)
    state["config"]["audio"]["hop_seconds"] = 0.0


@pytest.mark.parametrize("edit, message", [
    (audio(hop_seconds=0.019), "config audio.hop_seconds = 0.019, expected 0 (no overlap) or chunk_seconds / 100 "
                               "= 0.02 s"),
    (audio(hop_seconds=2.5), "config audio.hop_seconds = 2.5, expected 0 (no overlap) or chunk_seconds / 100 = "
                             "0.02 s up to the chunk length 2 s"),
    (audio(hop_seconds=math.nan), "config audio.hop_seconds = nan, expected a finite number >= 0"),
    (audio(hop_seconds="1"), "config audio.hop_seconds = '1', expected a finite number >= 0"),
    (audio(hop_seconds=True), "config audio.hop_seconds = True, expected a finite number >= 0"),
    (audio(min_fraction=2.0), "config audio.min_fraction = 2.0, expected a number in 0..1"),
    (audio(silence_peak=1.5), "config audio.silence_peak = 1.5, expected a number in 0..1"),
    (audio(min_fraction=-0.5), "config audio.min_fraction = -0.5, expected a finite number >= 0"),
    (audio(silence_peak=math.inf), "config audio.silence_peak = inf, expected a finite number >= 0"),
    (audio(short_clip="loop"), "config audio.short_clip = 'loop', expected one of pad, repeat, drop"),
    (audio(skip_silent="yes"), "config audio.skip_silent = 'yes', expected true or false"),
    (lambda s: s["config"].update(audio=[1, 2]), "'config' must be a table of [section] tables"),
    (lambda s: s["config"]["audio"].update(extensions=[[".wav"]]), "config audio.extensions is a list of 1 items"),
    (huge_chunk, "a chunk of 2304000000 samples (features chunk_seconds x sample_rate); at most 67108864"),
])
def test_forged_chunking_rules_are_refused_when_the_checkpoint_is_read(tiny_run, tmp_path, edit, message):
    path = forged(tiny_run / "best_model.pt", tmp_path / "rules.pt", edit)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a usable audioshard checkpoint: {message}")):
        read_checkpoint(path)


@pytest.mark.parametrize("hop, samples", [(0.02, 320), (0.0, 32000), (2.0, 32000), (1, 16000)])
def test_chunking_rules_in_range_are_read_as_saved(tiny_run, tmp_path, hop, samples):
    card = read_checkpoint(forged(tiny_run / "best_model.pt", tmp_path / "ok.pt", audio(hop_seconds=hop)))
    assert card.rules.hop == samples and card.rules.chunk == 32000


# --- 6: model.init_weights reads PANNs files through the same zip check -----------------------------------------

def test_init_weights_refuses_a_zip_that_inflates_before_reading_it(real_build, tmp_path):
    plain, bomb = tmp_path / "plain.pth", tmp_path / "Cnn6_mAP=0.343.pth"
    torch.save({"model": {"conv_block1.conv1.weight": torch.empty(1 << 30, dtype=torch.uint8)}}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            with src.open(info) as reader, dst.open(info.filename, "w", force_zip64=True) as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
    plain.unlink()
    assert bomb.stat().st_size < 2 << 20
    proc, peak_mb, seconds = run_measured("train", "--shards", real_build, "--out", tmp_path / "run", "--quiet",
                                    "--set", "model.name=panns_cnn6", "--set", f"model.init_weights={bomb}",
                                    "--set", "train.epochs=1", "--set", "train.num_workers=0")
    line = one_error_line(proc)
    assert f"model.init_weights: refused {bomb}: its zip entries inflate to" in line
    assert "torch.save never compresses" in line and "download the checkpoint again" in line
    print(f"init_weights bomb: peak {peak_mb:.0f} MB, {seconds:.1f} s")
    assert peak_mb < BASELINE_MB, peak_mb  # before: 1707 MB (the 1 GiB tensor was inflated, then refused)


# --- 12: a forged mid-epoch position in last.pt -----------------------------------------------------------------

def position(**changes):
    """A mid-epoch position as train._position writes it (epoch 2 of the tiny run, after 2 steps of 16)."""
    def edit(state):
        state["position"] = {"epoch": 1, "step": 2, "sums": [2 * 16 * 1.1, 10.0, 32.0, 0.0],
                             "rng": {"torch": torch.get_rng_state()}, "world_size": 1, **changes}
    return edit


def test_a_valid_mid_epoch_position_resumes_there(tiny_run, real_build, tmp_path):
    run = forged_run(tiny_run, tmp_path / "run", position())
    proc, _, _ = run_measured("train", "--shards", real_build, "--out", run, "--resume", "--set", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {run / 'last.pt'} at epoch 2 step 2 of 2" in proc.stdout
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["steps"] == history[0]["steps"] > 2


@pytest.mark.parametrize("edit, message", [
    (position(step=10**12), "--resume: last.pt says epoch 2 stopped after step 1000000000000, but an epoch of these "
                            "shards has"),  # before: exit 0, an empty epoch recorded
    (position(sums=[1.0, 2.0, math.nan, 0.0]), "position sums must be 4 finite numbers"),
    (position(rng={"torch": torch.zeros(5056)}), "position rng must hold the torch (and cuda) generator states"),
    (position(world_size=2), "--resume: last.pt was saved in the middle of an epoch by 2 processes"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr="fast"), "--resume: last.pt optimizer state does not "
                                                                     "fit this run's optimizer"),
    (lambda s: s["scheduler"].update(optimizer=1), "--resume: last.pt scheduler state does not fit this run's"),
    (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)), "--resume: last.pt optimizer moments do "
                                                                           "not have the shapes"),
])
def test_a_forged_resume_state_is_a_clear_error_naming_last_pt(tiny_run, real_build, tmp_path, edit, message):
    run = forged_run(tiny_run, tmp_path / "run", edit)
    before = (run / "history.jsonl").read_bytes(), (run / "last.pt").read_bytes()
    proc, _, _ = run_measured("train", "--shards", real_build, "--out", run, "--resume", "--quiet", "--set",
                              "train.epochs=2")
    line = one_error_line(proc)
    assert message in line and "last.pt" in line, line
    assert ((run / "history.jsonl").read_bytes(), (run / "last.pt").read_bytes()) == before  # nothing recorded


@pytest.mark.parametrize("edit, message", [
    (position(epoch=7), "position epoch = 7, expected 1 (the epoch after the saved one)"),
    (position(epoch="1"), "position epoch = '1', expected 1"),
    (position(step=-1), "position step = -1, expected a count of steps"),
    (position(step=2.0), "position step = 2.0, expected a count of steps"),
    (position(step=True), "position step = True, expected a count of steps"),
    (position(sums=[1.0, 2.0]), "position sums must be 4 finite numbers"),
    (position(sums=[1.0, 2.0, math.inf, 0.0]), "position sums must be 4 finite numbers"),
    (position(sums=[1.0, 40.0, 32.0, 0.0]), "position sums must count 0 <= correct <= n"),
    (position(sums=[0.0, 0.0, 0.0, 0.0]), "position sums must count 0 <= correct <= n, with n > 0 once a step"),
    (position(rng={"torch": torch.get_rng_state()[:100]}), "position rng must hold"),
    (position(rng={"torch": torch.get_rng_state(), "cuda": torch.zeros(16)}), "position rng must hold"),
    (position(rng={"mps": torch.get_rng_state()}), "position rng must hold"),
    (position(world_size=0), "position world_size = 0, expected a number of processes"),
    (position(world_size="1"), "position world_size = '1', expected a number of processes"),
    (position(extra=1), "'position' must hold epoch, step, sums, rng, world_size"),
    (lambda s: s.update(position=[1, 2]), "'position' must hold epoch, step, sums, rng, world_size"),
    (lambda s: s["history"].append(dict(s["history"][0])), "'history' must list the 1 epochs done (epoch = 0)"),
    (lambda s: s["history"][0].pop("val_loss"), "history record 1 must hold epoch, train_loss"),
    (lambda s: s.update(best_epoch=5), "best_epoch = 5, expected an integer in -1..0"),
    (lambda s: s.update(rng={"torch": torch.zeros(3)}), "'rng' must hold the torch generator's state"),
])
def test_a_forged_position_is_refused_when_last_pt_is_read(tiny_run, tmp_path, edit, message):
    path = forged(tiny_run / "last.pt", tmp_path / "last.pt", edit)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a usable audioshard checkpoint: {message}")):
        read_checkpoint(path)
