"""shardfile.py: one shard read safely, its tar members and the .npy arrays in them checked before use."""

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from audioshard.manifest import load_manifest, sha256_file
from audioshard.shardfile import ShardDataError, decode_npy, member_limits, plain_spans, tar_members
from audioshard.stream import ShardStream


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
