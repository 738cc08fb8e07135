"""Write shards: one split's chunks packed into blocks, blocks into WebDataset tars, each tar hashed
as it is written (the manifest's sha256 without reading the file back).

Each tar member group ("block") holds up to `shards.block_size` chunks as one array per field
(`mel.npy` float16 (N, n_mels, frames), `label.npy` int16, `source.npy` int32 index into the
split's `sources`, `start.npy` float32 seconds): tar overhead is paid once per block instead of
once per chunk, and the files stay standard tars that webdataset reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

SHARD_PATTERN = "{split}-{index:06d}.tar"


class _HashingFile:
    """A binary file open for writing that hashes and counts what passes through: a shard's sha256
    without reading the finished file back (that re-read was part of every build's serial tail)."""

    def __init__(self, path: Path):
        # 1 MB buffer: tarfile hands over 10 KB records, one write() system call each with the default one
        self._file = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed by SplitWriter._close_shard / abort
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._file.write(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        self._file.close()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class SplitWriter:
    """Packs one split's chunks into blocks and blocks into tar shards of `chunks_per_shard` chunks."""

    def __init__(self, out_dir: Path, split: str, block_size: int, chunks_per_shard: int):
        self.out_dir, self.split, self.block_size = out_dir, split, block_size
        self.blocks_per_shard = max(1, chunks_per_shard // block_size)
        self.pending: list[tuple[np.ndarray, ...]] = []
        self.pending_count = 0
        self.blocks_written = 0
        self.writer: wds.TarWriter | None = None
        self.file: _HashingFile | None = None
        self.shards: list[dict[str, Any]] = []

    def add(self, mel: np.ndarray, label: int, source_index: int, starts: np.ndarray,
            hot: np.ndarray | None = None) -> None:
        """One recording's chunks; `hot`: its multi-hot classes row (multi-label builds only)."""
        n = len(mel)
        fields = (mel, np.full(n, label, np.int16), np.full(n, source_index, np.int32), starts)
        self.pending.append(fields if hot is None else (*fields, np.tile(hot, (n, 1))))
        self.pending_count += n
        while self.pending_count >= self.block_size:
            self._write_block(self.block_size)

    def _write_block(self, size: int) -> None:
        fields = [np.concatenate(parts) for parts in zip(*self.pending, strict=True)]
        block, rest = [f[:size] for f in fields], [f[size:] for f in fields]
        self.pending = [tuple(rest)] if len(rest[0]) else []
        self.pending_count = len(rest[0])
        if self.writer is None:
            name = SHARD_PATTERN.format(split=self.split, index=len(self.shards))
            # mtime fixed: the same input gives byte-identical shards (and checksums) on every run.
            self.file = _HashingFile(self.out_dir / name)
            self.writer = wds.TarWriter(self.file, mtime=0, user="audioshard", group="audioshard")
            self.shards.append({"file": name, "samples": 0})
        mel, label, source, start = block[:4]
        members = {"__key__": f"{self.split}-{self.blocks_written:08d}", "mel.npy": _npy_bytes(mel),
                   "label.npy": _npy_bytes(label), "source.npy": _npy_bytes(source), "start.npy": _npy_bytes(start)}
        if len(block) > 4:  # a multi-label build: the chunks' classes as multi-hot rows
            members["labels.npy"] = _npy_bytes(block[4])
        self.writer.write(members)
        self.shards[-1]["samples"] += len(mel)
        self.blocks_written += 1
        if self.blocks_written % self.blocks_per_shard == 0:
            self._close_shard()

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()  # writes the tar's end blocks into self.file, which it leaves open
            self.file.close()
            self.shards[-1].update(sha256=self.file.hexdigest(), bytes=self.file.size)
            self.writer = self.file = None

    def abort(self) -> None:
        """Close after a failure (e.g. disk full) without raising again; the files are discarded."""
        closers = [self.writer.tarstream.close] if self.writer is not None else []
        closers += [self.file.close] if self.file is not None else []
        for close in closers:
            with contextlib.suppress(Exception):  # the original error is being raised already
                close()
        self.writer = self.file = None

    def close(self) -> list[dict[str, Any]]:
        if self.pending_count:
            self._write_block(self.pending_count)
        self._close_shard()
        return self.shards
