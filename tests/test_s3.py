"""Shards from an S3-compatible object store: a real moto server on 127.0.0.1 (tests/s3_server.py), reached
through the standard AWS environment variables, with the failures a real store produces."""

import os
import subprocess
import sys
import time

import pytest
from conftest import TINY_TRAIN
from s3_server import S3Server

from audioshard.config import load_config
from audioshard.evaluate import evaluate_checkpoint
from audioshard.info import format_info
from audioshard.manifest import ManifestError, load_manifest
from audioshard.remote import Fetcher, SourceError
from audioshard.shardfile import ShardDataError
from audioshard.stream import ShardStream
from audioshard.train import train

FAST = Fetcher(timeout=2.0, retries=2, backoff=0.05)


def ids(manifest, split):
    return sorted((int(s), float(t)) for b in ShardStream(manifest, split, 10_000)
                  for s, t in zip(b.source, b.start, strict=True))


@pytest.fixture(scope="module")
def store(real_build):
    with S3Server() as server:
        server.url = server.upload(real_build, "audio", "builds/small")
        yield server


@pytest.fixture()
def s3(store, monkeypatch):
    for key, value in store.environment().items():
        monkeypatch.setenv(key, value)
    store.faults.clear()
    store.hits.clear()
    return store


def test_train_and_evaluate_from_s3_equal_local(s3, real_build, tiny_run, tmp_path):
    remote = load_manifest(s3.url)
    local = load_manifest(real_build)
    for split in ("train", "val", "test"):
        assert ids(remote, split) == ids(local, split)
    config = load_config(overrides=TINY_TRAIN)
    train(s3.url, tmp_path / "s3run", config, progress=False)  # the same settings as tiny_run, from local disk
    from_s3 = evaluate_checkpoint(tmp_path / "s3run" / "best_model.pt", s3.url, "test", tmp_path / "e1")
    from_disk = evaluate_checkpoint(tiny_run[0] / "best_model.pt", str(real_build), "test", tmp_path / "e2")
    assert from_s3["chunk"] == from_disk["chunk"] and from_s3["clip"] == from_disk["clip"]
    assert "train chunks" in format_info(remote, s3.url)


def test_cli_commands_read_s3_like_a_folder(s3, tmp_path):
    env = {**os.environ, **s3.environment()}
    show = ["show", s3.url, "--split", "val", "--out", str(tmp_path / "show.png")]
    for command in (["info", s3.url], ["verify", s3.url], ["check", s3.url, "--split", "val"], show):
        proc = subprocess.run([sys.executable, "-m", "audioshard", *command], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "show.png").stat().st_size > 1000


def test_missing_prefix_and_bucket_are_clear_errors(s3):
    with pytest.raises(ManifestError, match=r"s3://audio/nope/manifest.json.*S3 404 NoSuchKey.*aws s3 sync"):
        load_manifest("s3://audio/nope/", FAST)
    with pytest.raises(ManifestError, match=r"S3 404 NoSuchBucket.*bucket name"):
        load_manifest("s3://no-such-bucket/builds/small/", FAST)


def test_403_fails_at_once_naming_the_object(s3):
    manifest = load_manifest(s3.url, FAST)
    name = manifest.shards("val")[0].file
    s3.faults[name] = ["403"]
    started = time.time()
    with pytest.raises(SourceError, match=rf"s3://audio/builds/small/{name}: S3 403 AccessDenied.*s3:GetObject"):
        list(ShardStream(manifest, "val", 64))
    assert s3.hits[name] == 1 and time.time() - started < 2  # a permanent error is not retried


def test_500_then_success_is_retried(s3, real_build):
    manifest = load_manifest(s3.url, FAST)
    name = manifest.shards("val")[0].file
    s3.faults[name] = ["500", "ok"]
    assert ids(manifest, "val") == ids(load_manifest(real_build), "val")
    assert s3.hits[name] == 2


def test_persistent_500_gives_up_after_bounded_retries(s3):
    manifest = load_manifest(s3.url, FAST)
    name = manifest.shards("val")[0].file
    s3.faults[name] = ["500"] * 10
    with pytest.raises(SourceError, match=r"S3 500 InternalError \(gave up after 3 attempts\)"):
        list(ShardStream(manifest, "val", 64, strict=True))
    assert s3.hits[name] == 3


def test_truncated_object_is_retried_then_skipped_and_counted(s3, capsys):
    manifest = load_manifest(s3.url, FAST)
    name = manifest.shards("val")[0].file
    s3.faults[name] = ["truncate", "ok"]
    assert sum(len(b.y) for b in ShardStream(manifest, "val", 64)) == manifest.samples("val")
    assert s3.hits[name] == 2
    s3.faults[name] = ["truncate"] * 3
    stream = ShardStream(manifest, "val", 64)
    assert sum(len(b.y) for b in stream) == manifest.samples("val") - manifest.shards("val")[0].samples
    assert stream.skipped_blocks == 1 and "gave up after 3 attempts" in capsys.readouterr().err
    s3.faults[name] = ["truncate"] * 3
    with pytest.raises(ShardDataError, match="truncated download"):
        list(ShardStream(manifest, "val", 64, strict=True))


def test_cache_serves_s3_shards_without_downloading_again(s3, tmp_path):
    cache = tmp_path / "cache"
    manifest = load_manifest(s3.url, Fetcher(timeout=2.0, retries=2, cache_dir=str(cache)))
    first = ids(manifest, "val")
    assert all(s3.hits[s.file] >= 1 for s in manifest.shards("val"))  # the first epoch downloaded them
    # The second epoch must read the cache: the store now refuses every shard (a download would raise
    # SourceError). Refusing, rather than counting requests, is immune to a late request of an earlier
    # test's reader (one shard opened ahead when that test's stream failed) reaching the server now.
    for s in manifest.shards("val"):
        s3.faults[s.file] = ["403"] * 10
    assert ids(manifest, "val") == first
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(f"{s.sha256}.tar" for s in manifest.shards("val"))


def test_no_credentials_is_a_clear_error(s3, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find here
    with pytest.raises(ManifestError, match="no S3 credentials found: set AWS_ACCESS_KEY_ID"):
        load_manifest(s3.url, FAST)
