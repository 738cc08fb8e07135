"""One shard file, read safely: its tar members and the arrays in them, checked against the manifest.

Knows nothing of datasets, ranks or loaders (as webdataset's `tariterators.py`): `stream.py` hands it
the bytes of one shard and gets back checked blocks of arrays.

    tar bytes -> tar_members (plain files only, each bounded before it is read)
              -> webdataset's group_by_keys -> decode_block (np arrays only, header checked against
                 the manifest before allocating, never pickle)

A shard may come from a stranger: nothing in it decides an allocation unchecked, and nothing is unpickled.
"""

from __future__ import annotations

import ast
import io
import math
import tarfile
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np

from audioshard.errors import AudioshardError
from audioshard.manifest import Manifest


class ShardDataError(AudioshardError, ValueError):
    """A block in a shard is malformed (bad array, wrong shape or dtype, NaN); names shard and key."""


# --- the tar members ---------------------------------------------------------------------------

NPY_HEADER_SLACK = 1 << 16  # magic + header dict of one .npy member (np.save writes 128 bytes)
MAX_META_BYTES = 1 << 16  # a long-name or pax header (audioshard's own shards have none)
META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
              tarfile.SOLARIS_XHDTYPE)


class UnsafeMemberError(tarfile.TarError):
    """A tar member no audioshard shard holds (sparse, a link, outsized): refused before it is read.
    Not a tarfile.HeaderError on purpose: tarfile takes those, past the first member, for the archive's end."""


class _PlainTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile reads them, the headers whose data it would read whole or inflate: a
    sparse member reads back its holes as zeros (a 10 KB tar can claim GBs), and long-name/pax headers
    are read into memory at their declared size."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeMemberError(f"member {self.name!r} is a sparse file; shards hold plain files only")
        if self.type in META_TYPES and self.size > MAX_META_BYTES:
            raise UnsafeMemberError(f"a {self.size}-byte long-name/pax header; at most {MAX_META_BYTES} are read")
        return super()._proc_member(tar)


COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _refuse_compressed(stream) -> None:
    """Name a compressed shard for what it is (tarfile alone would say "bad checksum")."""
    head = stream.read(6)
    stream.seek(0)
    for magic, name in COMPRESSED.items():
        if head.startswith(magic):
            raise UnsafeMemberError(f"{name}-compressed; audioshard reads plain tar shards only (it never "
                                    "inflates one: a small compressed shard can expand without bound)")


def member_limits(manifest: Manifest) -> dict[str, int]:
    """The most bytes each block member of this build can hold (a full block plus header room)."""
    rows, features = manifest.block_size, manifest.features
    mel = rows * math.prod(features.shape) * np.dtype(features.dtype).itemsize
    sizes = {"mel.npy": mel, "label.npy": 2 * rows, "source.npy": 4 * rows, "start.npy": 4 * rows}
    if manifest.multilabel:
        sizes["labels.npy"] = rows * len(manifest.classes)
    return {name: size + NPY_HEADER_SLACK for name, size in sizes.items()}


def tar_members(stream, location: str, limits: dict[str, int]) -> Iterator[dict[str, Any]]:
    """The block members of a shard, each checked before it is read, as webdataset's sample parts
    ({"fname", "data", "__url__"}), then {} at the end (what `group_by_keys` expects).

    Plain tars only: mode "r|" never decompresses, where webdataset's "r|*" would inflate a small
    gzip/bz2/xz shard to any size. Memory per member is bounded by `limits`, from the manifest.
    A shard held in memory whose headers are all plain files (what `audioshard build` writes) is read
    by `plain_members`, in place; anything else by tarfile.
    """
    _refuse_compressed(stream)
    if isinstance(stream, io.BytesIO):
        data = stream.getvalue()  # the bytes it was made from, not a copy
        spans = plain_spans(data)
        if spans is not None:
            yield from plain_members(data, spans, location, limits)
            return
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=_PlainTarInfo) as tar:
        for member in tar:
            tar.members = []  # a stream has no index to keep: drop each header once seen
            suffix = member.name.rsplit("/", 1)[-1].split(".", 1)[-1]
            if suffix not in limits:
                continue  # skipped by reading past it in small pieces, never as a whole
            if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.sparse is not None:
                raise UnsafeMemberError(f"member {member.name!r} is not a plain file (type {member.type!r})")
            if member.size > limits[suffix]:
                raise UnsafeMemberError(f"member {member.name!r} claims {member.size} bytes; a block of this "
                                        f"build holds at most {limits[suffix]}: forged or foreign shard")
            yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": location}
    yield {}


TAR_BLOCK = 512
_ZERO_HEADER = bytes(TAR_BLOCK)


def plain_spans(data: bytes) -> list[tuple[str, int, int]] | None:
    """(name, start, size) of every member of an in-memory tar when all of them are plain files with
    valid ustar headers, in bounds; None when anything else appears (long names, pax headers, links,
    sparse files, base-256 sizes, a bad checksum, data past the end), for tarfile to read or refuse.

    Python's tarfile costs ~30 us a member in pure-Python header parsing, about a third of all the
    work of streaming a shard; our own shards hold plain members only, and this reads them ~20x faster.
    """
    spans, offset, end = [], 0, len(data)
    while offset + TAR_BLOCK <= end:
        header = data[offset:offset + TAR_BLOCK]
        if header == _ZERO_HEADER:
            return spans
        if header[156:157] not in (b"0", b"\0") or header[124] & 0x80 or not _checksum_ok(header):
            return None
        try:
            size = int(header[124:136].rstrip(b"\0 ").strip() or b"0", 8)
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar: a name prefix
            return None
        start = offset + TAR_BLOCK
        if start + size > end:
            return None
        spans.append((name, start, size))
        offset = start + -(-size // TAR_BLOCK) * TAR_BLOCK
    return spans if offset >= end else None


def _checksum_ok(header: bytes) -> bool:
    """The ustar header checksum: the sum of its bytes with the checksum field read as spaces."""
    try:
        stored = int(header[148:156].rstrip(b"\0 ").strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header) - sum(header[148:156]) + 8 * 32


def plain_members(data: bytes, spans: list[tuple[str, int, int]], location: str,
                  limits: dict[str, int]) -> Iterator[dict[str, Any]]:
    """`tar_members` for a tar checked by `plain_spans`: its members as views into `data`, no copies."""
    view = memoryview(data)
    for name, start, size in spans:
        suffix = name.rsplit("/", 1)[-1].split(".", 1)[-1]
        if suffix not in limits:
            continue
        if size > limits[suffix]:
            raise UnsafeMemberError(f"member {name!r} claims {size} bytes; a block of this build holds at most "
                                    f"{limits[suffix]}: forged or foreign shard")
        yield {"fname": name, "data": view[start:start + size], "__url__": location}
    yield {}


# --- safe decoding -----------------------------------------------------------------------------

NPY_MAGIC = b"\x93NUMPY"


def decode_npy(data: bytes, dtype: str, shape_tail: tuple[int, ...], max_rows: int, where: str) -> np.ndarray:
    """Parse an .npy member without pickle, checking its header before touching the data.

    The header is read with `ast.literal_eval` (never `np.load`), dtype and shape are checked
    against what the manifest promises, and only then is the payload viewed with `np.frombuffer`;
    a forged header cannot make us allocate anything.
    """
    descr, fortran, shape, payload_start = npy_header(data, where)
    try:
        expected_dtype = isinstance(descr, str) and np.dtype(descr) == np.dtype(dtype) and fortran is False
    except TypeError:  # not a dtype numpy knows
        expected_dtype = False
    if not expected_dtype:
        raise ShardDataError(f"{where}: dtype {descr!r} (fortran={fortran}), expected {np.dtype(dtype).str}")
    if not all(type(dim) is int for dim in shape):  # 63.0 or True would pass the comparison below
        raise ShardDataError(f"{where}: shape {shape} has non-integer dimensions")
    if len(shape) != 1 + len(shape_tail) or tuple(shape[1:]) != shape_tail or not 0 < shape[0] <= max_rows:
        raise ShardDataError(f"{where}: shape {shape}, expected (1..{max_rows}, {', '.join(map(str, shape_tail))})")
    payload = memoryview(data)[payload_start:]
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(payload) != expected:
        raise ShardDataError(f"{where}: {len(payload)} data bytes, header promises {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def npy_header(data: bytes, where: str) -> tuple[Any, Any, tuple, int]:
    """(descr, fortran_order, shape, payload offset) of .npy bytes, parsed as a literal, never evaluated."""
    if bytes(data[:len(NPY_MAGIC)]) != NPY_MAGIC or len(data) < 10:  # data: bytes or a memoryview
        raise ShardDataError(f"{where}: not an .npy array")
    major = data[6]
    if major == 1:
        header_len, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        header_len, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise ShardDataError(f"{where}: unsupported .npy version {major}")
    try:
        return (*_npy_header(bytes(data[start:start + header_len])), start + header_len)
    except (ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError, MemoryError, RecursionError) as exn:
        raise ShardDataError(f"{where}: malformed .npy header") from exn


@lru_cache(maxsize=256)
def _npy_header(text: bytes) -> tuple[Any, Any, tuple]:
    """(descr, fortran_order, shape) of an .npy header dict, parsed as a literal (never evaluated).
    Cached: every full block of a build has the same header, and parsing is a third of decode time."""
    header = ast.literal_eval(text.decode("latin1"))
    return header["descr"], header["fortran_order"], tuple(header["shape"])


def finite_float16(values: np.ndarray) -> bool:
    """np.isfinite for float16, cheaper: NaN and inf are exactly the values with all exponent bits set."""
    if values.dtype != np.float16:
        return bool(np.isfinite(values).all())
    return not np.any((values.view(np.uint16) & 0x7C00) == 0x7C00)


def decode_block(sample: dict[str, Any], manifest: Manifest, sources: int | None = None) -> dict[str, np.ndarray]:
    """Turn one block's raw tar members into checked arrays; raises ShardDataError naming shard and key.
    `sources`: how many recordings the block's `source` indices may point at (unchecked if None)."""
    where = f"{sample.get('__url__')} key {sample.get('__key__')}"
    missing = [m for m in manifest.block_members if m not in sample]
    if missing:
        raise ShardDataError(f"{where}: missing members {missing}")
    n = manifest.block_size
    mel = decode_npy(sample["mel.npy"], manifest.features.dtype, manifest.features.shape, n, f"{where} mel.npy")
    rows = len(mel)
    label = decode_npy(sample["label.npy"], "<i2", (), rows, f"{where} label.npy")
    source = decode_npy(sample["source.npy"], "<i4", (), rows, f"{where} source.npy")
    start = decode_npy(sample["start.npy"], "<f4", (), rows, f"{where} start.npy")
    if not len(label) == len(source) == len(start) == rows:
        raise ShardDataError(f"{where}: members disagree on the number of chunks")
    if label.min() < 0 or label.max() >= len(manifest.classes):
        raise ShardDataError(f"{where}: label out of range 0..{len(manifest.classes) - 1}")
    if not finite_float16(mel):
        raise ShardDataError(f"{where}: NaN or infinite values in mel.npy")
    # Out-of-range sources would silently merge or misattribute recordings in the recording-level results.
    if source.min() < 0 or (sources is not None and source.max() >= sources):
        raise ShardDataError(f"{where}: source index out of range 0..{(sources or 2**31) - 1}")
    if not np.isfinite(start).all() or start.min() < 0:
        raise ShardDataError(f"{where}: start times must be finite seconds >= 0")
    if manifest.multilabel:  # the chunks' classes, as multi-hot rows: these are the targets
        label = _multi_hot(sample["labels.npy"], rows, len(manifest.classes), where)
    return {"x": mel, "y": label, "source": source, "start": start}


def _multi_hot(data: bytes, rows: int, classes: int, where: str) -> np.ndarray:
    hot = decode_npy(data, "|u1", (classes,), rows, f"{where} labels.npy")
    if len(hot) != rows or hot.max() > 1:
        raise ShardDataError(f"{where}: labels.npy must hold one row of 0/1 per chunk")
    return hot
