"""Audio in: decode any common file to mono float32 at one sample rate, and cut it into chunks.

soundfile (libsndfile) decodes WAV/FLAC/OGG/MP3/AIFF directly; anything else (m4a, webm, opus in
webm, ...) goes through the `ffmpeg` executable when it is installed. Decoding problems raise
`AudioError` with the file name and what to do, so a build can report and skip the file.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import warnings
import wave
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from audioshard.errors import AudioshardError

# Formats libsndfile reads itself; everything else is handed to ffmpeg.
SOUNDFILE_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".caf"}


class AudioError(AudioshardError):
    """A file could not be used as audio; the message names the file and the reason."""


def decode(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 in [-1, 1] at its own sample rate.

    Args:
        path: Any file libsndfile reads, or any file ffmpeg reads when ffmpeg is installed.

    Returns:
        (samples: (N,) float32, sample_rate: Hz)

    Raises:
        AudioError: empty, corrupt or unsupported file, or ffmpeg needed but missing.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exn:
        raise AudioError(f"{path}: cannot read file ({exn.strerror})") from exn
    if size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        try:
            data, rate = _read_soundfile(path)
        except AudioError:
            raise
        except Exception as exn:  # libsndfile raises LibsndfileError/RuntimeError for bad data
            if shutil.which("ffmpeg") is None:
                raise AudioError(f"{path}: not decodable by libsndfile ({exn}); the file is corrupt or not audio"
                                 ) from exn
            try:  # e.g. an MP3 variant or a mislabelled container that libsndfile rejects
                return _decode_ffmpeg(path)
            except AudioError as ffmpeg_exn:
                raise AudioError(f"{path}: corrupt or not audio (libsndfile: {exn}; "
                                 f"ffmpeg: {str(ffmpeg_exn).removeprefix(f'{path}: ')})") from exn
        samples = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
        return np.ascontiguousarray(samples, dtype=np.float32), int(rate)
    return _decode_ffmpeg(path)


MAX_DECODED_SAMPLES = 1 << 28  # samples x channels `build` decodes at once: 1 GiB of float32 (4.6 h at 16 kHz)


def check_length(path: Path, frames: int, channels: int) -> None:
    """`build` holds a whole recording in memory: refuse one longer than MAX_DECODED_SAMPLES before reading
    it (a forged header, or a small FLAC of silence that decodes ~1000x its size)."""
    if frames * channels > MAX_DECODED_SAMPLES:
        raise _too_long(path, f"{frames} frames x {channels} channels are")


def _too_long(path: Path, amount: str) -> AudioError:
    return AudioError(f"{path}: {amount} more than audioshard build decodes at once ({MAX_DECODED_SAMPLES} "
                      "samples); split it, e.g. ffmpeg -i IN -f segment -segment_time 3600 OUT-%03d.wav "
                      "(predict streams files of any length)")


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and the rate. 16-bit PCM (most WAV/FLAC) is read as int16 and scaled
    by 1/32768 in numpy: the same values libsndfile's own float conversion gives, in less time."""
    if path.suffix.lower() == ".wav" and (plain := _read_pcm16_wav(path)) is not None:
        return plain
    with sf.SoundFile(str(path)) as stream:
        check_length(path, stream.frames, stream.channels)
        if stream.subtype == "PCM_16":
            data = _pcm16_to_float(stream.read(dtype="int16", always_2d=True))
        else:
            data = stream.read(dtype="float32", always_2d=True)
        return data, stream.samplerate


def _read_pcm16_wav(path: Path) -> tuple[np.ndarray, int] | None:
    """A plain 16-bit PCM WAV (the commonest audio file) through the standard library's `wave`, or None
    for anything else (float, 24-bit, WAVE_FORMAT_EXTENSIBLE, damaged headers), which libsndfile then
    reads or rejects. Same samples as libsndfile's int16 read, without the per-file set-up of a
    libsndfile handle through cffi, which costs more than reading a short clip."""
    try:
        with wave.open(str(path), "rb") as stream:
            if stream.getsampwidth() != 2 or stream.getcomptype() != "NONE":
                return None
            channels, rate = stream.getnchannels(), stream.getframerate()
            # A header may claim more frames than the file holds (0xFFFFFFFF from streaming writers): only
            # what the file can hold counts.
            check_length(path, min(stream.getnframes(), path.stat().st_size // (2 * channels)), channels)
            raw = stream.readframes(stream.getnframes())
    except (wave.Error, EOFError, ValueError):
        return None
    frame_bytes = 2 * channels
    usable = len(raw) - len(raw) % frame_bytes  # a truncated last frame is dropped, as libsndfile does
    return _pcm16_to_float(np.frombuffer(raw, dtype="<i2", count=usable // 2).reshape(-1, channels)), rate


def _pcm16_to_float(data: np.ndarray) -> np.ndarray:
    """int16 samples -> float32 in [-1, 1), the values libsndfile's own float conversion gives."""
    samples = data.astype(np.float32)
    samples *= np.float32(1 / 32768)
    return samples


def _decode_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    """Decode through ffmpeg to mono float32 at the file's own rate (probed by ffmpeg itself)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(f"{path}: {path.suffix or 'this'} files need ffmpeg, which is not installed "
                         "(Debian/Ubuntu: apt-get install ffmpeg; macOS: brew install ffmpeg)")
    rate = _probe_rate(path, ffmpeg)
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-vn", "-ac", "1", "-ar", str(rate),
           "-f", "f32le", "-acodec", "pcm_f32le", "-"]
    limit = 4 * MAX_DECODED_SAMPLES  # bytes of float32 output
    with tempfile.TemporaryFile() as errors, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors) as proc:
        out = proc.stdout.read(limit + 1)  # never more: a small compressed file can decode to any length
        if len(out) > limit:
            proc.kill()
            raise _too_long(path, "its decoded samples are")
        returncode = proc.wait(timeout=3600)
        errors.seek(0)
        reason = errors.read().decode("utf-8", "replace").strip().splitlines()
    if returncode != 0 or not out:
        raise AudioError(f"{path}: ffmpeg could not decode it ({reason[-1] if reason else 'no audio stream'})")
    return np.frombuffer(out, dtype="<f4").copy(), rate


def _probe_rate(path: Path, ffmpeg: str) -> int:
    """The first audio stream's sample rate, from `ffmpeg -i` (ffprobe is not always installed)."""
    proc = subprocess.run([ffmpeg, "-nostdin", "-hide_banner", "-i", str(path)], capture_output=True, timeout=600)
    for line in proc.stderr.decode("utf-8", "replace").splitlines():
        if "Audio:" in line and " Hz" in line:
            for part in line.split(","):
                part = part.strip()
                if part.endswith(" Hz") and part[:-3].isdigit():
                    return int(part[:-3])
    raise AudioError(f"{path}: ffmpeg found no audio stream in it")


MIN_RATE, MAX_RATE = 1_000, 768_000  # Hz: below telephone speech, above the fastest studio formats
MAX_RATE_TERMS = 1_000  # largest reduced rate pair resampled exactly (see resample_ratio)


def check_rate(path: str | Path, rate: int) -> None:
    """A rate outside MIN_RATE..MAX_RATE is a broken or hostile header: resampling from it could make
    hours of output from seconds of input."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{path}: sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz; "
                         "the header is damaged, or convert the file (e.g. ffmpeg -ar 16000)")


def resample_ratio(orig_rate: int, new_rate: int) -> tuple[int, int]:
    """(o, n): the rates as a reduced fraction with both terms <= MAX_RATE_TERMS, exact for every
    common pair (44100 -> 16000 is 441 -> 160). torchaudio's kernel holds about n x (o + 13) taps,
    so an odd rate such as 15999 -> 16000 (coprime) would need 16000 x 16012 (GBs); the nearest
    bounded ratio (here 1 -> 1) is within 1/MAX_RATE_TERMS (0.1 %, 1.7 cents) and usually far closer."""
    exact = Fraction(new_rate, orig_rate)
    if max(exact.numerator, exact.denominator) <= MAX_RATE_TERMS:
        return exact.denominator, exact.numerator
    if exact < 1:
        near = exact.limit_denominator(MAX_RATE_TERMS)
        return near.denominator, max(1, near.numerator)
    near = (1 / exact).limit_denominator(MAX_RATE_TERMS)
    return max(1, near.numerator), near.denominator


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling with torchaudio (sinc interpolation). (N,) float32 -> (M,) float32.
    The rate ratio is `resample_ratio`'s, exact for common rates, bounded for odd ones."""
    orig_rate, new_rate = resample_ratio(orig_rate, new_rate)
    if orig_rate == new_rate:
        return samples
    # oneDNN prepares a new convolution kernel for every input length (each file's), which costs more
    # than the convolution itself on a CPU; the plain kernel has no such set-up.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TF32.*")  # torch notes Intel-GPU TF32 when flags change
        with torch.backends.mkldnn.flags(enabled=False):
            return _resampler(orig_rate, new_rate)(torch.from_numpy(samples)).numpy()


@lru_cache(maxsize=16)
def _resampler(orig_rate: int, new_rate: int) -> torch.nn.Module:
    # The transform builds its sinc kernel once; the functional form rebuilds it on every call.
    return torchaudio.transforms.Resample(orig_rate, new_rate)


def load(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode, mix to mono and resample: the one way audio enters audioshard (build and predict)."""
    samples, rate = decode(path)
    check_rate(path, rate)
    if samples.size == 0:  # a header with no frames: nothing to resample (torchaudio would fail on it)
        raise AudioError(f"{path}: no audio samples in the file (a header without audio data)")
    if not np.isfinite(peak_amplitude(samples)):
        raise AudioError(f"{path}: contains NaN or infinite sample values")
    return resample(samples, rate, sample_rate)


def peak_amplitude(samples: np.ndarray) -> float:
    """max |x| (0 for no samples); NaN or inf if any sample is. Two reductions and no temporary
    array (faster than np.abs(x).max() on long files)."""
    if samples.size == 0:
        return 0.0
    return float(np.maximum(samples.max(), -samples.min())) + 0.0  # + 0.0: -0.0 (all zeros) reads 0


def silent_chunks(chunks: np.ndarray, silence_peak: float) -> np.ndarray:
    """(C,) bool: which chunks (C, samples) have a peak amplitude below `silence_peak` (digital silence:
    a clip padded to a fixed length, a gap in a recording)."""
    return np.maximum(chunks.max(axis=1), -chunks.min(axis=1)) < silence_peak


def chunk_starts(num_samples: int, chunk: int, hop: int, min_fraction: float, short_clip: str) -> list[int]:
    """Start offsets (in samples) of the chunks cut from a clip of `num_samples`.

    Full chunks every `hop` samples; a last partial chunk is kept (and later padded) when the audio that
    no full chunk holds is at least `min_fraction` of a chunk (with overlapping chunks, the last full
    one often reaches the end already). A clip shorter than one chunk gives one chunk at 0 unless
    `short_clip == "drop"`.
    """
    if num_samples <= 0:
        return []
    if num_samples < chunk:
        return [] if short_clip == "drop" else [0]
    starts = list(range(0, num_samples - chunk + 1, hop))
    uncovered = num_samples - (starts[-1] + chunk)
    if uncovered > 0 and uncovered >= min_fraction * chunk:
        starts.append(starts[-1] + hop)
    return starts


def choppinator(samples: np.ndarray, sample_rate: int, chunk_seconds: float, hop_seconds: float = 0.0,
                min_fraction: float = 0.5, short_clip: str = "pad") -> tuple[np.ndarray, np.ndarray]:
    """Cut a clip into fixed-length chunks (the original system's name for this step).

    Args:
        samples: (N,) float32 mono audio at `sample_rate`.
        chunk_seconds: chunk length; `hop_seconds` (0 = same as chunk) sets the overlap.
        min_fraction: a trailing partial chunk is kept, zero-padded, if it holds this fraction of a chunk.
        short_clip: for clips shorter than one chunk: "pad" with zeros, "repeat" the clip, or "drop" it.

    Returns:
        (chunks: (C, chunk_samples) float32, starts: (C,) float64 seconds)
    """
    chunk = int(round(chunk_seconds * sample_rate))
    hop = int(round((hop_seconds or chunk_seconds) * sample_rate))
    starts = chunk_starts(len(samples), chunk, hop, min_fraction, short_clip)
    out = np.zeros((len(starts), chunk), dtype=np.float32)
    for i, start in enumerate(starts):
        piece = samples[start:start + chunk]
        if len(piece) < chunk and short_clip == "repeat" and len(samples) < chunk:
            piece = np.tile(samples, -(-chunk // len(samples)))[:chunk]
        out[i, :len(piece)] = piece
    return out, np.asarray(starts, dtype=np.float64) / sample_rate
