"""Class-balanced sampling of the train split (`balanced=True`, `train.balanced`): on a real 10:1 split every
class comes about equally often, the batch count and sizes stay those of the plain stream, a cut epoch resumes
exactly, and with it off the batches are exactly the plain shuffle buffer's."""

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, link_tree

from audioshard.build import build_shards
from audioshard.config import ConfigError, load_config
from audioshard.distributed import Dist
from audioshard.loader import make_loader, open_shards
from audioshard.manifest import load_manifest
from audioshard.stream import ShardStream, read_blocks, reader_tasks, shard_order

# 130 speech and 12 car recordings; 0.25-s hops give ~10 chunks each, so ~1,200 train chunks at ~9:1.
IMBALANCED = {"speech": 130, "car": 12}
BUILD = ["shards.block_size=8", "shards.chunks_per_shard=64", "split.val_fraction=0.1", "split.test_fraction=0.1",
         "audio.hop_seconds=0.25"]
# 512 chunks held (~40 recordings): a recording's chunks arrive together, so a buffer of a few recordings
# would often hold no car at all, and a class absent from the buffer cannot be drawn.
BLOCKS = 64


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    root = tmp_path_factory.mktemp("imbalanced")
    raw = link_tree(root / "raw", IMBALANCED)
    build_shards(raw, root / "shards", load_config(overrides=BUILD), workers=1, progress=False)
    return root / "shards"


def labels_of(batches) -> np.ndarray:
    return np.concatenate([b.y.numpy() for b in batches])


def chunks_of(batches, label: int) -> list[tuple[int, float]]:
    return [(int(s), float(t)) for b in batches for y, s, t in zip(b.y, b.source, b.start, strict=True)
            if int(y) == label]


@pytest.mark.parametrize("workers", [0, 2])
def test_balancing_evens_out_a_10_to_1_split(imbalanced, workers):
    manifest = load_manifest(imbalanced)
    counts = np.array([manifest.split("train").class_counts[c] for c in manifest.classes])
    rare = int(counts.argmin())
    assert counts.max() >= 8 * counts.min()  # the split really is about 10:1
    for epoch in (0, 1):
        shares = {}
        for balanced in (False, True):
            loader = make_loader(ShardStream(manifest, "train", 16, shuffle=True, shuffle_blocks=BLOCKS, seed=epoch,
                                             balanced=balanced), num_workers=workers)
            loader.set_epoch(epoch)
            batches = list(loader)
            seen = np.bincount(labels_of(batches), minlength=len(counts))
            assert seen.sum() == counts.sum()  # as many training examples either way
            shares[balanced] = seen / seen.sum()
            if not balanced:
                assert seen.tolist() == counts.tolist()  # every chunk once: the split's own 10:1
            else:
                rare_seen = chunks_of(batches, rare)
                assert len(set(rare_seen)) >= 0.9 * counts[rare]  # nearly every rare chunk, most of them repeatedly
                assert len(rare_seen) >= 4 * len(set(rare_seen))
                assert len(set(chunks_of(batches, 1 - rare))) < counts[1 - rare]  # the common class thinned
        assert shares[False][rare] < 0.12
        assert np.abs(shares[True] - 0.5).max() <= 0.05, f"epoch {epoch}: {shares[True]}"


def test_balancing_keeps_batch_counts_and_sizes(imbalanced):
    """Balancing changes which chunks fill a batch, never how many batches or rows: the counts that progress
    bars, DDP's equal steps and resuming rely on stay those the manifest predicts (2 ranks x 2 workers here)."""
    manifest = load_manifest(imbalanced)
    for rank in range(2):
        sizes = {}
        for balanced in (False, True):
            loader = make_loader(ShardStream(manifest, "train", 12, shuffle=True, shuffle_blocks=8, seed=2, rank=rank,
                                             world_size=2, balanced=balanced), num_workers=2)
            loader.set_epoch(3)
            sizes[balanced] = (len(loader), [len(b.y) for b in loader])
            assert len(sizes[balanced][1]) == sizes[balanced][0]
        assert sizes[True] == sizes[False]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_balanced_epoch_cut_anywhere_resumes_exactly(imbalanced, workers):
    """Augmentation on, as in training: the batches after a resume from the loader's state are tensor-equal
    to those of the uninterrupted epoch (the draws follow from seed, epoch, rank and worker alone)."""
    def loader():
        return open_shards(str(imbalanced), "train", batch_size=16, num_workers=workers, seed=7,
                           shuffle_blocks=BLOCKS, balanced=True)

    def tensors(batch):
        return batch.x.clone(), batch.y.clone(), batch.source.clone(), batch.start.clone()

    def same(a, b) -> bool:
        return len(a) == len(b) and all(torch.equal(u, v) for p, q in zip(a, b, strict=True)
                                        for u, v in zip(p, q, strict=True))

    whole = loader()
    whole.set_epoch(1)
    reference = [tensors(b) for b in whole]
    assert len(reference) == len(whole) >= 40
    for cut in (1, 6, len(reference) // 2, len(reference) - 1):
        first = loader()
        first.set_epoch(1)
        seen = []
        for batch in first:
            seen.append(tensors(batch))
            if len(seen) == cut:
                break
        second = loader()
        second.load_state_dict(first.state_dict())
        assert len(second) == len(reference) - cut
        assert same(seen + [tensors(b) for b in second], reference), f"cut at {cut}"


def plain_shuffle_buffer(blocks, batch_size: int, capacity: int, rng: np.random.Generator):
    """The shuffle buffer as it was before balancing existed, written plainly: (y, source, start) per batch."""
    held = None
    for block in blocks:
        held = block if held is None else {k: np.concatenate([held[k], block[k]]) for k in held}
        count = len(held["y"])
        if count >= capacity:
            n_emit = (count - capacity // 2) // batch_size * batch_size
            if n_emit:
                order = rng.permutation(count)
                yield from _cut({k: v[order[:n_emit]] for k, v in held.items()}, batch_size)
                held = {k: v[order[n_emit:]] for k, v in held.items()}
    if held is not None and len(held["y"]):
        order = rng.permutation(len(held["y"]))
        yield from _cut({k: v[order] for k, v in held.items()}, batch_size)


def _cut(rows, batch_size: int):
    for i in range(0, len(rows["y"]), batch_size):
        yield tuple(rows[k][i:i + batch_size].astype(np.float64).tolist() for k in ("y", "source", "start"))


def test_off_is_exactly_the_plain_shuffle_buffer(imbalanced):
    """With balancing off, an epoch is what it was before: the same chunks in the same batches, from the same
    random draws (an independent, plain rewrite of the buffer as the reference); on, it is not."""
    manifest = load_manifest(imbalanced)
    seed, epoch, batch_size, blocks = 4, 2, 16, 6
    tasks = reader_tasks(shard_order(manifest.shards("train"), epoch, seed, True), 0, 1)

    def bad(exn):
        raise exn

    read = (block for task in tasks for block in read_blocks(manifest, "train", task, bad))
    expected = list(plain_shuffle_buffer(read, batch_size, blocks * manifest.block_size,
                                         np.random.default_rng([seed, epoch, 0, 0])))
    for balanced in (False, True):
        stream = ShardStream(manifest, "train", batch_size, shuffle=True, shuffle_blocks=blocks, seed=seed,
                             balanced=balanced)
        stream.set_epoch(epoch)
        got = [tuple(t.double().tolist() for t in (b.y, b.source, b.start)) for b in stream]
        assert (got == expected) is not balanced


def test_balanced_is_refused_where_every_chunk_must_be_seen_once(imbalanced):
    manifest = load_manifest(imbalanced)
    for split in ("val", "test"):
        with pytest.raises(ValueError, match="train split only"):
            ShardStream(manifest, split, 16, shuffle=True, balanced=True)
    with pytest.raises(ValueError, match="needs shuffle=True"):
        ShardStream(manifest, "train", 16, balanced=True)
    with pytest.raises(ValueError, match="train split only"):
        open_shards(manifest, "val", balanced=True)


def test_train_balanced_setting_reaches_the_train_stream(imbalanced):
    """`train.balanced` is a bool setting; with it the loss is not class-weighted (that would correct twice,
    whatever train.class_weights says), and the stream `audioshard train` builds from it yields balanced batches."""
    from audioshard.train import _setup

    with pytest.raises(ConfigError, match="train.balanced: expected bool"):
        load_config(overrides=["train.balanced=1"])
    assert load_config().train.balanced is False and load_config().train.class_weights is True
    cfg = load_config(overrides=[*TINY_TRAIN, "train.balanced=true", f"train.shuffle_blocks={BLOCKS}"])
    manifest = load_manifest(imbalanced)
    run = _setup(str(imbalanced), cfg, manifest, Dist(), resuming=False)
    assert run.train_data.balanced and run.weight is None
    shares = np.bincount(labels_of(run.train_loader)) / manifest.samples("train")
    assert np.abs(shares - 0.5).max() <= 0.05
