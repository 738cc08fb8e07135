import io
import itertools
import json
import os
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
import torch
from conftest import children, copy_build

from audioshard import stream as stream_module
from audioshard.manifest import ShardInfo, load_manifest, sha256_file
from audioshard.stream import (
    ShardDataError,
    ShardStream,
    decode_npy,
    make_loader,
    member_limits,
    open_shards,
    plain_spans,
    reader_tasks,
    tar_members,
)


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


def test_open_shards_gives_normalised_float_batches(real_build):
    loader = open_shards(str(real_build), "val", batch_size=32)
    batches = list(loader)
    x = torch.cat([b.x for b in batches])
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 64, 63)
    assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 1.5
    assert len(batches) == len(loader)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def forged_npy(shape: tuple[int, ...]) -> bytes:
    """A valid .npy header promising `shape` of float16, with no data behind it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f2", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_decode_npy_refuses_bad_headers_before_allocating():
    good = npy(np.zeros((4, 64, 63), np.float16))
    assert decode_npy(good, "float16", (64, 63), 64, "x").shape == (4, 64, 63)
    with pytest.raises(ShardDataError, match="dtype"):
        decode_npy(npy(np.array([{"a": 1}], dtype=object)), "float16", (64, 63), 64, "x")
    with pytest.raises(ShardDataError, match="shape"):
        decode_npy(npy(np.zeros((4, 32, 63), np.float16)), "float16", (64, 63), 64, "x")
    with pytest.raises(ShardDataError, match="data bytes"):  # header and payload disagree
        decode_npy(forged_npy((9, 64, 63)) + good[128:], "float16", (64, 63), 64, "x")
    with pytest.raises(ShardDataError, match="shape"):  # asks for ~30 GB: refused from the header alone
        decode_npy(forged_npy((4_000_000, 64, 63)), "float16", (64, 63), 64, "x")
    with pytest.raises(ShardDataError, match="not an .npy"):
        decode_npy(b"\x80\x04pickle", "float16", (64, 63), 64, "x")
    with pytest.raises(ShardDataError, match="dtype 'zz9'"):  # not a dtype at all
        decode_npy(good.replace(b"'<f2'", b"'zz9'"), "float16", (64, 63), 64, "x")
    with pytest.raises(ShardDataError, match="malformed"):  # not a literal: never evaluated
        decode_npy(good.replace(b"'<f2'", b"open("), "float16", (64, 63), 64, "x")


def test_hostile_members_are_never_unpickled(real_build, tmp_path):
    """A shard with pickle payloads next to real blocks: they are skipped unread, nothing executes."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    build = tmp_path / "build"
    shutil.copytree(real_build, build)
    manifest = load_manifest(build)
    shard = build / manifest.shards("val")[0].file
    evil = tmp_path / "evil.tar"
    with tarfile.open(shard) as src, tarfile.open(evil, "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        first_key = src.getmembers()[0].name.split(".")[0]
        for ext in ("pyd", "pickle", "pth", "mel.pyd"):
            data = pickle.dumps(Payload())
            info = tarfile.TarInfo(f"{first_key}.{ext}")
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    evil.replace(shard)
    data = json.loads((build / "manifest.json").read_text())  # a hostile build ships a matching manifest
    entry = data["splits"]["val"]["shards"][0]
    entry["bytes"], entry["sha256"] = shard.stat().st_size, sha256_file(shard)
    (build / "manifest.json").write_text(json.dumps(data))
    batches = list(ShardStream(load_manifest(build), "val", batch_size=1000))
    assert sum(len(b.y) for b in batches) > 0
    assert not Path(marker).exists()


def members(stream, limits):
    return [(m["fname"], bytes(m["data"])) if m else None for m in tar_members(stream, "shard", limits)]


def test_in_memory_reader_gives_what_tarfile_gives(real_build):
    """Shards held in memory are read by audioshard's own header parser; it must agree with tarfile."""
    manifest = load_manifest(real_build)
    limits = member_limits(manifest)
    for split in ("train", "val"):
        for shard in manifest.shards(split):
            data = (real_build / shard.file).read_bytes()
            assert plain_spans(data) is not None  # our own shards take the fast path
            with open(real_build / shard.file, "rb") as stream:  # a file: tarfile reads it
                assert members(io.BytesIO(data), limits) == members(stream, limits)


def tar_with(add) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add(tar)
    return buffer.getvalue()


def plain(tar, name, data=b"x" * 10):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def symlink(tar):
    info = tarfile.TarInfo("x.mel.npy")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


@pytest.mark.parametrize("make", [
    lambda tar: plain(tar, "a" * 150 + ".mel.npy"),  # a GNU long name: a header of its own
    symlink,
])
def test_in_memory_reader_leaves_anything_unusual_to_tarfile(make):
    assert plain_spans(tar_with(make)) is None


def test_in_memory_reader_refuses_bad_checksums_and_members_past_the_end():
    data = bytearray(tar_with(lambda tar: plain(tar, "0.mel.npy")))
    assert plain_spans(bytes(data)) == [("0.mel.npy", 512, 10)]
    assert plain_spans(bytes(data[:520])) is None  # the member's data runs past the end
    data[0] ^= 1  # the name changes, the checksum does not
    assert plain_spans(bytes(data)) is None


def _epoch(loader) -> list:
    return [tuple(t.clone() for t in batch) for batch in loader]


def _count_packs(monkeypatch) -> tuple[list, list]:
    """(packs taken from a slot, all packs) as the main process unpacks them."""
    taken, unpacked = [], []
    take, unpack = stream_module.HandOver.take, stream_module._unpack

    def counted_take(self, item, pin=False):
        taken.append(item.slot)
        return take(self, item, pin)

    def counted_unpack(packed):
        unpacked.append(len(packed.sizes))
        return unpack(packed)

    monkeypatch.setattr(stream_module.HandOver, "take", counted_take)
    monkeypatch.setattr(stream_module, "_unpack", counted_unpack)
    return taken, unpacked


@pytest.mark.parametrize(("augment", "spare"), [(False, 2), (True, 2), (True, -1)])
def test_hand_over_slots_give_what_the_dataloader_transport_gives(real_build, monkeypatch, augment, spare):
    """Loader workers hand their batches over through reused shared-memory slots (stream.HandOver), and the
    caller's batches are views of a slot. Every batch of an epoch is kept here while later ones arrive: none
    may change (a slot reused while its batches live would change them), the packs that find every slot
    held must travel another way, and the epoch must equal the one sent by the DataLoader's own transport."""
    monkeypatch.setattr(stream_module, "SPARE_SLOTS", spare)  # -1: one slot per worker, always in demand
    taken, unpacked = _count_packs(monkeypatch)

    def epoch(slots: bool) -> tuple[list, list]:
        monkeypatch.setattr(stream_module, "HAND_OVER_BYTES", 256 << 20 if slots else 0)
        loader = open_shards(str(real_build), "train", batch_size=2, num_workers=2, augment=augment,
                             shuffle_blocks=2)
        assert (loader._hand_overs() is not None) == slots
        kept = list(loader)  # held, not copied
        counts = len(taken), len(unpacked)
        return kept, _epoch(loader), counts

    kept, again, (in_slots, packs) = epoch(slots=True)
    slots = 2 * max(1, 2 + spare)
    assert in_slots == slots < packs  # each worker's slots are used once, then every later pack goes round
    plain, _, _ = epoch(slots=False)
    assert len(kept) == len(plain) == len(again) > 2 * 4 * 4  # more than 2 workers x 4 slots x 4 batches
    for held, other in [(kept, plain), (kept, again)]:
        for a, b in zip(held, other, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert kept[0].x.dtype == torch.float32  # normalised in the worker, augmented or not


def test_a_slot_is_free_again_when_the_caller_drops_its_batches(real_build, monkeypatch):
    """A caller that drops each batch before taking the next (a training loop) gets every pack through a
    slot: the slot is freed when the last batch viewing it goes, never later and never before."""
    taken, unpacked = _count_packs(monkeypatch)
    loader = open_shards(str(real_build), "train", batch_size=2, num_workers=2, augment=True, shuffle_blocks=2)
    sums = [float(batch.x.double().sum()) for batch in loader]
    assert len(taken) == len(unpacked) > 2 * 4  # more packs than slots
    monkeypatch.setattr(stream_module, "HAND_OVER_BYTES", 0)  # the DataLoader's transport
    assert sums == [float(batch.x.double().sum()) for batch in loader]


def test_leaving_an_epoch_early_holding_batches_stops_the_workers_at_once(real_build, monkeypatch):
    """A caller that stops iterating while it holds the batches of every slot: the workers must not wait
    for a slot (nothing would ever free it) but finish and exit with the DataLoader, and the batches held
    stay as they were."""
    monkeypatch.setattr(stream_module, "SPARE_SLOTS", -1)  # one slot per worker: the second pack finds it held
    loader = make_loader(ShardStream(load_manifest(real_build), "train", 2, shuffle=True), num_workers=2)
    for _ in range(2):
        batches = iter(loader)
        held = [next(batches) for _ in range(6)]
        values = [batch.x.clone() for batch in held]
        time.sleep(1.0)  # both workers have made every pack they may make ahead
        started = time.monotonic()
        batches.close()  # leave the epoch: the workers must finish their pack and exit
        assert children(os.getpid()) == []
        assert time.monotonic() - started < 4.0  # not the DataLoader's 5-s join timeout then a kill
        assert all(torch.equal(batch.x, value) for batch, value in zip(held, values, strict=True))


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


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_workers_holding_slots_exit_when_the_main_process_is_killed(real_build):
    """Workers whose every slot the main process holds must still exit when it is killed (SIGKILL, a torchrun
    teardown), not stay forever."""
    script = (
        "import sys, time\n"
        "from audioshard import stream\n"
        "from audioshard.manifest import load_manifest\n"
        "stream.SPARE_SLOTS = -1\n"
        "loader = stream.make_loader(stream.ShardStream(load_manifest(sys.argv[1]), 'train', 2, shuffle=True),"
        " num_workers=2)\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n")
    main = subprocess.Popen([sys.executable, "-c", script, str(real_build)], stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        assert main.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # the workers fill their one slot each and make what they may ahead
        workers = children(main.pid)
        assert len(workers) == 2
        main.kill()
        main.wait()
        deadline = time.monotonic() + 10.0
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_running, workers))
    finally:
        main.kill()
        for pid in filter(_running, workers):
            os.kill(pid, signal.SIGKILL)


def test_a_rank_starts_its_loader_workers_from_the_forkserver(real_build, tmp_path):
    """In a process group the backend's threads can hold Python's runtime lock at the instant of a fork, and
    the forked worker then waits forever (CPython gh-112275): a rank's loader workers must not be forked
    from it. They start from the forkserver (children of the server, not of this process), read the same
    batches, and a skipped shard is still counted across them (the shared counter follows their context)."""
    build = copy_build(real_build, tmp_path)
    shard = build / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # truncated: skipped and counted, by whichever worker reads it
    manifest = load_manifest(build)
    want = chunk_ids(make_loader(ShardStream(manifest, "train", 4, rank=0, world_size=1), num_workers=2))
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        dataset = ShardStream(manifest, "train", 4)
        loader = make_loader(dataset, num_workers=2)
        got, forked, served = [], set(), set()
        for batch in loader:
            got.append(batch)
            mine = children(os.getpid())
            forked |= {pid for pid in mine if _cmdline(pid) == _cmdline(os.getpid())}  # a fork runs our command
            served |= {w for pid in mine if b"forkserver" in _cmdline(pid) for w in children(pid)}
            torch.distributed.all_reduce(torch.ones(1), async_op=True).wait()  # the backend's threads at work
    finally:
        torch.distributed.destroy_process_group()
    assert chunk_ids(got) == want and len(want) < manifest.samples("train")
    assert dataset.skipped_blocks == 1
    assert len(served) == 2 and not forked  # both workers are the server's children, none is this process's


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
