"""Shared fixtures: real recordings from ../shared/data and small real builds made from them."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from audioshard.build import build_shards
from audioshard.config import load_config
from audioshard.manifest import load_manifest
from audioshard.names import SPLITS
from audioshard.stream import ShardStream

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AUDIOSHARD_SHARED_DATA", ROOT.parent / "shared" / "data"))
DCS = SHARED_DATA / "drone_car_speech"


# Python source for scripts that a test runs in a fresh interpreter: glibc's mallinfo2 (glibc >= 2.33), summed
# over all malloc arenas. hblks: chunks served as their own mmap; uordblks + hblkhd: bytes the program holds,
# whatever the allocator keeps around them (fragmentation and per-thread arenas move RSS, not these).
GLIBC_MALLINFO2 = """
import ctypes

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
"""


# What marks a test as reading the real recordings: these fixtures, or these names in its own code or in
# the code of a fixture it uses.
_REAL_AUDIO_FIXTURES = {"real_raw", "real_build"}
_REAL_AUDIO_NAMES = ("DCS", "SHARED_DATA", "link_tree(", "pick(")


def _reads_real_audio(item) -> bool:
    if _REAL_AUDIO_FIXTURES & set(item.fixturenames):
        return True
    functions = [item.function] + [d.func for name in item.fixturenames
                                   for d in item._fixtureinfo.name2fixturedefs.get(name, ())]
    sources = [_source(f) for f in functions]
    # and the module's own helpers that the test calls (one level down)
    helpers = [v for k, v in vars(item.module).items() if inspect.isfunction(v) and f"{k}(" in sources[0]]
    sources += [_source(f) for f in helpers]
    return any(name in source for source in sources for name in _REAL_AUDIO_NAMES)


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def pytest_configure(config):
    """audioshard's own small records (shards already verified) go to a folder of this test session, never
    the user's ~/.cache; loader workers and CLI subprocesses inherit it."""
    os.environ["AUDIOSHARD_CACHE"] = tempfile.mkdtemp(prefix="audioshard-tests-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.pop("AUDIOSHARD_CACHE", ""), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Without ../shared/data (a fresh clone elsewhere), the tests that read real recordings are skipped
    with the reason and the rest run; where the data is (CI, this project's machines) nothing is skipped."""
    if DCS.is_dir():
        return
    reason = (f"needs the real recordings in {SHARED_DATA} (drone_car_speech/): put them there or set "
              "AUDIOSHARD_SHARED_DATA")
    for item in items:
        if _reads_real_audio(item):
            item.add_marker(pytest.mark.skip(reason=reason))


def pick(folder: Path, count: int) -> list[Path]:
    """`count` files spread evenly over a sorted folder (deterministic)."""
    files = sorted(folder.glob("*.wav"))
    step = max(1, len(files) // count)
    return files[::step][:count]


def link_tree(root: Path, per_class: dict[str, int]) -> Path:
    """A class-per-folder tree of symlinks to real recordings."""
    for label, count in per_class.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for path in pick(DCS / label, count):
            (root / label / path.name).symlink_to(path)
    return root


SMALL_BUILD = ["shards.block_size=8", "shards.chunks_per_shard=32", "split.val_fraction=0.2",
               "split.test_fraction=0.2"]


@pytest.fixture(scope="session")
def real_raw(tmp_path_factory) -> Path:
    """24 drone, 16 car, 24 speech recordings (speech is 8 kHz, the others 16 kHz)."""
    return link_tree(tmp_path_factory.mktemp("raw"), {"drone": 24, "car": 16, "speech": 24})


@pytest.fixture(scope="session")
def real_build(real_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "shards"
    build_shards(real_raw, out, load_config(overrides=SMALL_BUILD), workers=2, progress=False)
    return out


TINY_TRAIN = ["model.width=8", "train.epochs=3", "train.batch_size=16", "train.num_workers=0",
              "train.sanity_steps=20", "train.warmup_epochs=0"]


@pytest.fixture(scope="session")
def tiny_run(real_build, tmp_path_factory) -> tuple[Path, dict]:
    """One real TINY_TRAIN run on real_build, shared by the tests that only read it: (run folder, metrics)."""
    from audioshard.train import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    return run, train(str(real_build), run, load_config(overrides=TINY_TRAIN), progress=False)


# A fresh interpreter that runs the command and reports its peak RSS: ru_maxrss of a process forked
# straight from pytest would start at pytest's own peak (Linux carries it over fork and exec).
_MEASURE = ("import resource, subprocess, sys, time; t = time.monotonic(); "
            "rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(f'PEAK_KB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {time.monotonic() - t:.2f}', "
            "file=sys.stderr); sys.exit(rc)")


def measure(command: list, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `command`: (the process, its peak RSS in MB, wall seconds)."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, command)], capture_output=True, text=True,
                          timeout=timeout)
    proc.stderr, _, last = proc.stderr.rstrip("\n").rpartition("\n")  # the wrapper's line comes last
    _, peak_kb, seconds = last.split()
    return proc, int(peak_kb) / 1024, float(seconds)


def run_measured(*args, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float, float]:
    """`python -m audioshard ARGS`, measured."""
    return measure([sys.executable, "-m", "audioshard", *args], timeout)


@pytest.fixture()
def small_disk(tmp_path):
    """A real 2 MB file system (tmpfs; mounting needs root, which the test machine has): writes past
    it fail with ENOSPC exactly as on a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(mount: Path, leave: int = 0) -> None:
    """Take all but `leave` bytes of the file system at `mount`."""
    stats = os.statvfs(mount)
    with open(mount / "filler", "wb") as stream:
        stream.write(bytes(max(0, stats.f_bavail * stats.f_frsize - leave)))


def copy_build(real_build: Path, tmp_path: Path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(real_build, out)
    return out


def reseal(build: Path, split: str, index: int = 0) -> None:
    """Make the manifest agree with a shard's new bytes (what a careless or hostile publisher would do:
    the publisher writes the manifest too, so its checksums prove nothing)."""
    import json

    from audioshard.manifest import sha256_file

    data = json.loads((build / "manifest.json").read_text())
    entry = data["splits"][split]["shards"][index]
    shard = build / entry["file"]
    entry["bytes"], entry["sha256"] = shard.stat().st_size, sha256_file(shard)
    (build / "manifest.json").write_text(json.dumps(data))


def chunk_table(build):
    """Every chunk of a build as (split, source path, start, label, features bytes), sorted."""
    manifest = load_manifest(build)
    rows = []
    for split in SPLITS:
        for batch in ShardStream(manifest, split, 1000):
            for x, y, s, t in zip(batch.x, batch.y, batch.source, batch.start, strict=True):
                rows.append((split, manifest.sources(split)[int(s)], float(t), int(y), x.numpy().tobytes()))
    return sorted(rows)


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stream:
                    fields = stream.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError):
                pass
    return found
