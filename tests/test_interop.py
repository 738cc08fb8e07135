"""Other tools reading a real build chunk by chunk: plain webdataset and Hugging Face datasets."""

import numpy as np
import pytest
import webdataset as wds

import audioshard
from audioshard.interop import unblock_batch
from audioshard.manifest import load_manifest
from audioshard.shardfile import ShardDataError
from audioshard.stream import ShardStream


def stream_chunks(build, split):
    """What audioshard's own loader yields for the split (stored dB: normalising is the transform's job),
    keyed by (source, start)."""
    manifest = load_manifest(str(build))
    out = {}
    for batch in ShardStream(manifest, split, batch_size=16, shuffle=False):
        for x, y, source, start in zip(batch.x, batch.y, batch.source, batch.start, strict=True):
            out[(int(source), round(float(start), 3))] = (x[0].numpy(), int(y))
    return out


def check_same(chunks, want):
    got = {(c["source"], round(c["start"], 3)): c for c in chunks}
    assert len(got) == len(chunks) == len(want)  # every chunk exactly once
    for key, (mel, label) in want.items():
        assert got[key]["label"] == label
        np.testing.assert_array_equal(np.asarray(got[key]["mel"], np.float32), mel.astype(np.float32))


@pytest.mark.parametrize("split", ["train", "test"])
def test_webdataset_compose_unblock_yields_every_chunk_once(real_build, split):
    urls = sorted(str(p) for p in real_build.glob(f"{split}-*.tar"))
    chunks = list(wds.WebDataset(urls, shardshuffle=False).compose(audioshard.unblock))
    assert chunks and chunks[0]["mel"].shape == load_manifest(str(real_build)).features.shape
    assert chunks[0]["mel"].dtype == np.float16 and isinstance(chunks[0]["label"], int)
    check_same(chunks, stream_chunks(real_build, split))


def test_hugging_face_datasets_map_unblock_batch_yields_every_chunk_once(real_build, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    files = sorted(str(p) for p in real_build.glob("train-*.tar"))
    blocks = load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    columns = list(next(iter(blocks)))
    chunks = list(blocks.map(unblock_batch, batched=True, remove_columns=columns))
    check_same(chunks, stream_chunks(real_build, "train"))


def test_unblock_refuses_what_is_not_a_sound_block():
    with pytest.raises(ShardDataError, match="missing"):
        list(audioshard.unblock([{"__key__": "k", "mel.npy": b"x"}]))
    forged = np.lib.format.header_data_from_array_1_0(np.zeros((2, 3, 4), np.float16))
    forged["shape"] = (10**9, 64, 63)  # a forged size: refused before anything is allocated
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, forged)
    members = {"mel.npy": buffer.getvalue(), "label.npy": b"", "source.npy": b"", "start.npy": b""}
    with pytest.raises(ShardDataError, match="shape"):
        list(audioshard.unblock([{"__key__": "k", **members}]))
