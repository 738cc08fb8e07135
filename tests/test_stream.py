"""stream.py: the dataset: every chunk read once across ranks and workers, shuffling, read-ahead."""

import itertools
import threading
import time

import pytest

from audioshard import stream as stream_module
from audioshard.loader import make_loader
from audioshard.manifest import ShardInfo, load_manifest
from audioshard.shardfile import ShardDataError
from audioshard.stream import ShardStream, reader_tasks


def chunk_ids(batches) -> list[tuple[int, float]]:
    return [(int(s), float(t)) for b in batches for s, t in zip(b.source, b.start, strict=True)]


def all_ids(manifest, split):
    return sorted(chunk_ids(ShardStream(manifest, split, 10_000)))


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_chunk_exactly_once_single_process(real_build, split):
    manifest = load_manifest(real_build)
    ids = all_ids(manifest, split)
    assert len(ids) == len(set(ids)) == manifest.samples(split)
    stream = ShardStream(manifest, split, batch_size=7, shuffle=True, shuffle_blocks=3, seed=5)
    for epoch in range(2):
        stream.set_epoch(epoch)
        batches = list(stream)
        assert sorted(chunk_ids(batches)) == ids
        assert len(batches) == stream.batches_per_epoch(num_workers=1)


def test_exactly_once_across_2_ranks_x_2_workers(real_build):
    """Ranks see disjoint parts, together all of it, and the batch count is known up front."""
    manifest = load_manifest(real_build)
    assert len(manifest.shards("train")) >= 2
    expected = all_ids(manifest, "train")
    for epoch in range(2):
        seen = []
        for rank in range(2):
            dataset = ShardStream(manifest, "train", batch_size=5, shuffle=True, shuffle_blocks=2, seed=1,
                                  rank=rank, world_size=2)
            loader = make_loader(dataset, num_workers=2)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader)
            seen.append(chunk_ids(batches))
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == expected


def test_fewer_shards_than_readers_still_partitions():
    shards = [ShardInfo("a.tar", 100, "", 0), ShardInfo("b.tar", 30, "", 0)]
    tasks = [reader_tasks(shards, r, 5) for r in range(5)]
    per_shard = {}
    for reader_tasks_ in tasks:
        assert len(reader_tasks_) == 1
        t = reader_tasks_[0]
        per_shard.setdefault(t.shard.file, []).append((t.offset, t.stride))
    assert sorted(per_shard["a.tar"]) == [(0, 3), (1, 3), (2, 3)] and sorted(per_shard["b.tar"]) == [(0, 2), (1, 2)]


def test_shuffle_mixes_and_changes_per_epoch(real_build):
    manifest = load_manifest(real_build)
    stream = ShardStream(manifest, "train", batch_size=16, shuffle=True, seed=0)
    first = chunk_ids(stream)
    stream.set_epoch(1)
    second = chunk_ids(stream)
    plain = chunk_ids(ShardStream(manifest, "train", batch_size=16))
    assert first != second and first != plain and sorted(first) == sorted(plain)
    again = ShardStream(manifest, "train", batch_size=16, shuffle=True, seed=0)
    assert chunk_ids(again) == first  # reproducible from the seed
    labels = next(iter(ShardStream(manifest, "train", batch_size=32, shuffle=True))).y
    assert len(set(labels.tolist())) > 1  # a shuffled batch mixes classes


def test_read_ahead_keeps_order_raises_and_stops_when_left():
    """Readers run in a thread a few batches ahead (stream.ahead): the same items in the same order, an error
    in the thread raised to the consumer, and a consumer that leaves early leaves no thread behind."""
    assert list(stream_module.ahead(iter(range(50)), 2)) == list(range(50))

    def failing():
        yield 1
        raise ShardDataError("shard x.tar key 3: broken")

    with pytest.raises(ShardDataError, match="broken"):
        list(stream_module.ahead(failing(), 2))

    def reader_threads():
        return [t for t in threading.enumerate() if t.name == "audioshard-read"]

    items = stream_module.ahead(itertools.count(), 2)
    assert next(items) == 0 and len(reader_threads()) == 1  # now waiting with a full queue
    items.close()
    deadline = time.monotonic() + 5.0
    while reader_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reader_threads() == []
