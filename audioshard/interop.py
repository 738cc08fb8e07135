"""Other tools reading audioshard's shards chunk by chunk.

A shard is a standard tar: plain webdataset and Hugging Face `datasets` read it as is, but each of
their samples is a *block* of up to `shards.block_size` chunks. `unblock` turns blocks into one sample
per chunk:

    import webdataset as wds, audioshard
    for chunk in wds.WebDataset(urls, shardshuffle=False).compose(audioshard.unblock):
        chunk["mel"]      # (n_mels, frames) float16 log-mel dB (normalise with the manifest's mean/std)
        chunk["label"]    # class index into the manifest's `classes`
        chunk["source"]   # recording index into the split's recordings ({split}-recordings.jsonl)
        chunk["start"]    # seconds into that recording
        chunk["labels"]   # multi-label builds only: (classes,) uint8, 1 for every class the chunk carries
                          # ("label" is then its first class)

The members are parsed as `ShardStream` parses them: headers checked before any data is touched,
never unpickled, sizes bounded, NaN and out-of-range values refused (`ShardDataError`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from audioshard.manifest import BLOCK_MEMBERS, MAX_BLOCK_SIZE, MAX_CLASSES
from audioshard.params import MAX_FRAMES, MAX_MELS
from audioshard.shardfile import ShardDataError, decode_npy, finite_float16, npy_header


def unblock(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A webdataset stage (`.compose(unblock)`): every block sample in, one sample per chunk out, in order.

    Each block's members may be raw bytes (straight from the tar) or arrays (after `.decode()`). A
    chunk's sample keeps the block's `__url__` and gets the key `BLOCKKEY/INDEX`.
    """
    for sample in samples:
        where = f"{sample.get('__url__')} key {sample.get('__key__')}"
        mel, label, source, start = _block_arrays(sample, where)
        hot = _multi_hot(sample["labels.npy"], len(mel), where) if "labels.npy" in sample else None
        for i in range(len(mel)):
            chunk = {"__key__": f"{sample.get('__key__')}/{i:04d}", "__url__": sample.get("__url__"),
                     "mel": mel[i], "label": int(label[i]), "source": int(source[i]), "start": float(start[i])}
            if hot is not None:
                chunk["labels"] = hot[i]
            yield chunk


def unblock_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Hugging Face `datasets`: blocks to chunks in `IterableDataset.map(unblock_batch, batched=True,
    remove_columns=...)`, where a batch is a dict of columns (webdataset's member names)."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    chunks = list(unblock(rows))
    keys = ("mel", "label", "source", "start") + (("labels",) if "labels.npy" in batch else ())
    return {key: [c[key] for c in chunks] for key in keys}


def _block_arrays(sample: dict[str, Any], where: str) -> tuple[np.ndarray, ...]:
    missing = [m for m in BLOCK_MEMBERS if m not in sample]
    if missing:
        raise ShardDataError(f"{where}: not an audioshard block (missing {missing})")
    mel = _member(sample["mel.npy"], "<f2", None, where + " mel.npy")
    rows = len(mel)
    label, source, start = (_member(sample[name], dtype, rows, f"{where} {name}")
                            for name, dtype in (("label.npy", "<i2"), ("source.npy", "<i4"), ("start.npy", "<f4")))
    if not len(label) == len(source) == len(start) == rows:
        raise ShardDataError(f"{where}: members disagree on the number of chunks")
    if not finite_float16(mel) or not np.isfinite(start).all():
        raise ShardDataError(f"{where}: NaN or infinite values")
    if label.min() < 0 or source.min() < 0 or start.min() < 0:
        raise ShardDataError(f"{where}: negative label, source or start")
    return mel, label, source, start


def _member(value: Any, dtype: str, rows: int | None, where: str) -> np.ndarray:
    """An array member: checked .npy bytes, or an array another tool decoded already."""
    if isinstance(value, np.ndarray | list):  # e.g. Hugging Face datasets gives nested lists
        try:
            array = np.asarray(value)
        except ValueError as exn:  # ragged
            raise ShardDataError(f"{where}: not a rectangular array") from exn
        if array.ndim != (1 if rows is not None else 3) or not np.can_cast(array.dtype, dtype, "same_kind"):
            raise ShardDataError(f"{where}: a {array.ndim}-d {array.dtype} array, expected {np.dtype(dtype)}")
        if array.dtype.kind in "iu" and np.dtype(dtype).kind == "i" and array.size:
            # a cast would wrap (70000 -> 4464 as int16): a wrong label or recording, silently
            low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
            if array.min() < low or array.max() > high:
                raise ShardDataError(f"{where}: values {array.min()}..{array.max()} do not fit {np.dtype(dtype)} "
                                     f"({low}..{high}); not an audioshard block")
        return array.astype(dtype, copy=False)
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ShardDataError(f"{where}: expected .npy bytes or an array, got {type(value).__name__}")
    tail = () if rows is not None else _mel_tail(bytes(value[:4096]), where)  # the header is at the start
    return decode_npy(bytes(value), dtype, tail, rows if rows is not None else MAX_BLOCK_SIZE, where)


def _multi_hot(value: Any, rows: int, where: str) -> np.ndarray:
    """A multi-label block's `labels.npy`: one row of 0/1 per chunk, as many columns as the build has classes
    (from the header: no manifest here to say how many, so bounded like any block member)."""
    where = f"{where} labels.npy"
    if isinstance(value, np.ndarray | list):
        hot = np.asarray(value)
        if hot.ndim != 2 or hot.dtype.kind not in "iub":
            raise ShardDataError(f"{where}: expected a (chunks, classes) array of 0/1")
    elif isinstance(value, bytes | bytearray | memoryview):
        shape = npy_header(bytes(value[:4096]), where)[2]
        if len(shape) != 2 or not all(type(d) is int for d in shape) or not 0 < shape[1] <= MAX_CLASSES:
            raise ShardDataError(f"{where}: expected a (chunks, classes) array, got shape {shape!r:.80}")
        hot = decode_npy(bytes(value), "|u1", (shape[1],), rows, where)
    else:
        raise ShardDataError(f"{where}: expected .npy bytes or an array, got {type(value).__name__}")
    if len(hot) != rows or (hot.size and (hot.min() < 0 or hot.max() > 1)):
        raise ShardDataError(f"{where}: must hold one row of 0/1 per chunk")
    return hot.astype(np.uint8, copy=False)


def _mel_tail(data: bytes, where: str) -> tuple[int, int]:
    """(n_mels, frames) from a mel member's header, within the bounds any manifest may ask for (no
    manifest here to say what to expect)."""
    shape = npy_header(data, where)[2]
    if len(shape) != 3 or not all(type(d) is int for d in shape):
        raise ShardDataError(f"{where}: expected a (chunks, n_mels, frames) array, got shape {shape!r:.80}")
    if not (0 < shape[1] <= MAX_MELS and 0 < shape[2] <= MAX_FRAMES):
        raise ShardDataError(f"{where}: {shape[1]} mels x {shape[2]} frames is beyond any audioshard build")
    return shape[1], shape[2]
