"""Synthetic, offline 3-class demo data set for trying the pipeline without any download.

Everything written here is **synthetic**: generated from simple physical models with numpy and saved with
soundfile. No real recordings are involved, so the data set is tiny, licence-free and reproducible, and
a model trained on it says nothing about real-world accuracy. It exists to exercise the whole pipeline
(scan, resample, shard, stream, train, predict) in seconds.

The three classes:

* ``drone``: the buzz of a small multirotor. A harmonic series (fundamental 150-400 Hz, about ten
  harmonics with slowly decaying amplitude) whose pitch wobbles slightly, amplitude-modulated at a blade-pass
  rate of 20-60 Hz.
* ``engine``: the rumble of a combustion engine at idle or low revs. A train of firing pulses
  (25-80 Hz, with cylinder-to-cylinder level jitter and slow RPM drift) shaped by a low-pass response,
  mixed with low-passed brown noise.
* ``voice``: a crude vowel-like talker. A glottal pulse train (pitch 90-250 Hz with a slow contour and
  declination) shaped by a glottal roll-off and lip radiation, filtered through three formant
  resonances (two-pole resonators, a different vowel per syllable), and gated by a syllable-like
  on/off envelope at 3-6 syllables per second.

Every file draws its own parameters, is mixed with coloured background noise (spectral slope between
pinkish-white and brown) at a random SNR of 5-25 dB, and gets a random peak level. Durations vary
between 1 and 8 s; most files are 16 kHz mono, but some are 22.05 kHz or 8 kHz and a few are stereo, so
a pipeline has to resample and down-mix. All filtering is done in the frequency domain (no per-sample
Python loops), and the files are 16-bit PCM WAV, so a given seed yields byte-identical files.

Example:
    >>> from audioshard.demo import make_demo_data
    >>> make_demo_data("data/demo")  # doctest: +SKIP
    {'drone': 20, 'engine': 20, 'voice': 19}
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = ["DEMO_CLASSES", "make_demo_data"]

DEMO_CLASSES: tuple[str, ...] = ("drone", "engine", "voice")

_SAMPLE_RATES = (16000, 22050, 8000)
_SAMPLE_RATE_PROBS = (0.7, 0.15, 0.15)
_STEREO_PROB = 0.1
_MIN_SECONDS = 1.0
_MAX_SECONDS = 8.0
_SNR_DB = (5.0, 25.0)
_PEAK_DB = (-20.0, -1.0)

# Rough formant frequencies (F1, F2, F3) in Hz of a few vowels of an adult talker.
_VOWELS = np.array(
    [
        [730.0, 1090.0, 2440.0],  # a
        [530.0, 1840.0, 2480.0],  # e
        [270.0, 2290.0, 3010.0],  # i
        [570.0, 840.0, 2410.0],  # o
        [300.0, 870.0, 2240.0],  # u
        [660.0, 1720.0, 2410.0],  # ae
    ]
)


def _fft_size(n: int) -> int:
    """Return the smallest 5-smooth number (factors 2, 3, 5 only) that is at least ``n``.

    FFTs of such lengths are fast; an arbitrary length (a large prime, say) can be many times slower.
    """
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def _filtered_noise(rng: np.random.Generator, n: int, sr: int, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Return white noise shaped by a magnitude response, normalised to unit standard deviation.

    Args:
        rng: Random generator.
        n: Number of samples.
        sr: Sample rate in Hz.
        gain: Maps an array of frequencies in Hz to the response at those frequencies.

    Returns:
        Zero-mean float array of length ``n``.
    """
    size = _fft_size(n)
    spec = np.fft.rfft(rng.standard_normal(size))
    spec *= gain(np.fft.rfftfreq(size, 1.0 / sr))
    spec[0] = 0.0
    noise = np.fft.irfft(spec, size)[:n]
    noise -= noise.mean()
    std = noise.std()
    return noise / std if std > 0 else noise


def _smooth_curve(rng: np.random.Generator, n: int, sr: int, max_hz: float) -> np.ndarray:
    """Return a random curve with unit standard deviation and energy only below about ``max_hz``.

    The curve is drawn at a 50 Hz control rate and linearly interpolated to ``n`` samples.

    Args:
        rng: Random generator.
        n: Number of samples.
        sr: Sample rate in Hz.
        max_hz: Highest frequency in the curve; at most 20 Hz.

    Returns:
        Float array of length ``n``.
    """
    control_rate = 50.0
    k = int(np.ceil(n / sr * control_rate)) + 2
    control = _filtered_noise(rng, k, int(control_rate), lambda f: (f <= max_hz).astype(float))
    return np.interp(np.arange(n) / sr * control_rate, np.arange(k), control)


def _coloured_noise(rng: np.random.Generator, n: int, sr: int, slope: float) -> np.ndarray:
    """Return noise whose power falls as ``1 / f**slope`` (0 = white, 1 = pink, 2 = brown).

    Args:
        rng: Random generator.
        n: Number of samples.
        sr: Sample rate in Hz.
        slope: Exponent of the power spectrum.

    Returns:
        Zero-mean float array of length ``n`` with unit standard deviation.
    """
    return _filtered_noise(rng, n, sr, lambda f: np.maximum(f, 20.0) ** (-slope / 2.0))


def _lowpass_response(freqs: np.ndarray, cutoff: float, order: int) -> np.ndarray:
    """Butterworth-like magnitude response ``1 / sqrt(1 + (f / cutoff) ** (2 * order))``."""
    return 1.0 / np.sqrt(1.0 + (freqs / cutoff) ** (2 * order))


def _resonator_response(freqs: np.ndarray, sr: int, centre: float, bandwidth: float) -> np.ndarray:
    """Complex response of a two-pole resonator ``1 / (1 - 2 r cos(theta) z^-1 + r^2 z^-2)``.

    Normalised to unit gain at DC so that several can be cascaded without the level exploding.

    Args:
        freqs: Frequencies in Hz at which to evaluate the response.
        sr: Sample rate in Hz.
        centre: Resonance frequency in Hz.
        bandwidth: 3 dB bandwidth in Hz.

    Returns:
        Complex array shaped like ``freqs``.
    """
    r = np.exp(-np.pi * bandwidth / sr)
    theta = 2.0 * np.pi * centre / sr
    a1, a2 = -2.0 * r * np.cos(theta), r * r
    z1 = np.exp(-2j * np.pi * freqs / sr)
    return (1.0 + a1 + a2) / (1.0 + a1 * z1 + a2 * z1 * z1)


def _pulse_train(rng: np.random.Generator, f_inst: np.ndarray, sr: int, jitter: float) -> np.ndarray:
    """Unit impulses at the zero crossings of the phase of an instantaneous frequency track.

    Args:
        rng: Random generator.
        f_inst: Instantaneous pulse rate in Hz, one value per sample.
        sr: Sample rate in Hz.
        jitter: Relative standard deviation of the pulse amplitudes.

    Returns:
        Float array like ``f_inst`` that is zero except at pulse positions.
    """
    cycles = np.cumsum(f_inst) / sr + rng.uniform()
    starts = np.flatnonzero(np.diff(np.floor(cycles)) > 0) + 1
    train = np.zeros_like(f_inst)
    train[starts] = np.clip(1.0 + jitter * rng.standard_normal(starts.size), 0.2, None)
    return train


def _drone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Multirotor buzz: wobbling harmonic series with blade-rate amplitude modulation."""
    f0 = rng.uniform(150.0, 400.0)
    wobble = rng.uniform(0.003, 0.015) * _smooth_curve(rng, n, sr, rng.uniform(0.5, 3.0))
    f_inst = f0 * (1.0 + wobble)
    phase = 2.0 * np.pi * np.cumsum(f_inst) / sr
    decay = rng.uniform(0.2, 0.9)
    sig = np.zeros(n)
    for k in range(1, rng.integers(9, 13) + 1):
        if k * f0 * 1.05 >= 0.45 * sr:
            break
        amp = k**-decay * rng.uniform(0.6, 1.4)
        sig += amp * np.sin(k * phase + rng.uniform(0.0, 2.0 * np.pi))
    blade_hz = rng.uniform(20.0, 60.0) * (1.0 + 0.5 * wobble)
    blade_phase = 2.0 * np.pi * np.cumsum(blade_hz) / sr + rng.uniform(0.0, 2.0 * np.pi)
    depth = rng.uniform(0.2, 0.6)
    sig *= 1.0 + depth * np.sin(blade_phase)
    # Slow level change, as when the drone moves relative to the microphone.
    sig *= 1.0 + rng.uniform(0.0, 0.3) * np.tanh(_smooth_curve(rng, n, sr, 0.5))
    return sig


def _engine(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Engine rumble: drifting firing-pulse train through a low-pass shape plus low-passed brown noise."""
    f0 = rng.uniform(25.0, 80.0)
    drift = rng.uniform(0.03, 0.15) * _smooth_curve(rng, n, sr, rng.uniform(0.1, 0.5))
    f_inst = f0 * np.exp(drift)
    pulses = _pulse_train(rng, f_inst, sr, jitter=rng.uniform(0.05, 0.3))
    size = _fft_size(n)
    freqs = np.fft.rfftfreq(size, 1.0 / sr)
    cutoff = rng.uniform(120.0, 450.0)
    shape = _lowpass_response(freqs, cutoff, order=2) * _resonator_response(
        freqs, sr, rng.uniform(60.0, 250.0), rng.uniform(40.0, 120.0)
    )
    spec = np.fft.rfft(pulses, size) * shape
    spec[freqs < 15.0] = 0.0
    rumble = np.fft.irfft(spec, size)[:n]
    rumble /= rumble.std() + 1e-12
    noise_cut = rng.uniform(150.0, 500.0)
    noise = _filtered_noise(rng, n, sr, lambda f: np.maximum(f, 20.0) ** -1.0 * _lowpass_response(f, noise_cut, 2))
    return rumble + rng.uniform(0.2, 0.7) * noise


def _voice(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Vowel-like talker: glottal pulses through per-syllable formant resonators, gated by syllables."""
    t = np.arange(n) / sr
    f0 = rng.uniform(90.0, 250.0)
    contour = 0.12 * _smooth_curve(rng, n, sr, rng.uniform(0.5, 2.0)) - rng.uniform(0.0, 0.05) * t
    f_inst = f0 * 2.0**contour
    source = _pulse_train(rng, f_inst, sr, jitter=0.08)
    speaker = rng.uniform(0.85, 1.2)  # vocal tract length scales all formants together
    rate = rng.uniform(3.0, 6.0)
    glottal_cut = rng.uniform(0.8, 1.5) * f0
    pad = int(0.03 * sr)
    out = np.zeros(n + pad)
    start = int(rng.uniform(0.0, 0.1) * sr)
    while start < n:
        length = int(sr / rate * rng.uniform(0.7, 1.3))
        voiced = max(int(length * rng.uniform(0.55, 0.85)), 16)
        seg = source[start : start + voiced]
        m = _fft_size(seg.size + pad)
        freqs = np.fft.rfftfreq(m, 1.0 / sr)
        formants = _VOWELS[rng.integers(len(_VOWELS))] * speaker * rng.uniform(0.93, 1.07, 3)
        formants = np.minimum(formants, 0.42 * sr)
        resp = 1.0 / (1.0 + (freqs / glottal_cut) ** 2)  # glottal roll-off, -12 dB/octave
        resp = resp * np.abs(1.0 - np.exp(-2j * np.pi * freqs / sr))  # lip radiation, +6 dB/octave
        for centre, bandwidth in zip(formants, (80.0, 100.0, 150.0), strict=True):
            resp = resp * _resonator_response(freqs, sr, centre, bandwidth * rng.uniform(0.8, 1.3))
        filtered = np.fft.irfft(np.fft.rfft(seg, m) * resp, m)
        filtered[: seg.size] *= np.hanning(seg.size + 2)[1:-1] ** 0.5
        filtered = filtered[: seg.size + pad]
        filtered[seg.size :] *= np.linspace(1.0, 0.0, pad)
        out[start : start + filtered.size] += filtered * rng.uniform(0.5, 1.0)
        start += length
        if rng.uniform() < 0.1:  # an occasional pause between words
            start += int(rng.uniform(0.15, 0.5) * sr)
    return out[:n]


_GENERATORS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "drone": _drone,
    "engine": _engine,
    "voice": _voice,
}


def _plan_durations(rng: np.random.Generator, total_seconds: float) -> list[float]:
    """Draw file durations in [1, 8] s that add up to ``total_seconds`` to within one second.

    Args:
        rng: Random generator.
        total_seconds: Target total duration in seconds.

    Returns:
        List of durations in seconds.
    """
    durations: list[float] = []
    remaining = total_seconds
    while remaining >= _MIN_SECONDS:
        dur = min(rng.uniform(_MIN_SECONDS, _MAX_SECONDS), remaining)
        durations.append(dur)
        remaining -= dur
    return durations


def _render_file(rng: np.random.Generator, name: str, seconds: float, sr: int, channels: int) -> np.ndarray:
    """Synthesise one noisy, level-scaled clip.

    Args:
        rng: Random generator.
        name: Class name, a key of ``_GENERATORS``.
        seconds: Duration in seconds.
        sr: Sample rate in Hz.
        channels: 1 for mono, 2 for stereo.

    Returns:
        int16 array shaped ``(frames,)`` for mono or ``(frames, channels)`` otherwise.
    """
    n = min(max(round(seconds * sr), round(_MIN_SECONDS * sr)), round(_MAX_SECONDS * sr))
    clean = _GENERATORS[name](rng, n, sr)
    clean = clean / (clean.std() + 1e-12)
    snr_db = rng.uniform(*_SNR_DB)
    noise_slope = rng.uniform(0.5, 2.0)
    noise_scale = 10.0 ** (-snr_db / 20.0)  # clean has unit power
    mix = np.empty((n, channels))
    for ch in range(channels):
        sig = clean
        if ch > 0:  # a second microphone: slightly delayed and at a different level
            delay = int(rng.integers(1, 24))
            sig = np.concatenate([np.zeros(delay), clean[:-delay]]) * rng.uniform(0.6, 1.0)
        mix[:, ch] = sig + noise_scale * _coloured_noise(rng, n, sr, noise_slope)
    peak = 10.0 ** (rng.uniform(*_PEAK_DB) / 20.0)
    mix *= peak / (np.abs(mix).max() + 1e-12)
    pcm = np.clip(np.round(mix * 32767.0), -32768, 32767).astype(np.int16)
    return pcm[:, 0] if channels == 1 else pcm


def make_demo_data(out_dir: str | Path, seconds_per_class: float = 90.0, seed: int = 0) -> dict[str, int]:
    """Write the synthetic demo data set as ``out_dir/<class>/<class>_<NNN>.wav``.

    Each class gets files of 1-8 s whose durations add up to ``seconds_per_class`` (to within one
    second). Most files are 16 kHz mono; when a class has at least three files, at least one is at
    22.05 kHz, one at 8 kHz and one stereo. Files are 16-bit PCM WAV and byte-identical for a given
    ``seed``. Existing ``<class>_<NNN>.wav`` files in the class folders are removed first, so the
    folders hold exactly the new set; other files are left alone.

    Args:
        out_dir: Root folder; created if missing.
        seconds_per_class: Total audio duration per class in seconds; at least 1.0.
        seed: Seed for ``numpy.random.default_rng``.

    Returns:
        Mapping from class name to the number of files written, in ``DEMO_CLASSES`` order.

    Raises:
        ValueError: If ``seconds_per_class`` is below one second.
    """
    if not seconds_per_class >= _MIN_SECONDS:
        raise ValueError(f"seconds_per_class must be at least {_MIN_SECONDS}, got {seconds_per_class}")
    out_root = Path(out_dir)
    # One independent stream per class (children of the seed), so one class's draws do not shift another's.
    class_rngs = [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(len(DEMO_CLASSES))]
    own_file = re.compile(r"^(?:" + "|".join(DEMO_CLASSES) + r")_\d{3,}\.wav$")
    counts: dict[str, int] = {}
    for name, crng in zip(DEMO_CLASSES, class_rngs, strict=True):
        class_dir = out_root / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for old in class_dir.glob(f"{name}_*.wav"):
            if own_file.match(old.name):
                old.unlink()
        durations = _plan_durations(crng, seconds_per_class)
        n_files = len(durations)
        rates = crng.choice(np.array(_SAMPLE_RATES), size=n_files, p=_SAMPLE_RATE_PROBS)
        stereo = crng.uniform(size=n_files) < _STEREO_PROB
        if n_files >= 3:  # make sure every class exercises resampling and down-mixing
            i_22k, i_8k, i_st = crng.permutation(n_files)[:3]
            if not np.any(rates == 22050):
                rates[i_22k] = 22050
            if not np.any(rates == 8000):
                rates[i_8k] = 8000
            if not stereo.any():
                stereo[i_st] = True
        for idx, (dur, sr, st) in enumerate(zip(durations, rates, stereo, strict=True)):
            pcm = _render_file(crng, name, dur, int(sr), 2 if st else 1)
            sf.write(class_dir / f"{name}_{idx:03d}.wav", pcm, int(sr), subtype="PCM_16", format="WAV")
        counts[name] = n_files
    return counts


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``python -m audioshard.demo OUT_DIR [--seconds S] [--seed N]``.

    Args:
        argv: Arguments; ``sys.argv[1:]`` when None.
    """
    parser = argparse.ArgumentParser(description="Write the synthetic 3-class demo data set.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seconds", type=float, default=90.0, help="seconds of audio per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = make_demo_data(args.out_dir, seconds_per_class=args.seconds, seed=args.seed)
    print(", ".join(f"{name}: {count} files" for name, count in counts.items()))


if __name__ == "__main__":
    main()
