"""Normalisation and on-the-fly augmentation, acting on whole batches (CPU or GPU alike).

x: (B, 1, n_mels, frames). Normalisation uses the train split's mean/std from the manifest, so
that 0 is the average dB level. Augmentation, per example: a random gain and equaliser, and
background noise mixed in at a random level and colour (all before normalising: the noise is a sum of
powers, so it needs dB), a random frequency warp (every frequency scaled by one factor, as vocal
tract length perturbation does for voices; Jaitly & Hinton 2013) and time stretch, Gaussian noise
relative to the normalised input (std 1), and SpecAugment time and frequency masks that set regions
to 0 (Park et al. 2019).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.nn import functional

from audioshard.config import AugmentConfig
from audioshard.params import FeatureParams


def _hz_to_slaney_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale (the one the features use): linear below 1 kHz, logarithmic above.
    (torchaudio builds its filter banks with the same formula but keeps the converters private.)"""
    linear = hz / (200.0 / 3)
    logarithmic = 15.0 + torch.log(hz.clamp(min=1e-5) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(hz < 1000.0, linear, logarithmic)


def _slaney_mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return torch.where(mel < 15.0, mel * (200.0 / 3), 1000.0 * torch.exp((mel - 15.0) * (math.log(6.4) / 27.0)))


def mel_band_centres(params: FeatureParams) -> torch.Tensor:
    """(n_mels,) float64 centre frequency (Hz) of each mel band of these features."""
    edges = torch.linspace(float(_hz_to_slaney_mel(torch.tensor(params.f_min, dtype=torch.float64))),
                           float(_hz_to_slaney_mel(torch.tensor(params.f_max, dtype=torch.float64))),
                           params.n_mels + 2, dtype=torch.float64)
    return _slaney_mel_to_hz(edges[1:-1])


def _band_mask(batch: int, count: int, max_width: int, size: int, generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """(batch, size) bool: `count` bands per row, each of width U{0..max_width}, placed uniformly inside."""
    if count == 0 or max_width == 0:
        return torch.zeros(batch, size, dtype=torch.bool, device=device)
    max_width = min(max_width, size)
    width = torch.randint(0, max_width + 1, (batch, count, 1), generator=generator, device=device)
    start = (torch.rand((batch, count, 1), generator=generator, device=device) * (size - width + 1)).long()
    position = torch.arange(size, device=device).view(1, 1, size)
    return ((position >= start) & (position < start + width)).any(dim=1)


def warp(x: torch.Tensor, freq_factor: torch.Tensor, time_factor: torch.Tensor,
         band_centres: torch.Tensor | None) -> torch.Tensor:
    """Resample each example of x (B, 1, mels, frames) on a warped grid: bilinear, edges repeated.

    Frequency (factor a per example): the band centred at f shows what x had at f / a, so every
    frequency (a voice's formants, an engine's harmonics) moves by the factor a; on the mel axis that
    is a shift at high frequencies and a stretch at low ones. `band_centres` (Hz) of the features;
    None leaves frequency alone. Time (factor s): frame t shows frame c + (t - c) / s, c the centre,
    i.e. the chunk plays s times slower (a speaking-rate or tempo change)."""
    batch, _, mels, frames = x.shape
    if band_centres is not None:
        centres = band_centres.to(x.device, torch.float32)  # float32: MPS has no float64
        position = _hz_to_slaney_mel(centres)  # equally spaced by construction
        step = (position[-1] - position[0]) / max(mels - 1, 1)
        factor = freq_factor.to(x.device, torch.float32).view(-1, 1)
        source = (_hz_to_slaney_mel(centres / factor) - position[0]) / step  # (B, mels) band index
        rows = source * (2.0 / max(mels - 1, 1)) - 1
    else:
        rows = torch.linspace(-1, 1, mels, device=x.device).expand(batch, mels)
    cols = torch.linspace(-1, 1, frames, device=x.device) / time_factor.to(x.device, torch.float32).view(-1, 1)
    grid = torch.stack(torch.broadcast_tensors(cols[:, None, :], rows[:, :, None]), dim=-1)  # (B, mels, frames, 2)
    return functional.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)


DB_TO_NEPERS = math.log(10.0) / 10.0  # dB -> natural-log power units, which logaddexp and logsumexp work in


def power_sum_db(a_db: torch.Tensor, b_db: torch.Tensor) -> torch.Tensor:
    """Two sounds at once, in dB: 10 log10(10^(a/10) + 10^(b/10)), without leaving the log domain."""
    return torch.logaddexp(a_db * DB_TO_NEPERS, b_db * DB_TO_NEPERS) / DB_TO_NEPERS


NOISE_BANK = 1 << 21  # standard-normal values kept per generator for noise windows (8 MB as float32)


class SpecAugment(nn.Module):
    """Frequency warp and time stretch, Gaussian noise, time and frequency masks: a fresh draw for every sample.

    Args:
        noise_std: std of added noise, in units of the normalised input (0 = off).
        time_masks, time_mask_width: number of time masks per sample and their max width (frames).
        freq_masks, freq_mask_width: number of frequency masks per sample and their max width (mel bins).
        freq_warp: every frequency is scaled by a factor drawn from U[1 - freq_warp, 1 + freq_warp] (0 = off).
        time_stretch: time is stretched about the chunk's centre by U[1 - time_stretch, 1 + time_stretch].
        band_centres: (n_mels,) Hz of the mel bands (`mel_band_centres`), needed when freq_warp > 0
            or background_prob > 0.
        background_prob, background_snr: see `mix_background` (applied by BatchTransform, in dB).
        time_shift: each example is rolled in time by up to this fraction of its length, either way (0 = off).
        gain_db: each example is made louder or quieter by U[-gain_db, gain_db] dB (0 = off; see `apply_gain`).
        eq_db: a random equaliser of up to +-eq_db dB per example (0 = off; see `apply_eq`).
    """

    def __init__(self, noise_std: float = 0.1, time_masks: int = 2, time_mask_width: int = 8, freq_masks: int = 1,
                 freq_mask_width: int = 8, freq_warp: float = 0.0, time_stretch: float = 0.0,
                 band_centres: torch.Tensor | None = None, background_prob: float = 0.0,
                 background_snr: float = 10.0, time_shift: float = 0.0, gain_db: float = 0.0,
                 eq_db: float = 0.0):
        super().__init__()
        for name, value in [("noise_std", noise_std), ("time_masks", time_masks),
                            ("time_mask_width", time_mask_width), ("freq_masks", freq_masks),
                            ("freq_mask_width", freq_mask_width), ("freq_warp", freq_warp),
                            ("time_stretch", time_stretch), ("background_prob", background_prob),
                            ("time_shift", time_shift), ("gain_db", gain_db), ("eq_db", eq_db)]:
            if value < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {value}")
        for name, value in [("freq_warp", freq_warp), ("time_stretch", time_stretch)]:
            if value >= 1:
                raise ValueError(f"augment.{name} must be below 1 (a factor between 1 - it and 1 + it), got {value}")
        if time_shift > 1:
            raise ValueError(f"augment.time_shift must be between 0 and 1 (a fraction of the chunk), got {time_shift}")
        if background_prob > 1:
            raise ValueError(f"augment.background_prob must be between 0 and 1, got {background_prob}")
        if (freq_warp or background_prob) and band_centres is None:
            raise ValueError("augment.freq_warp and augment.background_prob need the mel band centres of the "
                             "features (band_centres)")
        self.noise_std, self.time_masks, self.time_mask_width = noise_std, time_masks, time_mask_width
        self.freq_masks, self.freq_mask_width = freq_masks, freq_mask_width
        self.freq_warp, self.time_stretch = freq_warp, time_stretch
        self.background_prob, self.background_snr = background_prob, background_snr
        self.time_shift, self.gain_db, self.eq_db = time_shift, gain_db, eq_db
        self.band_centres = band_centres
        self._centres_on: dict[torch.device, torch.Tensor] = {}  # float32 copies per device, made once
        self._bank, self._bank_owner = torch.empty(0), None
        self._work = torch.empty(0)
        self.bank_seed: int | None = None  # see `_noise`

    def forward(self, x: torch.Tensor, generator: torch.Generator, inplace: bool = False, mean: float = 0.0,
                std: float = 1.0) -> torch.Tensor:
        """x: (B, 1, n_mels, frames) float -> augmented x (a copy unless `inplace`), at least float32: a
        float16 x is read as it is, not copied to float32 first. `mean`, `std`: x is normalised as
        (x - mean) / std on the way (fused with the noise and masks; by default it already is)."""
        batch, _, mels, frames = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        inplace = inplace and x.dtype == dtype
        if self.freq_warp or self.time_stretch or self.time_shift:
            # resampling and rolling act on normalised values (edges and seams repeat them)
            x = (x.sub_(mean) if inplace else x.to(dtype) - mean).mul_(1.0 / std)
            mean, std, inplace = 0.0, 1.0, True
            if self.freq_warp or self.time_stretch:
                x = self._warp(x, generator)
            x = self._roll(x, generator)
        noise = self._noise(x, generator, out=self._scratch(x, dtype)) if self.noise_std else None
        time = _band_mask(batch, self.time_masks, self.time_mask_width, frames, generator, x.device)
        freq = _band_mask(batch, self.freq_masks, self.freq_mask_width, mels, generator, x.device)
        # One pass for normalisation, noise and time masks together: keep * (noise_std * n + (x - mean) / std)
        # = keep * (-mean / std) + (keep * scale) * values, with values = n + x / (noise_std * std) and
        # scale = noise_std (or values = x, scale = 1 / std without noise). Masked frames are 0, and the
        # inputs are finite, so 0 * x is 0.
        keep = (~time).to(dtype).view(batch, 1, 1, frames)
        if noise is not None:
            values, scale = noise.add_(x, alpha=1.0 / (self.noise_std * std)), self.noise_std
        else:
            values, scale = x, 1.0 / std
        x = torch.addcmul(keep * (-mean / std), values, keep * scale, out=x if inplace else None)
        if self.freq_masks and self.freq_mask_width:
            x.mul_((~freq).to(dtype).view(batch, 1, mels, 1))
        return x

    @property
    def acts_in_db(self) -> bool:
        """Whether gain, equaliser or background noise is on: those act on dB values, before the normalisation."""
        return bool(self.gain_db or self.eq_db or self.background_prob)

    def mix_background(self, x_db: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Add stationary background noise to a share `background_prob` of the examples, in place.

        x_db: (B, 1, n_mels, frames) float32 log-mel in dB (not normalised). The noise is a power sum,
        10 log10(10^(x/10) + 10^(n/10)), so it fills the quiet parts and leaves loud ones nearly as
        they were, like a real noise floor (hiss, hum, wind, a room): its level (in its loudest,
        lowest band) is drawn from [peak - background_snr - 30, peak - background_snr] dB, the example's
        own peak, its colour from white to brown (0 to -6 dB per octave above that band), with 3 dB of
        random ripple per (band, frame).
        Recordings made with a different noise floor than the training ones are a common reason a
        model fails on new recordists; this teaches it that the floor is not the class."""
        batch = len(x_db)
        if not self.background_prob:
            return x_db
        draws = torch.rand((3, batch, 1, 1, 1), generator=generator, device=x_db.device)
        peak = x_db.amax(dim=(1, 2, 3), keepdim=True)
        level = peak - self.background_snr - 30.0 * draws[0]
        slope = -6.0 * draws[1]  # dB per octave
        octaves = torch.log2(self._centres(x_db.device).clamp(min=20.0))
        octaves = (octaves - octaves[0]).view(1, 1, -1, 1)  # above the lowest band, whose level is `level`
        noise_db = level + slope * octaves + 3.0 * self._noise(x_db, generator)
        chosen = draws[2].view(-1) < self.background_prob  # the others stay bit for bit as they were
        x_db[chosen] = power_sum_db(x_db[chosen], noise_db[chosen])
        return x_db

    def apply_gain(self, x_db: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Add a random level U[-gain_db, gain_db] dB to each example, in place (x_db: dB, not normalised).

        The same sound recorded closer or farther, or a device with another gain: the class must not
        depend on the absolute level, which the shared normalisation otherwise keeps."""
        if self.gain_db:
            draws = torch.rand((len(x_db), 1, 1, 1), generator=generator, device=x_db.device)
            x_db.add_((draws * 2 - 1) * self.gain_db)
        return x_db

    EQ_POINTS = 4  # lowest band, highest band and two between: a tilt, a bump or a notch, a shelf

    def apply_eq(self, x_db: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Add a random equaliser curve to each example, in place (x_db: dB, not normalised): gains
        U[-eq_db, eq_db] dB at EQ_POINTS evenly spaced mel bands, joined linearly, the same in every frame.

        Another microphone, room or phone colours a recording by a smooth frequency response; the
        class must not depend on it (FilterAugment, Nam et al. 2022, does the same with random bands)."""
        if not self.eq_db:
            return x_db
        batch, _, mels, _ = x_db.shape
        points = torch.rand((batch, 1, self.EQ_POINTS), generator=generator, device=x_db.device)
        curve = functional.interpolate((points * 2 - 1) * self.eq_db, size=mels, mode="linear", align_corners=True)
        return x_db.add_(curve.view(batch, 1, mels, 1))

    def _roll(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Roll each example in time by U{-s..s} frames, s = time_shift x frames, wrapping around.

        A chunk is cut at fixed times at build; the event it holds (a bark, a door knock) can start
        anywhere in a new recording. Rolling teaches that the position does not matter, at the cost of
        one seam, which the time masks and the pooling over time make harmless in practice."""
        batch, _, _, frames = x.shape
        reach = int(self.time_shift * frames)
        if reach == 0:
            return x
        shift = torch.randint(-reach, reach + 1, (batch, 1), generator=generator, device=x.device)
        index = (torch.arange(frames, device=x.device).view(1, frames) - shift) % frames
        return x.gather(3, index.view(batch, 1, 1, frames).expand_as(x))

    def _warp(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        draws = torch.rand((2, len(x)), generator=generator, device=x.device) * 2 - 1
        return warp(x, 1 + self.freq_warp * draws[0], 1 + self.time_stretch * draws[1],
                    self._centres(x.device) if self.freq_warp else None)

    def _centres(self, device: torch.device) -> torch.Tensor:
        """The band centres as float32 (MPS has no float64) on `device`: one copy per run, not per batch."""
        if device not in self._centres_on:
            self._centres_on[device] = self.band_centres.to(device, torch.float32)
        return self._centres_on[device]

    def _scratch(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A work buffer shaped like x, kept between batches: a fresh one per batch costs more in page
        faults (a large allocation is new memory from the kernel each time) than the noise itself."""
        if self._work.shape != x.shape or self._work.device != x.device or self._work.dtype != dtype:
            self._work = torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)
        return self._work

    def _noise(self, x: torch.Tensor, generator: torch.Generator, out: torch.Tensor | None = None) -> torch.Tensor:
        """Standard-normal noise shaped like x: each example reads its own random window of a bank of
        NOISE_BANK values, drawn from `bank_seed` when it is set (BatchTransform sets one per epoch, so
        that a batch's noise depends only on its own draws) or else from `generator` (redrawn whenever
        the generator changes).

        Drawing a fresh normal per value costs more than all other loader work together on a CPU
        (about 20 us per example); a window copy costs about 1 us, and with 2M start positions no
        two examples of a run share their noise in practice."""
        per_example = x[0].numel()
        dtype = x.dtype if out is None else out.dtype
        owner = generator if self.bank_seed is None else self.bank_seed
        if (self._bank_owner != owner or self._bank.device != x.device or self._bank.dtype != dtype
                or len(self._bank) < per_example):
            source = generator
            if self.bank_seed is not None:
                source = torch.Generator(device=x.device)
                source.manual_seed(self.bank_seed)
            self._bank = torch.randn(NOISE_BANK + per_example, generator=source, device=x.device, dtype=dtype)
            self._bank_owner = owner
        starts = torch.randint(0, len(self._bank) - per_example + 1, (len(x),), generator=generator,
                               device=x.device)
        windows = self._bank.as_strided((len(self._bank) - per_example + 1, per_example), (1, 1))
        if out is None:
            return torch.index_select(windows, 0, starts).view(x.shape)
        return torch.index_select(windows, 0, starts, out=out.view(len(x), per_example)).view(x.shape)


class BatchTransform(nn.Module):
    """float16 dB batch -> float32 normalised (and, when enabled, augmented) batch.

    Runs in a loader worker (library use) or on the accelerator after the copy (`audioshard train`).
    Its random draws come from its own generator: `reseed(seed, epoch, rank, worker)` fixes the epoch,
    and `forward(batch, index)` draws batch number `index` of it from a seed of its own, so a batch's
    augmentation depends on nothing but (seed, epoch, rank, worker, index). A run is reproducible, and a
    run resumed in the middle of an epoch draws exactly what an uninterrupted one would.
    """

    def __init__(self, mean: float, std: float, augment: SpecAugment | None = None):
        super().__init__()
        self.mean, self.std, self.augment = mean, std, augment
        self.generator: torch.Generator | None = None
        self.seed_key: tuple[int, ...] = (0, 0, 0, 0)
        if augment is not None:
            augment.bank_seed = draw_seed(self.seed_key)

    @classmethod
    def from_manifest(cls, manifest, cfg: AugmentConfig, enabled: bool = True) -> BatchTransform:
        augment = None
        if enabled and cfg.enabled:
            augment = SpecAugment(cfg.noise_std, cfg.time_masks, cfg.time_mask_width, cfg.freq_masks,
                                  cfg.freq_mask_width, cfg.freq_warp, cfg.time_stretch,
                                  mel_band_centres(manifest.features), cfg.background_prob, cfg.background_snr,
                                  cfg.time_shift, cfg.gain_db, cfg.eq_db)
        return cls(manifest.mean, manifest.std, augment)

    def reseed(self, seed: int, epoch: int, rank: int = 0, worker: int = 0) -> None:
        self.seed_key = (seed, epoch, rank, worker)
        self.generator = None  # created lazily on the batch's device
        if self.augment is not None:
            self.augment.bank_seed = draw_seed(self.seed_key)  # one noise bank per epoch

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A new float32 tensor (the input is never modified), in two in-place passes."""
        return self._normalize_(x.to(torch.float32, copy=True))

    def _normalize_(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(self.mean).mul_(1.0 / self.std)

    def _generator(self, device: torch.device, index: int | None) -> torch.Generator:
        """The generator on `device`: seeded for batch `index`, or (index None) continuing its sequence."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(draw_seed(self.seed_key))
        if index is not None:
            self.generator.manual_seed(draw_seed((*self.seed_key, index)))
        return self.generator

    def forward(self, batch, index: int | None = None):
        """Normalise (and augment) a Batch; `index`: the batch's number in its reader's epoch, which alone
        (with the reseed key) decides its random draws. Without it, draws continue from the previous batch."""
        if self.augment is None:
            return batch._replace(x=self.normalize(batch.x))
        generator = self._generator(batch.x.device, index)
        augment = self.augment
        if not augment.acts_in_db:  # one pass from the input, float16 or not
            return batch._replace(x=augment(batch.x, generator, mean=self.mean, std=self.std))
        # Gain, equaliser and background noise (a power sum) act while x is still in dB, on our own fresh copy.
        x = augment.apply_eq(augment.apply_gain(batch.x.to(torch.float32, copy=True), generator), generator)
        x = augment.mix_background(x, generator)
        return batch._replace(x=augment(x, generator, inplace=True, mean=self.mean, std=self.std))


def draw_seed(key: tuple[int, ...]) -> int:
    """A 63-bit seed from a tuple of ints (a hash: no overflow, no collisions between nearby keys)."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
