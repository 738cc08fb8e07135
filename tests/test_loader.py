"""loader.py: open_shards, the sized loader, the shared-memory hand-over from workers, how workers start and stop."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import children, copy_build

from audioshard import loader as loader_module
from audioshard.loader import make_loader, open_shards
from audioshard.manifest import load_manifest
from audioshard.stream import ShardStream


def chunk_ids(batches) -> list[tuple[int, float]]:
    return [(int(s), float(t)) for b in batches for s, t in zip(b.source, b.start, strict=True)]


def all_ids(manifest, split):
    return sorted(chunk_ids(ShardStream(manifest, split, 10_000)))


def test_open_shards_gives_normalised_float_batches(real_build):
    loader = open_shards(str(real_build), "val", batch_size=32)
    batches = list(loader)
    x = torch.cat([b.x for b in batches])
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 64, 63)
    assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 1.5
    assert len(batches) == len(loader)


def _epoch(loader) -> list:
    return [tuple(t.clone() for t in batch) for batch in loader]


def _count_packs(monkeypatch) -> tuple[list, list]:
    """(packs taken from a slot, all packs) as the main process unpacks them."""
    taken, unpacked = [], []
    take, unpack = loader_module.HandOver.take, loader_module._unpack

    def counted_take(self, item, pin=False):
        taken.append(item.slot)
        return take(self, item, pin)

    def counted_unpack(packed):
        unpacked.append(len(packed.sizes))
        return unpack(packed)

    monkeypatch.setattr(loader_module.HandOver, "take", counted_take)
    monkeypatch.setattr(loader_module, "_unpack", counted_unpack)
    return taken, unpacked


@pytest.mark.parametrize(("augment", "spare"), [(False, 2), (True, 2), (True, -1)])
def test_hand_over_slots_give_what_the_dataloader_transport_gives(real_build, monkeypatch, augment, spare):
    """Loader workers hand their batches over through reused shared-memory slots (loader.HandOver), and the
    caller's batches are views of a slot. Every batch of an epoch is kept here while later ones arrive: none
    may change (a slot reused while its batches live would change them), the packs that find every slot
    held must travel another way, and the epoch must equal the one sent by the DataLoader's own transport."""
    monkeypatch.setattr(loader_module, "SPARE_SLOTS", spare)  # -1: one slot per worker, always in demand
    taken, unpacked = _count_packs(monkeypatch)

    def epoch(slots: bool) -> tuple[list, list]:
        monkeypatch.setattr(loader_module, "HAND_OVER_BYTES", 256 << 20 if slots else 0)
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
    monkeypatch.setattr(loader_module, "HAND_OVER_BYTES", 0)  # the DataLoader's transport
    assert sums == [float(batch.x.double().sum()) for batch in loader]


def test_leaving_an_epoch_early_holding_batches_stops_the_workers_at_once(real_build, monkeypatch):
    """A caller that stops iterating while it holds the batches of every slot: the workers must not wait
    for a slot (nothing would ever free it) but finish and exit with the DataLoader, and the batches held
    stay as they were."""
    monkeypatch.setattr(loader_module, "SPARE_SLOTS", -1)  # one slot per worker: the second pack finds it held
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
        "from audioshard import loader as loading, stream\n"
        "from audioshard.manifest import load_manifest\n"
        "loading.SPARE_SLOTS = -1\n"
        "loader = loading.make_loader(stream.ShardStream(load_manifest(sys.argv[1]), 'train', 2, shuffle=True),"
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
