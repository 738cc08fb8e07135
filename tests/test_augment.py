import pytest
import torch

from audioshard.augment import BatchTransform, SpecAugment
from audioshard.manifest import load_manifest
from audioshard.stream import Batch, ShardStream, open_shards


def ones_batch(n=8, mels=64, frames=63) -> Batch:
    return Batch(torch.ones(n, 1, mels, frames, dtype=torch.float16), torch.zeros(n, dtype=torch.long),
                 torch.arange(n), torch.zeros(n))


def test_masks_fall_inside_and_respect_widths():
    augment = SpecAugment(noise_std=0.0, time_masks=2, time_mask_width=10, freq_masks=1, freq_mask_width=6)
    generator = torch.Generator().manual_seed(0)
    x = augment(torch.ones(256, 1, 64, 63), generator)
    assert x.shape == (256, 1, 64, 63)
    zero = x[:, 0] == 0
    time_cols = zero.all(dim=1)  # (B, frames): fully masked columns
    freq_rows = zero.all(dim=2)  # (B, mels): fully masked rows
    assert (time_cols.sum(1) <= 2 * 10).all() and (freq_rows.sum(1) <= 6).all()
    assert time_cols.any() and freq_rows.any()
    # everything that is zero is explained by a masked row or column, nothing else is touched
    explained = time_cols[:, None, :] | freq_rows[:, :, None]
    assert torch.equal(zero, explained)
    assert (x[~zero.unsqueeze(1)] == 1).all()


def test_per_sample_draws_differ_and_are_reproducible():
    transform = BatchTransform(0.0, 1.0, SpecAugment(noise_std=0.1))
    transform.reseed(seed=3, epoch=0)
    a = transform(ones_batch()).x
    assert not torch.equal(a[0], a[1])  # same input, different draws per sample
    transform.reseed(seed=3, epoch=0)
    assert torch.equal(transform(ones_batch()).x, a)
    transform.reseed(seed=3, epoch=1)
    assert not torch.equal(transform(ones_batch()).x, a)  # new epoch, new draws


def test_noise_is_relative_to_normalised_scale():
    transform = BatchTransform(-30.0, 20.0, SpecAugment(noise_std=0.5, time_masks=0, freq_masks=0))
    batch = ones_batch(64)._replace(x=torch.full((64, 1, 64, 63), -30.0, dtype=torch.float16))
    x = transform(batch).x
    assert abs(float(x.mean())) < 0.01 and 0.48 < float(x.std()) < 0.52


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="augment.time_masks"):
        SpecAugment(time_masks=-1)


def test_augmentation_changes_train_batches_and_never_val(real_build):
    manifest = load_manifest(real_build)
    plain = BatchTransform(manifest.mean, manifest.std)
    raw_train = next(iter(ShardStream(manifest, "train", 32, shuffle=True, seed=0)))
    augmented = next(iter(open_shards(str(real_build), "train", batch_size=32, seed=0)))
    assert torch.equal(raw_train.y, augmented.y)
    assert not torch.allclose(plain(raw_train).x, augmented.x)
    raw_val = list(ShardStream(manifest, "val", 32))
    val = list(open_shards(str(real_build), "val", batch_size=32))
    for r, v in zip(raw_val, val, strict=True):
        assert torch.equal(plain(r).x, v.x)
