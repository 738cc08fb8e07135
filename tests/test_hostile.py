"""Hostile and careless inputs of issue 25, each through the CLI where a user would meet it: a clear error
or a counted skip, no traceback, and bounded peak memory (measured in a child process) and time.

Every input here is the real thing: a real gzip stream, a real GNU sparse tar header, real NaN floats,
a real HTTP server on 127.0.0.1, a real full tmpfs.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DCS, copy_build, fill_disk, link_tree, measure, pick, reseal, run_measured
from http_server import ShardServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audioshard.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from audioshard.config import load_config
from audioshard.info import format_info
from audioshard.manifest import ManifestError, load_manifest
from audioshard.remote import Fetcher
from audioshard.serve import serving
from audioshard.shardfile import ShardDataError, decode_npy, member_limits
from audioshard.stream import ShardStream
from audioshard.train import train

GIB = 1 << 30
FAST = Fetcher(timeout=2.0, retries=2, backoff=0.05)
# A CLI run that reads a small build peaks at ~760 MB here (importing torch alone: 650 MB); a bomb that
# got read would add at least its 1 GiB.
BASELINE_MB = 1100


@functools.cache
def gzip_bomb(inflated: int) -> bytes:
    """A gzip'd tar (one gzip stream, as `tar czf` writes) whose one block member inflates to
    `inflated` bytes: ~1 MB on disk per GiB. Made once per session (~2.5 s per GiB)."""
    header = tarfile.TarInfo("000000.mel.npy")
    header.size = inflated
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    zeros = bytes(1 << 20)
    parts = [deflate.compress(header.tobuf(format=tarfile.USTAR_FORMAT))]
    parts += [deflate.compress(zeros) for _ in range(inflated >> 20)]
    parts += [deflate.compress(bytes(2 * tarfile.RECORDSIZE)), deflate.flush()]
    return b"".join(parts)


def sparse_tar(realsize: int) -> bytes:
    """A real GNU sparse tar member: 512 bytes of data stored, `realsize` bytes when read back
    (the hole before the data reads as zeros). Python's tarfile reads this format but cannot write it."""
    info = tarfile.TarInfo("000000.mel.npy")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 512
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    octal = lambda value, width: f"{value:0{width - 1}o}".encode() + b"\0"  # noqa: E731
    header[386:398], header[398:410] = octal(realsize - 512, 12), octal(512, 12)  # one struct: data at the end
    header[483:495] = octal(realsize, 12)  # the size it reads back as
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header) + b"\x93NUMPY" + bytes(506) + bytes(2 * tarfile.RECORDSIZE)


WHY = {"gzip": "gzip-compressed; audioshard reads plain tar shards only", "sparse": "is a sparse file"}


@pytest.mark.parametrize("bomb", ["gzip", "sparse"])
def test_memory_bomb_shards_are_refused_before_reading_local_and_http(real_build, tmp_path, bomb):
    build = copy_build(real_build, tmp_path)
    (build / "val-000000.tar").write_bytes(gzip_bomb(GIB) if bomb == "gzip" else sparse_tar(GIB))
    reseal(build, "val")
    assert (build / "val-000000.tar").stat().st_size < 2 << 20
    with ShardServer(build) as server:
        for source in (build, server.url):
            proc, peak_mb, seconds = run_measured("verify", source)
            assert proc.returncode == 1, proc.stderr
            assert "Traceback" not in proc.stderr + proc.stdout
            assert "val-000000.tar: not a readable tar shard" in proc.stdout
            assert WHY[bomb] in proc.stdout
            assert peak_mb < BASELINE_MB and seconds < 60, (peak_mb, seconds)  # before: 2.7 GB, 8 s
    # train/evaluate/check read through the same stream: the shard is skipped and counted, the rest read.
    stream = ShardStream(load_manifest(build), "val", 10_000)
    read = sum(len(b.y) for b in stream)
    assert stream.skipped_blocks >= 1 and read == load_manifest(build).samples("val") - \
        load_manifest(build).shards("val")[0].samples


def test_check_on_a_gzip_shard_is_a_counted_skip(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    (build / "train-000000.tar").write_bytes(gzip_bomb(GIB))
    reseal(build, "train")
    proc, peak_mb, _ = run_measured("check", build, "--set", "train.batch_size=4")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "skipping: " in proc.stderr and "train-000000.tar" in proc.stderr
    assert peak_mb < BASELINE_MB, peak_mb


def test_member_larger_than_a_block_is_refused_from_its_header(real_build, tmp_path, capsys):
    build = copy_build(real_build, tmp_path)
    limit = member_limits(load_manifest(build))["label.npy"]
    with tarfile.open(build / "val-000000.tar", "w") as tar:
        info = tarfile.TarInfo("000000.label.npy")
        info.size = limit + 1
        tar.addfile(info, io.BytesIO(bytes(limit + 1)))
    reseal(build, "val")
    stream = ShardStream(load_manifest(build), "val", 10_000)
    list(stream)
    assert stream.skipped_blocks >= 1
    assert f"claims {limit + 1} bytes; a block of this build holds at most {limit}" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_odd_member_types_are_refused(real_build, tmp_path, capsys, kind):
    build = copy_build(real_build, tmp_path)
    with tarfile.open(build / "val-000000.tar", "w") as tar:
        info = tarfile.TarInfo("000000.mel.npy")
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.FIFOTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    reseal(build, "val")
    stream = ShardStream(load_manifest(build), "val", 10_000)
    list(stream)
    assert stream.skipped_blocks >= 1 and "is not a plain file" in capsys.readouterr().err


def npy_with_header(array: np.ndarray, header: str) -> bytes:
    """An .npy file with a hand-written header dict (padded as numpy pads it) and `array`'s bytes."""
    text = header.encode("utf-8")  # any bytes: the reader decodes them as latin-1
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + array.tobytes()


def test_non_integer_npy_shape_is_a_counted_skip_in_verify_and_train(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    shard = build / "train-000000.tar"
    with tarfile.open(shard) as src:
        members = [(m.name, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(shard, "w") as dst:
        for name, data in members:
            if name.endswith("00000000.mel.npy"):
                mel = np.load(io.BytesIO(data))
                shape = f"({mel.shape[0]}, {mel.shape[1]}, {float(mel.shape[2])})"
                data = npy_with_header(mel, f"{{'descr': '<f2', 'fortran_order': False, 'shape': {shape}, }}")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    reseal(build, "train")
    proc, _, _ = run_measured("verify", build)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has non-integer dimensions" in proc.stdout and "train-000000.tar key train-00000000" in proc.stdout
    proc, _, _ = run_measured("train", "--shards", build, "--out", tmp_path / "run", "--quiet",
                              *[a for s in ["model.width=8", "train.epochs=1", "train.batch_size=16",
                                            "train.num_workers=0", "train.sanity_steps=0",
                                            "train.warmup_epochs=0"] for a in ("--set", s)])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_blocks"]["train"] == 1


# --- odd sample rates ------------------------------------------------------------------------------

ODD_RATE_READER = """
import sys
import numpy as np
from audioshard.audio import ChunkReader, ChunkRules
chunks = np.concatenate([c for c, _ in ChunkReader(sys.argv[1], ChunkRules(16000, 2.0))])
np.save(sys.argv[2], chunks)
"""


def odd_rate_copies(tmp_path: Path, rate: int, count: int = 6) -> tuple[Path, Path]:
    """`count` real 16 kHz recordings cut to 3.5 s, and the same audio truly resampled to `rate` (scipy's
    exact polyphase filter), in raw16/drone and rawodd/drone."""
    from scipy.signal import resample_poly

    for name in ("raw16", "rawodd"):
        (tmp_path / name / "drone").mkdir(parents=True)
    for i, path in enumerate(pick(DCS / "drone", count)):
        samples, source_rate = sf.read(path, dtype="float32")
        assert source_rate == 16000
        samples = np.resize(samples, 56000)  # 3.5 s: two chunks, the second clear of the min_fraction edge
        sf.write(tmp_path / "raw16" / "drone" / f"{i}.wav", samples, 16000, subtype="FLOAT")
        odd = resample_poly(samples, rate, 16000).astype(np.float32)
        sf.write(tmp_path / "rawodd" / "drone" / f"{i}.wav", odd, rate, subtype="FLOAT")
    return tmp_path / "raw16", tmp_path / "rawodd"


def mel_by_source(build: Path) -> dict[str, np.ndarray]:
    manifest = load_manifest(build)
    out: dict[str, list] = {}
    for split in manifest.split_names:
        for batch in ShardStream(manifest, split, 10_000):
            for x, source, start in zip(batch.x, batch.source, batch.start, strict=True):
                out.setdefault(f"{manifest.sources(split)[int(source)]}@{float(start)}", []).append(x.float().numpy())
    return {k: v[0] for k, v in out.items()}


@pytest.mark.parametrize("rate", [15999, 7993])
def test_odd_sample_rates_build_and_predict_in_bounded_memory(tmp_path, rate):
    raw16, rawodd = odd_rate_copies(tmp_path, rate)
    settings = ["--set", "split.val_fraction=0", "--set", "split.test_fraction=0", "--quiet"]
    proc, peak_mb, seconds = run_measured("build", rawodd, "--out", tmp_path / "odd", *settings)
    assert proc.returncode == 0, proc.stderr
    assert peak_mb < BASELINE_MB and seconds < 60, (peak_mb, seconds)  # before (15999 Hz): 8.6 GB, 41 s
    assert run_measured("build", raw16, "--out", tmp_path / "b16", *settings)[0].returncode == 0
    odd, ref = mel_by_source(tmp_path / "odd"), mel_by_source(tmp_path / "b16")
    assert len(odd) == len(ref) == 12
    for key, mel in ref.items():
        # dB features of the same sound: 15999 Hz is read as 16000 (6e-5 off), 7993 Hz keeps its band below 3 kHz
        bands = slice(None) if rate == 15999 else slice(0, 40)
        assert np.abs(odd[key][0, bands] - mel[0, bands]).mean() < 0.5, key
    # predict's streaming reader takes the same bounded path
    proc, peak_mb, seconds = measure([sys.executable, "-c", ODD_RATE_READER, rawodd / "drone" / "0.wav",
                                      tmp_path / "chunks.npy"])
    assert proc.returncode == 0 and peak_mb < BASELINE_MB and seconds < 30, (proc.stderr, peak_mb)
    assert np.load(tmp_path / "chunks.npy").shape == (2, 32000)


@pytest.mark.parametrize("rate", [200, 999])
def test_sample_rates_outside_the_sane_range_are_skipped_with_the_reason(tmp_path, rate):
    (tmp_path / "raw" / "drone").mkdir(parents=True)
    sf.write(tmp_path / "raw" / "drone" / "slow.wav", np.zeros(rate * 60, np.float32), rate)
    from audioshard.audio import AudioError, ChunkReader, ChunkRules, load

    with pytest.raises(AudioError, match=f"slow.wav: sample rate {rate} Hz is outside 1000..768000 Hz"):
        load(tmp_path / "raw" / "drone" / "slow.wav", 16000)
    with pytest.raises(AudioError, match=f"sample rate {rate} Hz is outside"):
        list(ChunkReader(tmp_path / "raw" / "drone" / "slow.wav", ChunkRules(16000, 2.0)))


# --- HTTP: redirects, deadlines, sizes ------------------------------------------------------------


def test_redirects_to_another_server_or_scheme_are_refused(real_build):
    with ShardServer(real_build) as server, ShardServer(real_build) as other:
        server.faults["/manifest.json"] = ["redirect:/manifest.json?same-server"]
        assert load_manifest(server.url, FAST).samples("val") > 0  # within one server: followed
        for target in (f"{other.url}manifest.json", "ftp://127.0.0.1/manifest.json"):
            server.faults["/manifest.json"] = [f"redirect:{target}"]
            proc = run_measured("info", server.url)[0]
            assert proc.returncode == 2 and "Traceback" not in proc.stderr
            assert f"{server.url}manifest.json: HTTP 302 redirects to {target}, another server" in proc.stderr
        assert other.hits["/manifest.json"] == 0
        server.faults["/val-000000.tar"] = [f"redirect:{other.url}val-000000.tar"]
        proc = run_measured("verify", server.url)[0]
        assert proc.returncode == 1 and f"{server.url}val-000000.tar: HTTP 302 redirects to" in proc.stdout
        assert other.hits["/val-000000.tar"] == 0


def test_a_trickling_server_hits_the_per_file_deadline(real_build):
    with ShardServer(real_build, trickle_seconds=0.2) as server:  # every byte well within the timeout
        server.faults["/manifest.json"] = ["trickle"]
        proc, _, seconds = run_measured("info", server.url, "--set", "shards.http_timeout=0.5",
                                        "--set", "shards.http_retries=0")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "the download took over 5 s (a stalled or trickling server" in proc.stderr
        assert seconds < 20  # before: held as long as each byte came within the timeout (65 s seen)


def test_an_endless_manifest_is_cut_at_64_mb_and_a_shard_at_its_manifest_size(real_build, tmp_path):
    with ShardServer(real_build) as server:
        server.faults["/manifest.json"] = ["endless"]
        proc, peak_mb, _ = run_measured("info", server.url)
        assert proc.returncode == 2 and "over 64 MB; not an audioshard manifest" in proc.stderr
        assert peak_mb < BASELINE_MB, peak_mb  # before: a 300 MB manifest took 1.1 GB
        server.faults["/val-000000.tar"] = ["endless"] * 3
        stream = ShardStream(load_manifest(server.url, FAST), "val", 10_000)
        assert sum(len(b.y) for b in stream) < stream.manifest.samples("val") and stream.skipped_blocks == 1
    big = copy_build(real_build, tmp_path)
    with open(big / "manifest.json", "r+b") as stream:
        stream.truncate(65 << 20)  # a sparse file: 65 MB to stat, nothing on disk
    proc = run_measured("info", big)[0]
    assert proc.returncode == 2 and "over 64 MB; not an audioshard manifest" in proc.stderr


def test_a_truncated_manifest_is_retried_then_named(real_build):
    with ShardServer(real_build) as server:
        server.faults["/manifest.json"] = ["truncate", "ok"]
        assert load_manifest(server.url, FAST).samples("val") > 0
        assert server.hits["/manifest.json"] == 2
        server.faults["/manifest.json"] = ["truncate"] * 3
        with pytest.raises(ManifestError, match="does not parse .*truncated.*gave up after 3 attempts"):
            load_manifest(server.url, FAST)


# --- NaN and inf -----------------------------------------------------------------------------------

TINY = ["model.width=8", "train.epochs=2", "train.batch_size=16", "train.num_workers=0", "train.sanity_steps=0",
        "train.warmup_epochs=0"]


def sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


@pytest.mark.parametrize("setting", ["augment.noise_std=nan", "train.ema_epochs=nan", "train.ema_epochs=inf",
                                     "features.top_db=nan", "train.lr=-inf", "shards.http_timeout=inf"])
def test_nan_and_inf_settings_are_refused_on_the_command_line(setting):
    proc = run_measured("config", "--set", setting)[0]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    key, _, value = setting.partition("=")
    assert f"{key} must be a finite number, got {float(value)!r}" in proc.stderr


def test_nan_in_a_toml_file_is_refused(tmp_path):
    (tmp_path / "bad.toml").write_text("[train]\nema_epochs = nan\n[augment]\nnoise_std = 0.1\n")
    proc = run_measured("config", "--config", tmp_path / "bad.toml")[0]
    assert proc.returncode == 2 and "train.ema_epochs must be a finite number, got nan" in proc.stderr


def test_a_diverging_run_stops_at_the_first_non_finite_loss(real_build, tmp_path):
    proc = run_measured("train", "--shards", real_build, "--out", tmp_path / "run", "--quiet",
                        *sets([*TINY, "train.lr=1e30"]))[0]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "the training loss became NaN or infinite in epoch 1 at step" in proc.stderr
    assert "Lower train.lr (now 1e+30), e.g. --set train.lr=1e+29" in proc.stderr
    assert not (tmp_path / "run" / "best_model.pt").exists() and not (tmp_path / "run" / "metrics.json").exists()


# --- concurrent builds, clean -----------------------------------------------------------------------


def test_a_second_build_into_a_busy_folder_fails_at_once(tmp_path):
    raw = link_tree(tmp_path / "raw", {"drone": 6, "car": 6})
    out = tmp_path / "shards"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running build holds
    try:
        proc, _, seconds = run_measured("build", raw, "--out", out, "--quiet")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"{out}: another audioshard build, merge or clean is working in this folder now" in proc.stderr
        assert seconds < 30 and not any(out.iterdir())
        assert run_measured("clean", out)[0].returncode == 2  # not a build yet: refused before the lock
    finally:
        os.close(holder)
    assert run_measured("build", raw, "--out", out, "--quiet")[0].returncode == 0


def test_two_builds_started_together_leave_one_consistent_build(tmp_path):
    raw = link_tree(tmp_path / "raw", {"drone": 24, "car": 16, "speech": 24})
    out = tmp_path / "shards"
    settings = [["--set", "split.seed=1"], ["--set", "split.seed=2"]]  # two different builds
    procs = [subprocess.Popen([sys.executable, "-m", "audioshard", "build", raw, "--out", out, "--quiet",
                               "--set", "shards.workers=1", *extra], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for extra in settings]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "another audioshard build" in loser or "already holds a different build" in loser
    assert "Traceback" not in loser
    proc = run_measured("verify", out)[0]
    assert proc.returncode == 0, proc.stdout


def test_clean_does_not_follow_a_symlinked_part_folder(real_build, tmp_path):
    other = copy_build(real_build, tmp_path)
    mine = tmp_path / "mine"
    shutil.copytree(real_build, mine)
    (mine / "part-0-of-2").symlink_to(other, target_is_directory=True)
    before = sorted(p.name for p in other.iterdir())
    proc = run_measured("clean", mine)[0]
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in other.iterdir()) == before
    assert sorted(p.name for p in mine.iterdir()) == ["part-0-of-2"]


# --- checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(real_build, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hostile_run")
    train(str(real_build), run, load_config(overrides=[*TINY, "train.epochs=1"]), progress=False)
    return run / "best_model.pt"


def edited_checkpoint(source: Path, target: Path, edit) -> Path:
    state = torch.load(source, weights_only=True)
    edit(state)
    save_checkpoint(target, state)
    return target


def test_a_forged_width_is_refused_before_the_model_is_built(tiny_checkpoint, tmp_path):
    path = edited_checkpoint(tiny_checkpoint, tmp_path / "wide.pt", lambda s: s["model_args"].update(width=3000))
    wav = next((DCS / "drone").glob("*.wav"))
    proc, peak_mb, _ = run_measured("predict", "--checkpoint", path, wav)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}: not a usable audioshard checkpoint: model_args width = 3000, expected an integer in 1..256" \
        in proc.stderr
    assert peak_mb < BASELINE_MB, peak_mb  # before: 13.6 GB asked for


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["model_args"].update(name="evil"), "model_args must name one of seed_cnn, cnn6"),
    (lambda s: s["model_args"].update(name={}), "model_args must name one of seed_cnn, cnn6"),  # found by hypothesis
    (lambda s: s["model_args"].update(num_classes=10**9), "num_classes = 1000000000, expected an integer"),
    (lambda s: s["model_args"].update(width="32"), "width = '32', expected an integer"),
    (lambda s: s["model_args"].update(exec="x"), "model_args has keys ['exec'] that cnn6 does not take"),
    (lambda s: s.pop("classes"), "'classes' must be a list of num_classes names"),
    (lambda s: s["normalization"].update(std=float("nan")), "'normalization' must hold a finite mean"),
    (lambda s: s["features"].update(n_mels=10**6), "at most 1024 mels"),
    (lambda s: s["features"].pop("hop_length"), "'features' must hold sample_rate"),
    (lambda s: s["features"].update(chunk_seconds=float("inf")), "chunk_seconds = inf, expected a finite number"),
])
def test_checkpoint_schema_is_checked_before_use(tiny_checkpoint, tmp_path, edit, message):
    path = edited_checkpoint(tiny_checkpoint, tmp_path / "bad.pt", edit)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(path)


def test_wrongly_shaped_weights_are_a_clear_error(tiny_checkpoint, tmp_path):
    path = edited_checkpoint(tiny_checkpoint, tmp_path / "shape.pt",
                             lambda s: s["model"].update({"head.weight": torch.zeros(5, 5)}))
    with pytest.raises(CheckpointError, match="weights do not fit its model_args: .*head.weight"):
        model_from_checkpoint(load_checkpoint(path))


def deflated_checkpoint(source: Path, target: Path, tensor_bytes: int) -> Path:
    """A real torch.save checkpoint holding a `tensor_bytes` tensor, re-zipped with deflate: ~1 MB per GiB.
    The tensor is torch.empty (never touched, so it costs no memory here)."""
    state = torch.load(source, weights_only=True)
    state["model"]["bomb"] = torch.empty(tensor_bytes, dtype=torch.uint8)
    plain = target.with_suffix(".plain")
    save_checkpoint(plain, state)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            with src.open(info) as reader, dst.open(info.filename, "w", force_zip64=True) as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
    plain.unlink()
    return target


def test_a_checkpoint_that_inflates_is_refused_from_its_zip_directory(tiny_checkpoint, tmp_path):
    path = deflated_checkpoint(tiny_checkpoint, tmp_path / "bomb.pt", GIB)
    assert path.stat().st_size < 8 << 20
    wav = next((DCS / "drone").glob("*.wav"))
    proc, peak_mb, _ = run_measured("predict", "--checkpoint", path, wav)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "its zip entries inflate to" in proc.stderr and "torch.save never compresses" in proc.stderr
    assert peak_mb < BASELINE_MB, peak_mb  # before: a 1 GiB tensor from a 4.7 MB file


# --- plots -------------------------------------------------------------------------------------------

CONFUSION_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from audioshard.evaluate import save_confusion_matrix
n, out = int(sys.argv[1]), Path(sys.argv[2])
rng = np.random.default_rng(0)
y = rng.integers(0, n, 50 * n)
save_confusion_matrix(out, y, np.where(rng.random(len(y)) < 0.7, y, rng.integers(0, n, len(y))),
                      [f"class-{i}" + "x" * (i % 7) * 50 for i in range(n)], "test")
"""


@pytest.mark.parametrize("classes", [150, 1000])
def test_confusion_matrix_stays_bounded_for_many_classes(tmp_path, classes):
    import matplotlib.image

    out = tmp_path / "test_confusion_matrix.png"
    proc, peak_mb, seconds = measure([sys.executable, "-c", CONFUSION_SCRIPT, classes, out])
    assert proc.returncode == 0, proc.stderr
    assert seconds < 20 and peak_mb < BASELINE_MB, (seconds, peak_mb)  # before, 150 classes: 27 s, 3.5 GB
    assert matplotlib.image.imread(out).shape[0] <= 2000  # 20 inches at 100 dpi
    counts = np.loadtxt(out.with_suffix(".csv"), delimiter=",")
    assert counts.shape == (classes, classes) and counts.sum() == 50 * classes


# --- manifest schema ---------------------------------------------------------------------------------


def edit_manifest(build: Path, edit) -> None:
    data = json.loads((build / "manifest.json").read_text())
    edit(data)
    (build / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["splits"]["val"]["shards"][0].update(sha256=None), "has no valid sha256"),
    (lambda d: d.update(block_size=0), "block_size = 0, expected an integer in 1..4096"),
    (lambda d: d.update(block_size=4096, features={**d["features"], "n_mels": 1024}), "exceeds 256 MB"),
    (lambda d: d.pop("classes"), "'classes' must be a list"),
    (lambda d: d["features"].update(n_mels="64"), "features n_mels = '64', expected a positive integer"),
    (lambda d: d["normalization"].update(std=0), "'normalization' must hold a finite mean and a positive std"),
    (lambda d: d["splits"]["val"]["shards"][0].update(samples=-1), "has a negative count"),
    (lambda d: d["splits"]["val"].update(samples=10**9), "'samples' must equal the sum"),
    (lambda d: d["splits"]["val"]["class_counts"].pop("car"), "'class_counts' must give a count for every class"),
    (lambda d: d["splits"]["val"]["shards"][0].pop("bytes"), "must hold file, samples, sha256 and bytes"),
    (lambda d: d["skipped_file"].update(rows=-1), "'skipped_file' must give rows and bytes within"),
    (lambda d: d.update(format_version=1), "'sources' must be a list of recording names"),  # v1: lists inline
])
def test_manifest_schema_is_checked_at_load(real_build, tmp_path, edit, message):
    build = copy_build(real_build, tmp_path)
    edit_manifest(build, edit)
    proc = run_measured("info", build)[0]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{build}/manifest.json: not a usable manifest: " in proc.stderr and message in proc.stderr


# --- property test: hostile but well-formed headers, manifests, checkpoints -------------------------

HOSTILE = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.just({}))


@HOSTILE
@given(shape=st.lists(st.one_of(st.integers(-2, 2**40), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3)),
                      max_size=4),
       descr=st.sampled_from(["<f2", "<f4", "|O", "<i2", "float16", "x", ""]), fortran=ODD_VALUES)
def test_property_hostile_npy_headers_give_only_shard_errors(real_build, shape, descr, fortran):
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {tuple(shape)!r}, }}"
    member = npy_with_header(np.zeros(8 * 64 * 63, np.float16), header)
    try:
        decode_npy(member, "<f2", (64, 63), 8, "hostile.tar key k mel.npy")
    except ShardDataError as exn:
        assert "hostile.tar key k" in str(exn)


@HOSTILE
@given(path=st.lists(st.sampled_from(["classes", "features", "block_size", "normalization", "splits", "skipped",
                                      "n_mels", "sample_rate", "chunk_seconds", "hop_length", "mean", "std", "val",
                                      "shards", 0, "samples", "sha256", "bytes", "sources", "class_counts",
                                      "recordings_file", "skipped_file", "rows", "file", "format_version"]),
                     min_size=1, max_size=4), value=ODD_VALUES)
def test_property_hostile_manifests_give_only_manifest_errors(real_build, tmp_path_factory, path, value):
    data = json.loads((real_build / "manifest.json").read_text())
    node = data
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
    else:
        if isinstance(node, dict) or (isinstance(node, list) and isinstance(path[-1], int) and node):
            node[path[-1]] = value
    build = tmp_path_factory.mktemp("m")
    (build / "manifest.json").write_text(json.dumps(data, allow_nan=True))
    for path in real_build.glob("*.jsonl"):  # the list files beside it
        (build / path.name).write_bytes(path.read_bytes())
    try:
        manifest = load_manifest(build)
    except ManifestError as exn:
        assert str(build) in str(exn)
    else:  # what a valid manifest promises: every reader-facing property works, or names its build
        assert member_limits(manifest)["mel.npy"] < 300 << 20
        for split in manifest.split_names:
            manifest.shards(split), manifest.samples(split)
        try:  # the list files are checked when read: an entry that does not match them is refused then
            format_info(manifest, str(build))
            [list(manifest.sources(split)) for split in manifest.split_names]
        except ManifestError as exn:
            assert str(build) in str(exn)


@HOSTILE
@given(key=st.sampled_from(["model_args", "classes", "features", "normalization", "model"]),
       inner=st.sampled_from(["name", "num_classes", "width", "dropout", "input_norm", "mean", "std", "n_mels",
                              "hop_length", "sample_rate", "chunk_seconds", "dtype", None]),
       value=ODD_VALUES)
def test_property_hostile_checkpoint_dicts_give_only_checkpoint_errors(tiny_checkpoint, tmp_path_factory, key,
                                                                        inner, value):
    state = torch.load(tiny_checkpoint, weights_only=True)
    if inner is None or not isinstance(state[key], dict):
        state[key] = value
    else:
        state[key][inner] = value
    path = tmp_path_factory.mktemp("c") / "x.pt"
    save_checkpoint(path, state)
    with contextlib.suppress(CheckpointError):  # the only error allowed out
        model_from_checkpoint(load_checkpoint(path))


def test_build_refuses_settings_its_readers_would_refuse(tmp_path):
    raw = link_tree(tmp_path / "raw", {"drone": 2, "car": 2})
    proc = run_measured("build", raw, "--out", tmp_path / "out", "--set", "shards.block_size=5000")[0]
    assert proc.returncode == 2 and "block_size = 5000, expected an integer in 1..4096" in proc.stderr
    assert not (tmp_path / "out").exists()


# --- a real full disk ------------------------------------------------------------------------------


def test_build_on_a_full_disk_is_a_clear_error_from_start_to_end(tmp_path, small_disk):
    raw = link_tree(tmp_path / "raw", {"drone": 40, "car": 40, "speech": 40})  # ~3 MB of shards
    proc = run_measured("build", raw, "--out", small_disk / "shards", "--quiet", "--set", "shards.workers=1")[0]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "writing the build failed" in proc.stderr and "No space left on device" in proc.stderr
    assert not (small_disk / "shards" / "manifest.json").exists()
    fill_disk(small_disk)  # now even the build's start marker cannot be written
    proc = run_measured("build", raw, "--out", small_disk / "again", "--quiet")[0]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot start a build in {small_disk / 'again'} (No space left on device)" in proc.stderr


def test_training_on_a_full_disk_is_a_clear_error_and_config_toml_is_never_half_written(real_build, small_disk):
    run = small_disk / "run"
    fill_disk(small_disk, leave=96 << 10)  # config.toml fits, a checkpoint does not
    proc = run_measured("train", "--shards", real_build, "--out", run, "--quiet", *sets(TINY))[0]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"writing {run / 'last.pt'} failed (" in proc.stderr and "continue with --resume" in proc.stderr
    assert "[train]" in (run / "config.toml").read_text()
    (small_disk / "filler").unlink()
    (run / "config.toml").unlink()
    fill_disk(small_disk)
    proc = run_measured("train", "--shards", real_build, "--out", run, "--quiet", *sets(TINY))[0]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "No space left on device" in proc.stderr and "free some space" in proc.stderr
    assert not (run / "config.toml").exists() and not list(run.glob(".config.toml.*"))  # not left at 0 bytes


# --- serve ------------------------------------------------------------------------------------------


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exn:
        return exn.code


def test_serve_gives_only_the_builds_own_files(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    (build / "passwd.tar").symlink_to("/etc/passwd")
    (build / "etc").symlink_to("/etc", target_is_directory=True)
    (build / ".staging").mkdir()
    (build / ".staging" / "train-000000.tar").write_bytes(b"partial")
    (build / ".manifest.json.x.tmp").write_text("{}")
    (build / "sub").mkdir()
    with serving(build) as url:
        assert http_status(url + "manifest.json") == 200 and http_status(url + "val-000000.tar") == 200
        for path in ("passwd.tar", "etc/passwd", "", "sub/", "sub", ".staging/train-000000.tar",
                     ".manifest.json.x.tmp", "%2e%2e/%2e%2e/etc/passwd", "./.staging/train-000000.tar"):
            assert http_status(url + path) == 404, path


def test_serve_bounds_idle_connections_and_their_threads(real_build):
    with serving(real_build, timeout=1.0, max_connections=8) as url:
        host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
        before = threading.active_count()
        idle = [socket.create_connection((host, port)) for _ in range(200)]  # connect, send nothing
        time.sleep(0.3)
        assert threading.active_count() - before <= 8  # before: 200 threads, held forever
        time.sleep(2.0)  # past the request timeout: every idle connection is closed
        assert threading.active_count() - before <= 1
        assert http_status(url + "manifest.json") == 200
        for sock in idle:
            sock.close()


# --- values inside blocks -----------------------------------------------------------------------------


def replace_member(shard: Path, suffix: str, make) -> None:
    """Rewrite the first block's `suffix` member of a tar shard with `make(old array)`."""
    with tarfile.open(shard) as src:
        members = [(m.name, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(shard, "w") as dst:
        for name, data in members:
            if name.endswith(f"00000000.{suffix}"):
                buffer = io.BytesIO()
                np.save(buffer, make(np.load(io.BytesIO(data))), allow_pickle=False)
                data = buffer.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("suffix, make, message", [
    ("source.npy", lambda a: np.full_like(a, 10**6), "source index out of range 0.."),
    ("source.npy", lambda a: np.full_like(a, -1), "source index out of range 0.."),
    ("start.npy", lambda a: np.full_like(a, np.nan), "start times must be finite seconds >= 0"),
    ("start.npy", lambda a: np.full_like(a, -5.0), "start times must be finite seconds >= 0"),
])
def test_out_of_range_sources_and_bad_starts_are_refused(real_build, tmp_path, suffix, make, message):
    build = copy_build(real_build, tmp_path)
    replace_member(build / "val-000000.tar", suffix, make)
    reseal(build, "val")
    proc = run_measured("verify", build)[0]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "val-000000.tar key val-00000000: " + message in proc.stdout


def test_a_source_index_one_past_the_split_is_refused(real_build, tmp_path, capsys):
    build = copy_build(real_build, tmp_path)
    count = len(load_manifest(build).sources("val"))
    replace_member(build / "val-000000.tar", "source.npy", lambda a: np.full_like(a, count))
    reseal(build, "val")
    stream = ShardStream(load_manifest(build), "val", 10_000)
    assert all(int(b.source.max()) < count for b in stream) and stream.skipped_blocks == 1
    assert f"source index out of range 0..{count - 1}" in capsys.readouterr().err


# --- a split with nothing readable ---------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_with_nothing_readable_is_a_clear_error(real_build, tiny_checkpoint, tmp_path, split):
    build = copy_build(real_build, tmp_path)
    for index, shard in enumerate(load_manifest(build).shards(split)):
        (build / shard.file).write_bytes(b"not a tar" * 100)
        reseal(build, split, index)
    proc = run_measured("train", "--shards", build, "--out", tmp_path / "run", "--quiet", *sets(TINY))[0]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"nothing readable in the {split} split of {build}" in proc.stderr
    assert f"audioshard verify {build}" in proc.stderr
    if split == "val":  # before: a crash inside scikit-learn, after the whole training run
        proc = run_measured("evaluate", "--checkpoint", tiny_checkpoint, "--shards", build, "--split", "val",
                            "--out", tmp_path / "e")[0]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"nothing readable in the val split of {build}" in proc.stderr


# --- spreadsheet formulas ---------------------------------------------------------------------------

FORMULAS = ["=HYPERLINK(\"http://evil.example\",\"x\")", "+1+cmd|' /C calc'!A0", "@SUM(A1)"]


def test_predict_csv_never_starts_a_cell_with_a_formula(tiny_checkpoint, tmp_path):
    path = edited_checkpoint(tiny_checkpoint, tmp_path / "named.pt", lambda s: s.update(classes=FORMULAS))
    wav = tmp_path / "-2+3.wav"
    shutil.copy(next((DCS / "drone").glob("*.wav")), wav)
    for per_chunk in ([], ["--per-chunk"]):
        proc = run_measured("predict", "--checkpoint", path, wav, "--format", "csv", *per_chunk)[0]
        assert proc.returncode == 0, proc.stderr
        rows = list(csv.reader(io.StringIO(proc.stdout)))
        cells = [c for row in rows for c in row]
        assert not [c for c in cells if c.startswith(("=", "+", "-", "@"))], cells
        assert f"'{wav}" not in cells and str(wav) in cells[len(rows[0]):]  # an absolute path is left as it is
        assert any(c in {f"'{f}" for f in FORMULAS} for c in rows[1])


def test_sources_csv_keeps_site_text_as_text_and_ids_exact(tmp_path):
    from audioshard.acquire.common import SourcesFile, read_sources

    sources = SourcesFile(tmp_path)
    sources.add({"path": "drone/x.wav", "label": "drone", "extractor": "youtube", "id": "-dQw4w9WgXc",
                 "title": FORMULAS[0], "uploader": "@evil", "license": "+cc"})
    row = read_sources(tmp_path)[0]
    assert (row["title"], row["uploader"], row["license"]) == (f"'{FORMULAS[0]}", "'@evil", "'+cc")
    assert row["id"] == "-dQw4w9WgXc" and SourcesFile(tmp_path).has("drone", None, None, "youtube -dQw4w9WgXc")


# --- CSV input ---------------------------------------------------------------------------------------


def test_csv_rows_naming_one_file_twice_are_reported(tmp_path):
    drones, cars = pick(DCS / "drone", 8), pick(DCS / "car", 8)
    rows = [f"{p},drone" for p in drones] + [f"{p},car" for p in cars]
    rows += [f"{drones[0]},car", f"{cars[0]},car", f"{cars[1]},car"]  # a conflict, then two plain repeats
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    proc = run_measured("build", tmp_path / "list.csv", "--out", tmp_path / "out", "--quiet",
                        "--set", "shards.csv_allow_outside=true")[0]  # the CSV names recordings elsewhere
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(tmp_path / "out")
    reasons = {(s["path"], s["reason"]) for s in manifest.skipped}
    twice = "the same file is listed with labels car, drone; give it one row (several classes: car;drone)"
    assert (str(drones[0]), f"list.csv line 2: {twice}") in reasons
    assert (str(drones[0]), f"list.csv line 18: {twice}") in reasons
    assert (str(cars[0]), "list.csv line 19: the same file as line 10 (used once)") in reasons
    used = [s for split in manifest.split_names for s in manifest.sources(split)]
    assert len(used) == len(set(used)) == 15 and str(drones[0]) not in used


# --- audio files that would decode to more than build holds ---------------------------------------------


def forged_flac(path: Path, claimed_samples: int) -> Path:
    """A real one-second FLAC whose STREAMINFO claims `claimed_samples` (the 36-bit total-samples field)."""
    sf.write(path, np.full(16000, 0.1, np.float32), 16000)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    fields = int.from_bytes(data[18:26], "big")
    data[18:26] = ((fields & ~((1 << 36) - 1)) | claimed_samples).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def test_audio_longer_than_build_holds_is_skipped_before_decoding(tmp_path, monkeypatch):
    raw = link_tree(tmp_path / "raw", {"drone": 4, "car": 4})
    forged_flac(raw / "drone" / "forged.flac", (1 << 36) - 1)
    proc, peak_mb, _ = run_measured("build", raw, "--out", tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    skipped = load_manifest(tmp_path / "out").skipped
    assert [s["path"] for s in skipped] == ["drone/forged.flac"]
    assert "68719476735 frames x 1 channels are more than audioshard build decodes" in skipped[0]["reason"]
    assert peak_mb < BASELINE_MB, peak_mb
    # the same bound on real data, through each decoder (wave, libsndfile, ffmpeg): a 10-s file with the
    # limit lowered to 5 s
    import audioshard.audio as audio

    monkeypatch.setattr(audio, "MAX_DECODED_SAMPLES", 5 * 16000)
    wav = next((DCS / "drone").glob("*.wav"))
    samples, rate = sf.read(wav, dtype="float32")
    for name, subtype in (("long.wav", "PCM_16"), ("long.flac", "PCM_16"), ("long.m4a", None)):
        target = tmp_path / name
        if subtype:
            sf.write(target, np.resize(samples, 10 * rate), rate, subtype=subtype)
        else:
            sf.write(tmp_path / "src.wav", np.resize(samples, 10 * rate), rate)
            subprocess.run(["ffmpeg", "-v", "error", "-i", tmp_path / "src.wav", target], check=True)
        with pytest.raises(audio.AudioError, match=f"{name}: .* are more than audioshard build decodes"):
            audio.decode(target)
