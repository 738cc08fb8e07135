"""The record of verified local shards (localfile.py: VerifiedRecord): a shard is hashed until it has passed once,
then read without hashing while it is unchanged; any change to the file brings the hash back, and
`audioshard verify` never trusts the record."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import copy_build

from audioshard.info import verify_build
from audioshard.localfile import VERIFIED, VerifiedRecord
from audioshard.manifest import load_manifest
from audioshard.remote import Fetcher, IntegrityError
from audioshard.stream import ShardStream

WRONG = "0" * 64


def first_shard(build):
    shard = load_manifest(build).shards("train")[0]
    return str(build / shard.file), shard


def test_a_verified_shard_is_read_without_hashing_until_it_changes(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    time.sleep(VerifiedRecord.RACY_SECONDS + 0.1)  # older than the kernel's timestamp granularity allows to trust
    path, shard = first_shard(build)
    fetcher = Fetcher()
    with pytest.raises(IntegrityError):  # not recorded under the wrong checksum: hashed, refused
        fetcher.open_shard(path, shard.bytes, WRONG)
    original = fetcher.open_shard(path, shard.bytes, shard.sha256).read()
    assert VERIFIED.holds(path, os.stat(path), shard.sha256)

    # Recorded as verified under a checksum the bytes do not have: read without hashing (the record is trusted)
    VERIFIED.add(path, os.stat(path), WRONG)
    assert fetcher.open_shard(path, shard.bytes, WRONG).read() == original
    assert Fetcher(remember_verified=False).open_shard(path, shard.bytes, shard.sha256).read() == original
    with pytest.raises(IntegrityError):  # without the record: hashed every time
        Fetcher(remember_verified=False).open_shard(path, shard.bytes, WRONG)

    # The same bytes count, one byte changed in place: the change time moves, so it is hashed again and refused
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as stream:
        stream.write(data)
    with pytest.raises(IntegrityError, match="sha256 does not match"):
        fetcher.open_shard(path, shard.bytes, shard.sha256)
    stream = ShardStream(load_manifest(build), "train", 64)
    assert sum(len(b.y) for b in stream) == load_manifest(build).samples("train") - shard.samples
    assert stream.skipped_blocks == 1


def test_verify_never_trusts_the_record(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    path, shard = first_shard(build)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as stream:  # in place: the same file, its change time moved
        stream.write(data)
    # a stale or forged entry saying the changed file is the one the manifest describes
    VERIFIED.folder.mkdir(parents=True, exist_ok=True)
    (VERIFIED.folder / VERIFIED.key(path, os.stat(path), shard.sha256)).touch()
    assert Fetcher().open_shard(path, shard.bytes, shard.sha256).read() == data  # what the record is for
    good, report = verify_build(str(build))
    assert not good and shard.file in report and "sha256" in report


def test_a_file_changed_just_now_is_not_recorded(real_build, tmp_path):
    """Kernel timestamps are coarse: a write in the same tick as the check would keep the key, so a file
    changed within RACY_SECONDS is hashed and not remembered."""
    build = copy_build(real_build, tmp_path)
    path, shard = first_shard(build)
    Fetcher().open_shard(path, shard.bytes, shard.sha256).close()
    assert not VERIFIED.holds(path, os.stat(path), shard.sha256)


def test_a_record_folder_that_cannot_be_written_only_means_hashing(real_build, tmp_path, monkeypatch):
    build = copy_build(real_build, tmp_path)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the record's folder would be")
    monkeypatch.setenv("AUDIOSHARD_CACHE", str(blocked))
    time.sleep(VerifiedRecord.RACY_SECONDS + 0.1)
    path, shard = first_shard(build)
    for _ in range(2):
        assert len(Fetcher().open_shard(path, shard.bytes, shard.sha256).read()) == shard.bytes
    with pytest.raises(IntegrityError):
        Fetcher().open_shard(path, shard.bytes, WRONG)


def test_a_record_folder_others_can_write_to_is_not_trusted(real_build, tmp_path, monkeypatch):
    """An entry is as good as a hash: in a folder that others could write to (group or world writable), a
    forged entry must not let a shard through unhashed."""
    build = copy_build(real_build, tmp_path)
    path, shard = first_shard(build)
    shared = tmp_path / "shared-cache"
    monkeypatch.setenv("AUDIOSHARD_CACHE", str(shared))
    (shared / "verified").mkdir(parents=True)
    (shared / "verified" / VERIFIED.key(path, os.stat(path), WRONG)).touch()  # "verified" under a wrong checksum
    for mode in (0o777, 0o775):
        os.chmod(shared / "verified", mode)
        with pytest.raises(IntegrityError):
            Fetcher().open_shard(path, shard.bytes, WRONG)
    os.chmod(shared / "verified", 0o700)  # only ours: the entry counts
    assert len(Fetcher().open_shard(path, shard.bytes, WRONG).read()) == shard.bytes
