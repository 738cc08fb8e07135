"""Shard writing (audioshard.writer), on its own: blocks, shard sizes, checksums."""

import hashlib
import tarfile

import numpy as np
import webdataset as wds

from audioshard.writer import SplitWriter


def test_blocks_fill_shards_and_the_recorded_sha256_is_the_files(tmp_path):
    writer = SplitWriter(tmp_path, "train", block_size=4, chunks_per_shard=8)
    rng = np.random.default_rng(0)
    for source, n in enumerate([3, 5, 2, 7]):  # 17 chunks: blocks of 4, 4, 4, 4 and 1
        writer.add(rng.standard_normal((n, 2, 3)).astype(np.float16), source % 2, source,
                   np.arange(n, dtype=np.float32))
    shards = writer.close()
    assert [s["samples"] for s in shards] == [8, 8, 1] and [s["file"] for s in shards][0] == "train-000000.tar"
    for shard in shards:
        data = (tmp_path / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        with tarfile.open(tmp_path / shard["file"]) as tar:
            assert all(m.mtime == 0 for m in tar.getmembers())  # byte-identical on every run
    blocks = list(wds.WebDataset([str(tmp_path / s["file"]) for s in shards], shardshuffle=False).decode())
    assert [len(b["label.npy"]) for b in blocks] == [4, 4, 4, 4, 1]
    assert np.concatenate([b["source.npy"] for b in blocks]).tolist() == [0] * 3 + [1] * 5 + [2] * 2 + [3] * 7
