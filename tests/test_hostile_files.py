"""Hostile files and servers of issue 39 (items 2, 3, 7, 8, 11, 17), each the real thing: links to /dev/zero and
FIFOs made with os.mkfifo, a real local HTTP server and a raw socket server trickling its headers, real ffmpeg,
real shards built from real recordings, the real CLI in a child process (its peak memory measured, and the whole
process group killed if it outlives its time limit, so that a regression fails instead of hanging or swapping).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import _MEASURE, DCS, copy_build
from http_server import ShardServer

from audioshard import remote
from audioshard.audio import AudioError, decode, open_audio
from audioshard.manifest import ManifestError, load_manifest
from audioshard.remote import Fetcher, SourceError

BASELINE_MB = 1100  # a CLI run over a small build peaks at ~760 MB here (torch alone: 650 MB); see test_hostile.py
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def run_cli(*args, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float, float]:
    """`python -m audioshard ARGS` in its own process group: (the process, peak RSS MB, wall seconds). Past
    `timeout` the group is killed and the test fails (a FIFO read blocks for ever, /dev/zero fills memory)."""
    command = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "audioshard", *map(str, args)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"audioshard {' '.join(map(str, args))} still running after {timeout} s")
    err, _, last = err.rstrip("\n").rpartition("\n")
    _, peak_kb, seconds = last.split()
    return subprocess.CompletedProcess(command, proc.returncode, out, err), int(peak_kb) / 1024, float(seconds)


def run_python(code: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """`code` in a child python in its own process group, killed (and the test failed) past `timeout`."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=Path(__file__).parent)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"still running after {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def make_hostile(path: Path, kind: str) -> None:
    """Replace `path` with a FIFO (no writer: a blocking open waits for ever) or a link to /dev/zero (stat says
    0 bytes; a read never ends)."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


def edit_manifest(build: Path, edit) -> None:
    data = json.loads((build / "manifest.json").read_text())
    edit(data)
    (build / "manifest.json").write_text(json.dumps(data))


# --- item 2: only regular files are opened, reads bounded by the expected size + 1 --------------------------

@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_manifest_that_is_a_fifo_or_a_link_to_dev_zero_is_refused_at_once(real_build, tmp_path, kind):
    build = copy_build(real_build, tmp_path)
    make_hostile(build / "manifest.json", kind)
    proc, peak_mb, seconds = run_cli("info", build, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device (like /dev/zero)"
    assert f"{build / 'manifest.json'}: cannot read the manifest" in proc.stderr
    assert f"{what}, not a regular file; refused before reading" in proc.stderr
    # before: the FIFO blocked for ever; /dev/zero was read to the end (GBs in seconds)
    assert peak_mb < BASELINE_MB and seconds < 30, (peak_mb, seconds)


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_an_empty_list_file_that_is_a_fifo_or_dev_zero_is_a_clear_verify_problem(real_build, tmp_path, kind):
    """skipped.jsonl of a build that skipped nothing is 0 bytes: a FIFO or /dev/zero has the right size."""
    build = copy_build(real_build, tmp_path)
    assert load_manifest(build).data["skipped_file"] == {"file": "skipped.jsonl", "rows": 0, "bytes": 0,
                                                         "sha256": EMPTY_SHA256}
    make_hostile(build / "skipped.jsonl", kind)
    proc, peak_mb, seconds = run_cli("verify", build, timeout=90)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{build / 'skipped.jsonl'}: the list of skipped inputs cannot be used" in proc.stdout
    assert "not a regular file; refused before reading" in proc.stdout
    assert "shards and 4 list files checked" in proc.stdout  # every shard and the other lists were still checked
    assert peak_mb < BASELINE_MB and seconds < 60, (peak_mb, seconds)


STREAM_SPLIT = """
import sys
from audioshard.manifest import load_manifest
from audioshard.stream import ShardStream
stream = ShardStream(load_manifest(sys.argv[1]), "val", 10_000)
print("READ", sum(len(b.y) for b in stream), "SKIPPED", stream.skipped_blocks)
"""


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_shard_that_is_a_fifo_or_dev_zero_is_a_counted_skip(real_build, tmp_path, kind):
    """A forged 0-byte shard entry (a publisher writes the manifest too) naming a FIFO or /dev/zero."""
    build = copy_build(real_build, tmp_path)
    samples = load_manifest(build).samples("val")
    edit_manifest(build, lambda d: d["splits"]["val"]["shards"].append(
        {"file": "val-extra.tar", "samples": 0, "sha256": EMPTY_SHA256, "bytes": 0}))
    make_hostile(build / "val-extra.tar", kind)
    start = time.monotonic()
    proc = run_python(STREAM_SPLIT, build, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["READ", str(samples), "SKIPPED", "1"]  # the rest read, the bad one counted
    assert "val-extra.tar: " in proc.stderr and "not a regular file; refused before reading" in proc.stderr
    assert time.monotonic() - start < 60
    proc, peak_mb, _ = run_cli("verify", build, timeout=90)
    assert proc.returncode == 1 and "val-extra.tar: " in proc.stdout and "Traceback" not in proc.stderr
    assert peak_mb < BASELINE_MB, peak_mb


def test_a_linked_regular_shard_still_reads(real_build, tmp_path):
    """Links to regular files (a build spread over disks) keep working: only what is not a regular file is refused."""
    build = copy_build(real_build, tmp_path)
    shard = build / "val-000000.tar"
    elsewhere = tmp_path / "elsewhere.tar"
    shutil.move(shard, elsewhere)
    shard.symlink_to(elsewhere)
    proc = run_cli("verify", build, timeout=90)[0]
    assert proc.returncode == 0 and "all sizes, sha256 checksums, blocks and counts match" in proc.stdout


# --- item 3: ffmpeg reads local files only ----------------------------------------------------------------

class Listener:
    """A TCP listener on 127.0.0.1 counting the connections it gets (ffmpeg's tcp: and http: would connect)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port, self.connections, self.stop = self.sock.getsockname()[1], 0, threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def m4a(tmp_path_factory) -> Path:
    """A real AAC recording (m4a: decoded by ffmpeg only), 2 s of a real car recording."""
    path = tmp_path_factory.mktemp("m4a") / "car.m4a"
    source = sorted((DCS / "car").glob("*.wav"))[0]
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(source), "-t", "2", str(path)], check=True,
                   timeout=60)
    return path


@pytest.mark.parametrize("scheme", ["tcp", "http"])
def test_a_file_named_like_a_url_is_decoded_as_the_local_file_and_nothing_connects(m4a, tmp_path, monkeypatch,
                                                                                   scheme):
    expected, rate = decode(m4a)
    monkeypatch.chdir(tmp_path)  # the name as a user types it: relative, as predict and build pass it on
    with Listener() as listener:
        name = f"{scheme}:127.0.0.1:{listener.port}.m4a"
        shutil.copy(m4a, name)
        samples, got_rate = decode(name)  # probe + decode
        opened_rate, blocks = open_audio(name, 1.0)  # predict's streaming path
        streamed = np.concatenate(list(blocks))
        garbage = Path(f"{scheme}:127.0.0.1:{listener.port}.wav")  # not audio: libsndfile fails, ffmpeg is tried
        garbage.write_bytes(b"RIFF" + bytes(200))
        with pytest.raises(AudioError, match="corrupt or not audio"):
            decode(garbage)
        time.sleep(0.5)  # a connection ffmpeg made would have been accepted by now
        assert listener.connections == 0  # before: ffmpeg connected to 127.0.0.1:PORT for each
    assert got_rate == opened_rate == rate and np.array_equal(samples, expected)
    assert np.array_equal(streamed, expected)


# --- item 7: one wall-clock deadline per attempt, headers included; capped backoff ----------------------------

class HeaderTrickler:
    """A raw HTTP server that sends a status line, then header bytes one per `seconds`, never ending the headers
    (until `cap` seconds, so that a client without a deadline fails the test rather than hanging it)."""

    def __init__(self, seconds: float = 0.2, cap: float = 40.0):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.seconds, self.cap, self.accepted = seconds, cap, 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/"

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket):
        end = time.monotonic() + self.cap
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while time.monotonic() < end:
                conn.sendall(b"a")
                time.sleep(self.seconds)
        except OSError:  # the client hung up: what the test wants
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()


def test_a_server_trickling_its_headers_hits_the_per_attempt_deadline():
    server = HeaderTrickler(seconds=0.2)  # every byte well within the 0.5 s read timeout
    try:
        proc, _, seconds = run_cli("info", server.url, "--set", "shards.http_timeout=0.5",
                                   "--set", "shards.http_retries=1", timeout=90)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "the download took over 5 s (a stalled or trickling server" in proc.stderr
        assert "headers included" in proc.stderr and "gave up after 2 attempts" in proc.stderr
        assert server.accepted == 2
        assert seconds < 20, seconds  # 2 attempts of 5 s; before: held as long as the server kept sending (40 s)
    finally:
        server.close()


def test_the_wait_between_attempts_is_capped(real_build, monkeypatch):
    monkeypatch.setattr(remote, "MAX_BACKOFF_SECONDS", 0.2)  # the real cap is 30 s; the doubling is what is tested
    with ShardServer(real_build) as server:
        server.faults["/manifest.json"] = ["500"] * 6
        start = time.monotonic()
        with pytest.raises(SourceError, match=r"HTTP 500 Internal Server Error \(gave up after 6 attempts\)"):
            Fetcher(timeout=2.0, retries=5, backoff=0.1).read_json(server.url + "manifest.json")
        elapsed = time.monotonic() - start
    assert server.hits["/manifest.json"] == 6
    assert elapsed < 2.0, elapsed  # waits 0.1 + 4 x 0.2 s; doubling without a cap: 0.1 + ... + 1.6 = 3.1 s


# --- item 8: the cache touches only the entries it wrote --------------------------------------------------

READ_CACHED = """
import sys
from audioshard.manifest import load_manifest
from audioshard.remote import Fetcher
from audioshard.stream import ShardStream
fetcher = Fetcher(timeout=5.0, retries=1, cache_dir=sys.argv[2], cache_limit=int(sys.argv[3]))
stream = ShardStream(load_manifest(sys.argv[1], fetcher), "val", 10_000)
print("READ", sum(len(b.y) for b in stream), "SKIPPED", stream.skipped_blocks)
"""


def test_the_cache_leaves_a_users_files_alone_and_never_reads_links_or_fifos(real_build, tmp_path):
    manifest = load_manifest(real_build)
    shards = manifest.shards("val")
    assert len(shards) >= 2
    cache = tmp_path / "cache"
    cache.mkdir()
    mine = {"mine.tar": b"my own archive", "notes.txt": b"notes", "backup.tar": bytes(300_000)}
    for name, data in mine.items():
        (cache / name).write_bytes(data)
    (cache / "linked.tar").symlink_to(tmp_path / "target.txt")
    (tmp_path / "target.txt").write_bytes(b"a file the cache must not touch")
    os.mkfifo(cache / "pipe.tar")
    # Under the very names of two entries: a FIFO (a blocking open waits for ever) and a link to /dev/zero.
    os.mkfifo(cache / f"{shards[0].sha256}.tar")
    (cache / f"{shards[1].sha256}.tar").symlink_to("/dev/zero")
    limit = max(s.bytes for s in shards) + 1  # room for about one shard: every new one evicts
    with ShardServer(real_build) as server:
        start = time.monotonic()
        proc = run_python(READ_CACHED, server.url, cache, limit, timeout=90)
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - start < 60
        assert proc.stdout.split() == ["READ", str(manifest.samples("val")), "SKIPPED", "0"]
        assert all(server.hits[f"/{s.file}"] == 1 for s in shards)  # downloaded, not read from the planted names
    for name, data in mine.items():
        assert (cache / name).read_bytes() == data  # before: *.tar in the folder was evicted
    assert (cache / "linked.tar").is_symlink() and (tmp_path / "target.txt").exists()
    assert (cache / "pipe.tar").is_fifo()
    entries = [p for p in cache.iterdir() if remote.CACHE_ENTRY.fullmatch(p.name)]
    assert entries and all(p.is_file() and not p.is_symlink() for p in entries)
    assert sum(p.stat().st_size for p in entries) <= limit
    assert not list(cache.glob(".part-*"))


def test_the_cache_removes_its_own_stale_part_files_only(real_build, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale, fresh, lookalike = cache / ".part-abcd1234.tar", cache / ".part-wxyz9876.tar", cache / ".part-mine.tar"
    for path in (stale, fresh, lookalike):
        path.write_bytes(b"partial")
    day_ago = time.time() - remote.STALE_PART_SECONDS - 60
    os.utime(stale, (day_ago, day_ago))
    os.utime(lookalike, (day_ago, day_ago))
    with ShardServer(real_build) as server:
        manifest = load_manifest(server.url, Fetcher(timeout=5.0, retries=1, cache_dir=str(cache), cache_limit=1 << 40))
        shard = manifest.shards("val")[0]
        with manifest.fetcher.open_shard(manifest.shard_location(shard), shard.bytes, shard.sha256) as stream:
            assert hashlib.sha256(stream.read()).hexdigest() == shard.sha256
    assert not stale.exists()  # left by a process killed mid-download a day ago
    assert fresh.exists() and lookalike.exists()  # another process's download in progress; not the cache's name


# --- item 11: what parsing a manifest allocates is bounded; unknown keys refused --------------------------

def test_a_manifest_of_millions_of_tiny_values_is_refused_before_parsing(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    data = json.loads((build / "manifest.json").read_text())
    values = 20_000_000  # 60 MB of "{}," (under the 64 MB cap): parsed, 20 million dicts take ~1.5 GB
    text = json.dumps(data)[:-1] + ', "padding": [' + "{}," * (values - 1) + "{}]}"
    (build / "manifest.json").write_text(text)
    assert (build / "manifest.json").stat().st_size < remote.MAX_JSON_BYTES
    proc, peak_mb, seconds = run_cli("info", build, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "JSON values, over the 2,000,000 an audioshard manifest may hold" in proc.stderr
    assert peak_mb < BASELINE_MB and seconds < 30, (peak_mb, seconds)  # before: parsed whole (1.5 GB more)


def test_unknown_keys_in_a_manifest_are_refused_naming_them(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    edit_manifest(build, lambda d: d.update(extra=[0] * 1000))
    with pytest.raises(ManifestError, match=r"unknown key 'extra' \(a manifest holds format, format_version"):
        load_manifest(build)
    build = copy_build(real_build, tmp_path / "2")
    edit_manifest(build, lambda d: d["splits"]["val"].update(notes="x"))
    with pytest.raises(ManifestError, match=r"split 'val': unknown key 'notes'"):
        load_manifest(build)
    build = copy_build(real_build, tmp_path / "3")
    edit_manifest(build, lambda d: d.update(config="not a table"))
    with pytest.raises(ManifestError, match="'config' must be a dict"):
        load_manifest(build)


# --- item 17: check and show read as train reads: the [shards] settings apply; the manifest read once --------

def test_check_and_show_use_the_configured_fetcher_and_check_reads_the_manifest_once(real_build, tmp_path):
    with ShardServer(real_build) as server:
        cache = tmp_path / "check-cache"
        proc = run_cli("check", server.url, "--split", "val", "--set", f"shards.cache_dir={cache}",
                       "--set", "train.batch_size=4", timeout=120)[0]
        assert proc.returncode == 0 and "batch 0: x (4, 1," in proc.stdout, proc.stderr
        assert server.hits["/manifest.json"] == 1  # before: 2 (open_shards and check each loaded it)
        assert any(remote.CACHE_ENTRY.fullmatch(p.name) for p in cache.iterdir())  # before: no cache at all
        cache = tmp_path / "show-cache"
        proc = run_cli("show", server.url, "--split", "val", "--index", "0", "--out", tmp_path / "chunk.png",
                       "--set", f"shards.cache_dir={cache}", timeout=120)[0]
        assert proc.returncode == 0 and (tmp_path / "chunk.png").stat().st_size > 0, proc.stderr
        assert any(remote.CACHE_ENTRY.fullmatch(p.name) for p in cache.iterdir())
        server.faults["/manifest.json"] = ["500"] * 3
        proc = run_cli("check", server.url, "--set", "shards.http_retries=0", timeout=60)[0]
        assert proc.returncode == 2 and "gave up after 1 attempts" in proc.stderr  # the default is 5 attempts
