import pytest
import torch

from audioshard.augment import BatchTransform, SpecAugment, mel_band_centres, warp
from audioshard.features import FeatureParams
from audioshard.loader import open_shards
from audioshard.manifest import load_manifest
from audioshard.stream import Batch, ShardStream


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


@pytest.mark.parametrize("noise_std", [0.0, 0.3])
def test_normalising_on_the_way_equals_normalising_first(noise_std):
    """SpecAugment fuses the normalisation into its noise-and-mask pass; the result must be what normalising
    first and then adding the same noise and masks gives, and the input must be left alone unless in place."""
    augment = SpecAugment(noise_std=noise_std, time_masks=2, time_mask_width=10, freq_masks=1, freq_mask_width=6)
    x_db = torch.randn(32, 1, 64, 63, generator=torch.Generator().manual_seed(1)) * 12 - 45
    kept = x_db.clone()
    fused = augment(x_db, torch.Generator().manual_seed(7), mean=-45.0, std=12.0)
    assert torch.equal(x_db, kept)
    reference = SpecAugment(noise_std=0.0, time_masks=0, freq_masks=0)(x_db, torch.Generator())  # masks off: copy
    first = augment((reference + 45.0) / 12.0, torch.Generator().manual_seed(7))
    assert torch.allclose(fused, first, atol=1e-5) and float(fused.abs().sum()) > 0
    zero_frames = (fused == 0).all(dim=2).squeeze(1)
    assert zero_frames.any() and not zero_frames.all()
    again = augment(x_db.clone(), torch.Generator().manual_seed(7), inplace=True, mean=-45.0, std=12.0)
    assert torch.allclose(again, fused, atol=1e-6)
    augment(x_db, torch.Generator().manual_seed(8), mean=-45.0, std=12.0)  # reuses the noise buffer
    assert torch.equal(again, fused) or torch.allclose(again, fused, atol=1e-6)  # earlier results untouched


def test_normalising_on_the_way_with_warp_stretch_and_shift():
    """The branch that normalises first (resampling and rolling need normalised values) gives what normalising
    by hand gives, and leaves the caller's tensor alone."""
    params = FeatureParams(16000, 2.0, 64, 1024, 512, 0.0, 8000.0, 80.0)
    augment = SpecAugment(noise_std=0.2, time_masks=1, time_mask_width=6, freq_masks=1, freq_mask_width=4,
                          freq_warp=0.1, time_stretch=0.2, time_shift=0.25, band_centres=mel_band_centres(params))
    x_db = torch.randn(16, 1, 64, 63, generator=torch.Generator().manual_seed(2)) * 10 - 50
    kept = x_db.clone()
    fused = augment(x_db, torch.Generator().manual_seed(3), mean=-50.0, std=10.0)
    assert torch.equal(x_db, kept)
    first = augment((x_db + 50.0) / 10.0, torch.Generator().manual_seed(3))
    assert torch.allclose(fused, first, atol=1e-5) and not torch.allclose(fused, (x_db + 50.0) / 10.0, atol=0.1)


@pytest.mark.parametrize("settings", [{"noise_std": 0.0}, {"noise_std": 0.3}, {"noise_std": 0.3, "time_shift": 0.25},
                                      {"noise_std": 0.0, "freq_masks": 0, "time_masks": 0}])
def test_a_float16_batch_is_read_as_it_is_and_gives_what_its_float32_copy_gives(settings):
    """With nothing acting in dB (no gain, no background), BatchTransform reads the loader's float16 batch
    directly instead of copying it to float32 first: the same float32 values bit for bit, input untouched."""
    augment = SpecAugment(**{"time_masks": 2, "time_mask_width": 8, "freq_masks": 1, "freq_mask_width": 6,
                             **settings})
    transform = BatchTransform(-40.0, 15.0, augment)
    x16 = (torch.randn(24, 1, 64, 63, generator=torch.Generator().manual_seed(4)) * 15 - 40).half()
    batch, kept = ones_batch(24)._replace(x=x16), x16.clone()
    transform.reseed(seed=5, epoch=2)
    direct = transform(batch, index=3).x
    transform.reseed(seed=5, epoch=2)
    via_copy = transform(batch._replace(x=x16.float()), index=3).x
    assert direct.dtype == torch.float32 and torch.equal(direct, via_copy)
    assert torch.equal(batch.x, kept) and not torch.equal(direct, x16.float())


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


def test_mel_band_centres_match_the_feature_filterbank():
    import torchaudio

    params = FeatureParams(16000, 2.0, 64, 1024, 512, 0.0, 8000.0, 80.0)
    fbank = torchaudio.functional.melscale_fbanks(513, 0.0, 8000.0, 64, 16000, norm="slaney", mel_scale="slaney")
    peak_hz = torch.linspace(0, 8000, 513)[fbank.argmax(dim=0)]
    assert (peak_hz - mel_band_centres(params).float()).abs().max() <= 8000 / 512  # within one FFT bin


def test_warp_moves_a_tone_by_the_frequency_factor_and_an_onset_by_the_time_factor():
    params = FeatureParams(16000, 2.0, 64, 1024, 512, 0.0, 8000.0, 80.0)
    centres = mel_band_centres(params)
    tone = int((centres - 1000).abs().argmin())
    x = torch.zeros(3, 1, 64, 63)
    x[:, :, tone, 41] = 1.0  # one bin: a tone at ~1 kHz, 10 frames after the centre frame (31)
    factors = torch.tensor([1.0, 1.25, 0.8], dtype=torch.float64)
    y = warp(x, factors, factors, centres)
    for example, factor in enumerate(factors.tolist()):
        band = int(y[example, 0].sum(dim=1).argmax())
        frame = int(y[example, 0].sum(dim=0).argmax())
        nearest_band = int((centres - centres[tone] * factor).abs().argmin())
        assert abs(band - nearest_band) <= 1, (factor, band, nearest_band)
        assert abs(frame - (31 + 10 * factor)) <= 1, (factor, frame)
    assert torch.allclose(y[0], x[0], atol=1e-5)  # factor 1 is the identity


def test_warp_draws_stay_in_range_and_differ_per_example():
    params = FeatureParams(16000, 2.0, 64, 1024, 512, 0.0, 8000.0, 80.0)
    centres = mel_band_centres(params)
    augment = SpecAugment(noise_std=0.0, time_masks=0, freq_masks=0, freq_warp=0.2, time_stretch=0.0,
                          band_centres=centres)
    tone = int((centres - 2000).abs().argmin())
    x = torch.zeros(256, 1, 64, 63)
    x[:, :, tone, :] = 1.0
    y = augment(x, torch.Generator().manual_seed(0))
    moved_to = centres[y[:, 0].sum(dim=2).argmax(dim=1)] / centres[tone]
    assert moved_to.min() >= 0.8 * 0.93 and moved_to.max() <= 1.2 * 1.07  # band spacing ~ 7% at 2 kHz
    assert moved_to.min() < 0.9 and moved_to.max() > 1.1 and len(moved_to.unique()) > 5
    with pytest.raises(ValueError, match="augment.freq_warp"):
        SpecAugment(freq_warp=0.1)  # no band centres
    with pytest.raises(ValueError, match="augment.time_stretch"):
        SpecAugment(time_stretch=1.0)


def test_background_noise_fills_quiet_parts_keeps_loud_ones_and_hits_the_requested_share():
    params = FeatureParams(16000, 2.0, 64, 1024, 512, 0.0, 8000.0, 80.0)
    augment = SpecAugment(band_centres=mel_band_centres(params), background_prob=0.5, background_snr=10.0)
    x = torch.full((400, 1, 64, 63), -90.0)  # near silence ...
    x[:, :, :, 20:30] = -10.0  # ... with one loud event (the peak)
    y = augment.mix_background(x.clone(), torch.Generator().manual_seed(0))
    assert (y >= x - 1e-4).all()  # a power sum only adds
    changed = (y - x).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert 0.4 < changed.float().mean() < 0.6  # about background_prob of the examples
    assert torch.equal(y[~changed], x[~changed])  # the others are untouched, bit for bit
    loud, quiet = y[changed][:, :, :, 20:30], y[changed][:, :, :, :20]
    # >= 10 dB above the noise level: nearly unchanged (the noise's 3-dB ripple peaks now and then)
    assert (loud - -10.0).abs().mean() < 0.2 and (loud - -10.0).abs().max() < 4
    floor = quiet[:, :, 0].mean(dim=(1, 2))  # the lowest (loudest) band: 10 to 40 dB below the peak
    assert floor.max() < -10.0 - 10.0 + 3 and floor.min() > -10.0 - 40.0 - 3
    assert floor.max() - floor.min() > 15  # levels are drawn, not fixed
    tilt = quiet[:, :, 0].mean(dim=(1, 2)) - quiet[:, :, -8:].mean(dim=(1, 2, 3))  # colour: 0 to 6 dB per octave
    assert tilt.min() > -3 and tilt.max() > 20 and tilt.max() - tilt.min() > 15
    off = SpecAugment(band_centres=mel_band_centres(params), background_prob=0.0)
    assert torch.equal(off.mix_background(x.clone(), torch.Generator().manual_seed(0)), x)


def test_batch_transform_mixes_background_before_normalising():
    params = FeatureParams(16000, 2.0, 64, 1024, 512, 0.0, 8000.0, 80.0)
    augment = SpecAugment(noise_std=0.0, time_masks=0, freq_masks=0, band_centres=mel_band_centres(params),
                          background_prob=1.0, background_snr=10.0)
    transform = BatchTransform(-50.0, 20.0, augment)
    transform.reseed(seed=1, epoch=0)
    batch = ones_batch(16)._replace(x=torch.full((16, 1, 64, 63), -90.0, dtype=torch.float16))
    batch.x[:, :, :, :5] = -10.0
    x = transform(batch).x
    quiet_db = x[:, :, 0, 5:] * 20.0 - 50.0  # back to dB, the noise's loudest band
    assert (quiet_db.mean(dim=(1, 2)) > -10.0 - 40.0 - 3).all()  # the floor rose in every example
    transform.reseed(seed=1, epoch=0)
    assert torch.equal(transform(batch).x, x)  # reproducible


def test_time_shift_rolls_each_example_by_its_own_amount_within_reach():
    augment = SpecAugment(noise_std=0.0, time_masks=0, freq_masks=0, time_shift=0.25)
    frames = 63
    x = torch.arange(frames, dtype=torch.float32).expand(256, 1, 64, frames).clone()  # each column says its frame
    y = augment(x, torch.Generator().manual_seed(0))
    shift = (y[:, 0, 0, 0] - 0) * -1 % frames  # frame 0 now shows frame -shift (wrapped)
    shift = torch.where(shift > frames // 2, shift - frames, shift)
    assert shift.abs().max() <= int(0.25 * frames) and len(shift.unique()) > 10
    for example in range(len(y)):  # every column moved by the same amount: a roll, nothing lost or blurred
        assert torch.equal(y[example], torch.roll(x[example], int(shift[example]), dims=2))
    with pytest.raises(ValueError, match="augment.time_shift"):
        SpecAugment(time_shift=1.5)


def test_gain_moves_each_example_by_one_level_in_db():
    transform = BatchTransform(-50.0, 20.0, SpecAugment(noise_std=0.0, time_masks=0, freq_masks=0, gain_db=6.0))
    transform.reseed(seed=2, epoch=0)
    batch = ones_batch(512)._replace(x=torch.randn(512, 1, 64, 63).mul(10).sub(50).half())
    x = transform(batch).x * 20.0 - 50.0  # back to dB
    offset = x - batch.x.float()
    per_example = offset.mean(dim=(1, 2, 3))
    assert (offset - per_example.view(-1, 1, 1, 1)).abs().max() < 1e-3  # one level for the whole example
    assert per_example.abs().max() <= 6.0 + 1e-3 and per_example.min() < -5 and per_example.max() > 5


def test_equaliser_adds_one_smooth_curve_over_the_bands_to_each_example():
    transform = BatchTransform(-50.0, 20.0, SpecAugment(noise_std=0.0, time_masks=0, freq_masks=0, eq_db=6.0))
    transform.reseed(seed=3, epoch=0)
    batch = ones_batch(256)._replace(x=torch.randn(256, 1, 64, 63).mul(10).sub(50).half())
    offset = (transform(batch).x * 20.0 - 50.0) - batch.x.float()  # back to dB
    curve = offset.mean(dim=3, keepdim=True)  # (256, 1, 64, 1)
    assert (offset - curve).abs().max() < 1e-3  # the same gain in every frame of an example
    curve = curve.view(256, 64)
    assert curve.abs().max() <= 6.0 + 1e-3 and curve.min() < -5 and curve.max() > 5
    # linear between 4 evenly spaced points (bands 0, 21, 42, 63): second differences vanish inside each span
    second = curve[:, 2:] - 2 * curve[:, 1:-1] + curve[:, :-2]
    inside = [b - 1 for b in range(1, 63) if b not in (21, 42)]
    assert second[:, inside].abs().max() < 1e-3 and second.abs().max() > 0.1  # bent at the points only
    tilt = curve[:, -1] - curve[:, 0]
    assert tilt.std() > 3 and not torch.allclose(curve[0], curve[1])  # each example its own curve
    with pytest.raises(ValueError, match="augment.eq_db"):
        SpecAugment(eq_db=-1)


@pytest.mark.parametrize("setting", ["augment.time_shift=0.5", "augment.gain_db=6.0", "augment.eq_db=6.0"])
def test_new_augmentations_change_train_batches_only(real_build, setting):
    from audioshard.config import load_config

    manifest = load_manifest(real_build)
    only = load_config(overrides=["augment.noise_std=0", "augment.time_masks=0", "augment.freq_masks=0", setting])
    plain = BatchTransform(manifest.mean, manifest.std)
    raw_train = next(iter(ShardStream(manifest, "train", 32, shuffle=True, seed=0)))
    augmented = next(iter(open_shards(str(real_build), "train", batch_size=32, seed=0, augment_config=only.augment)))
    assert torch.equal(raw_train.y, augmented.y)
    assert not torch.allclose(plain(raw_train).x, augmented.x)
    for r, v in zip(ShardStream(manifest, "val", 32), open_shards(str(real_build), "val", batch_size=32,
                                                                  augment_config=only.augment), strict=True):
        assert torch.equal(plain(r).x, v.x)
