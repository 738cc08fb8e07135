"""Shards over HTTP from a real server on 127.0.0.1: training, retries, clear errors, cache."""

import threading
import time

import numpy as np
import pytest
from conftest import TINY_TRAIN
from http_server import ShardServer

from audioshard.config import load_config
from audioshard.evaluate import evaluate_checkpoint
from audioshard.info import check_pipeline, format_info
from audioshard.manifest import ManifestError, load_manifest
from audioshard.remote import Fetcher, SourceError
from audioshard.serve import serving
from audioshard.shardfile import ShardDataError
from audioshard.stream import ReadTask, ShardStream, opened_ahead
from audioshard.train import train

FAST = Fetcher(timeout=2.0, retries=2, backoff=0.05)


def ids(manifest, split):
    return sorted((int(s), float(t)) for b in ShardStream(manifest, split, 10_000)
                  for s, t in zip(b.source, b.start, strict=True))


@pytest.fixture()
def server(real_build):
    with ShardServer(real_build, stall_seconds=10) as srv:
        yield srv


def test_train_and_evaluate_from_http(server, real_build, tmp_path):
    remote = load_manifest(server.url)
    assert ids(remote, "train") == ids(load_manifest(real_build), "train")
    train(server.url, tmp_path / "run", load_config(overrides=TINY_TRAIN), progress=False)
    metrics = evaluate_checkpoint(tmp_path / "run" / "best_model.pt", server.url, "test", tmp_path / "eval")
    local = evaluate_checkpoint(tmp_path / "run" / "best_model.pt", str(real_build), "test", tmp_path / "eval2")
    assert metrics["chunk"] == local["chunk"]
    assert "train chunks" in format_info(remote, server.url)
    assert "label mix" in check_pipeline(server.url, "val", load_config(overrides=["train.batch_size=8"]))


def test_audioshard_serve_delivers_every_shard_byte_for_byte(real_build):
    """The shipped server (`audioshard serve`, kernel sendfile) gives the same samples as local disk."""
    local = load_manifest(real_build)
    with serving(real_build) as url:
        remote = load_manifest(url, FAST)
        for split in ("train", "val", "test"):
            assert ids(remote, split) == ids(local, split)
        assert [b.x.numpy().tobytes() for b in ShardStream(remote, "val", 64)] == \
            [b.x.numpy().tobytes() for b in ShardStream(local, "val", 64)]


def test_404_is_a_clear_error_naming_the_url(server):
    with pytest.raises(ManifestError, match=r"127\.0\.0\.1.*/nope/manifest.json.*HTTP 404"):
        load_manifest(server.url + "nope/", FAST)
    manifest = load_manifest(server.url, FAST)
    name = "/" + manifest.shards("val")[0].file
    server.faults[name] = ["403"]
    started = time.time()
    with pytest.raises(SourceError, match=r"val-000000.tar: HTTP 403"):
        list(ShardStream(manifest, "val", 64))
    assert time.time() - started < 2  # no retries for a permanent error


def test_500_then_success_is_retried(server, real_build):
    manifest = load_manifest(server.url, FAST)
    name = "/" + manifest.shards("val")[0].file
    server.faults[name] = ["500", "reset", "ok"]
    assert ids(manifest, "val") == ids(load_manifest(real_build), "val")
    assert server.hits[name] == 3


@pytest.mark.parametrize("fault, message", [("500", "HTTP 500"), ("stall", "connection failed")])
def test_persistent_faults_give_up_after_bounded_retries(server, fault, message):
    manifest = load_manifest(server.url, FAST)
    name = "/" + manifest.shards("val")[0].file
    server.faults[name] = [fault] * 10
    started = time.time()
    with pytest.raises(SourceError, match=message) as info:
        list(ShardStream(manifest, "val", 64))
    assert "gave up after 3 attempts" in str(info.value) and name.lstrip("/") in str(info.value)
    assert server.hits[name] == 3 and time.time() - started < 3 * 2.0 + 2


def test_truncated_download_is_retried_then_skipped_and_counted(server, capsys):
    manifest = load_manifest(server.url, FAST)
    name = "/" + manifest.shards("val")[0].file
    server.faults[name] = ["truncate"] * 3
    stream = ShardStream(manifest, "val", 64)
    read = sum(len(b.y) for b in stream)
    assert read == manifest.samples("val") - manifest.shards("val")[0].samples  # nothing from it was used
    assert stream.skipped_blocks == 1
    assert "truncated download" in capsys.readouterr().err and server.hits[name] == 3
    server.faults[name] = ["truncate"] * 3
    with pytest.raises(ShardDataError, match="truncated download"):
        list(ShardStream(manifest, "val", 64, strict=True))


def test_tampered_shard_is_never_trained_on(server, real_build):
    manifest = load_manifest(server.url, FAST)
    shard = real_build / manifest.shards("val")[0].file
    original = shard.read_bytes()
    try:
        tampered = bytearray(original)
        tampered[len(tampered) // 2] ^= 0xFF  # same size, one flipped byte
        shard.write_bytes(bytes(tampered))
        stream = ShardStream(manifest, "val", 8)
        read = sum(len(b.y) for b in stream)
        assert read == manifest.samples("val") - manifest.shards("val")[0].samples and stream.skipped_blocks == 1
        with pytest.raises(ShardDataError, match="sha256"):
            list(ShardStream(load_manifest(real_build), "val", 8, strict=True))  # local shards are checked too
    finally:
        shard.write_bytes(original)


def test_cache_is_verified_and_safe_to_fill_concurrently(server, real_build, tmp_path):
    cache = tmp_path / "cache"
    fetcher = Fetcher(timeout=2.0, retries=1, cache_dir=str(cache))
    manifest = load_manifest(server.url, fetcher)
    expected = ids(load_manifest(real_build), "train")
    results = []
    threads = [threading.Thread(target=lambda: results.append(ids(manifest, "train"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3
    files = sorted(cache.glob("*.tar"))
    assert [f.stem for f in files] == sorted(s.sha256 for s in manifest.shards("train"))
    assert not list(cache.glob(".part-*"))
    hits = sum(server.hits.values())
    assert ids(manifest, "train") == expected and sum(server.hits.values()) == hits  # served from the cache
    files[0].write_bytes(b"garbage")  # a corrupt cache entry is detected and fetched again
    assert ids(manifest, "train") == expected and sum(server.hits.values()) == hits + 1
    assert np.all([f.stat().st_size > 100 for f in files])


def test_cache_limit_evicts_the_least_recently_used_shard(server, tmp_path):
    cache = tmp_path / "cache"
    manifest = load_manifest(server.url, FAST)
    shards = sorted(manifest.shards("train"), key=lambda s: s.bytes, reverse=True)[:3]
    a, b, c = shards
    fetcher = Fetcher(timeout=2.0, retries=1, cache_dir=str(cache), cache_limit=a.bytes + b.bytes)

    def use(shard):
        fetcher.open_shard(manifest.shard_location(shard), shard.bytes, shard.sha256).close()
        time.sleep(0.02)  # distinct modification times

    use(a)
    use(b)
    use(a)  # a hit makes `a` the most recently used
    use(c)  # no room for three: `b`, the least recently used, goes
    assert {p.stem for p in cache.glob("*.tar")} == {a.sha256, c.sha256}
    assert sum(p.stat().st_size for p in cache.glob("*.tar")) <= fetcher.cache_limit
    small = Fetcher(timeout=2.0, retries=1, cache_dir=str(tmp_path / "small"), cache_limit=a.bytes - 1)
    with pytest.raises(SourceError, match="do not fit in shards.cache_limit"):
        small.open_shard(manifest.shard_location(a), a.bytes, a.sha256)


READ_ALL = """
import sys
from audioshard.manifest import load_manifest
from audioshard.remote import Fetcher
from audioshard.stream import ShardStream
fetcher = Fetcher(timeout=5.0, retries=2, cache_dir=sys.argv[2], cache_limit=int(sys.argv[3]))
for epoch in range(3):
    stream = ShardStream(load_manifest(sys.argv[1], fetcher), "train", 10_000, shuffle=True, seed=int(sys.argv[4]))
    stream.set_epoch(epoch)
    ids = sorted((int(s), float(t)) for b in stream for s, t in zip(b.source, b.start, strict=True))
print(len(ids), stream.skipped_blocks)
"""


def test_cache_limit_holds_with_three_processes_filling_it_at_once(server, real_build, tmp_path):
    """Three processes stream the split three times each through one cache smaller than the split: each
    reads every chunk, and the cache ends within its limit with no partial files."""
    import subprocess
    import sys

    manifest = load_manifest(real_build)
    sizes = sorted(s.bytes for s in manifest.shards("train"))
    limit = sizes[-1] + sizes[-2] + sizes[-3] // 2  # room for two and a half of the largest shards
    assert limit < sum(sizes)  # eviction must happen
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", READ_ALL, server.url, str(cache), str(limit), str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert [out.split() for out, _ in outputs] == [[str(manifest.samples("train")), "0"]] * 3
    assert sum(p.stat().st_size for p in cache.glob("*.tar")) <= limit
    assert not list(cache.glob(".part-*"))


def test_a_cache_limit_that_is_not_a_size_is_refused_up_front():
    from audioshard.config import ConfigError

    with pytest.raises(ConfigError, match="not a size"):
        load_config(overrides=["shards.cache_limit=lots"])
    assert load_config(overrides=["shards.cache_limit=2GiB"]).fetcher().cache_limit == 2 << 30


def test_abandoning_a_stream_never_waits_for_the_shard_being_opened_ahead(server):
    """The next shard is opened in a thread; a stream left mid-way (and finalised, maybe by the garbage
    collector in that very thread) must not wait for it: here the shard opened ahead hangs for 10 s."""
    manifest = load_manifest(server.url, FAST)
    second = manifest.shards("val")[1]
    server.faults["/" + second.file] = ["stall"]
    reading = opened_ahead(manifest, [ReadTask(s) for s in manifest.shards("val")])
    task, opening = next(reading)
    opening.result().close()
    started = time.time()
    reading.close()
    assert time.time() - started < 1.0


def test_open_shards_with_a_cache_fetches_each_shard_once_over_two_epochs(server, real_build, tmp_path):
    from audioshard import open_shards

    fetcher = Fetcher(cache_dir=str(tmp_path / "cache"))
    loader = open_shards(server.url, "train", batch_size=16, num_workers=2, fetcher=fetcher)
    shards = [f"/{s.file}" for s in load_manifest(real_build).shards("train")]
    epochs = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        epochs.append(sorted((int(s), float(t)) for b in loader for s, t in zip(b.source, b.start, strict=True)))
    assert epochs[0] == epochs[1] and len(epochs[0]) == load_manifest(real_build).samples("train")
    assert {path: server.hits[path] for path in shards} == dict.fromkeys(shards, 1)  # epoch 2 read the cache
    without = open_shards(server.url, "train", batch_size=16)  # no cache: every epoch downloads again
    sum(len(b.y) for b in without)
    assert {path: server.hits[path] for path in shards} == dict.fromkeys(shards, 2)
