"""Audio in: decode any common file to mono float32 at one sample rate, and cut it into chunks.

soundfile (libsndfile) decodes WAV/FLAC/OGG/MP3/AIFF directly; anything else (m4a, webm, opus in
webm, ...) goes through the `ffmpeg` executable when it is installed. Decoding problems raise
`AudioError` with the file name and what to do, so a build can report and skip the file.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import warnings
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio

from audioshard.config import AudioConfig, Config
from audioshard.errors import AudioshardError
from audioshard.params import MAX_RATE, MIN_RATE, samples_at

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
    path = _readable_file(path)
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        try:
            data, rate = _read_soundfile(path)
        except AudioError:
            raise
        except Exception as exn:  # libsndfile raises LibsndfileError/RuntimeError for bad data
            return _ffmpeg_instead(path, exn, _decode_ffmpeg)
        return _mono(data), int(rate)
    return _decode_ffmpeg(path)


def _readable_file(path: str | Path) -> Path:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exn:
        raise AudioError(f"{path}: cannot read file ({exn.strerror})") from exn
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not a file")
    if size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    return path


def _ffmpeg_instead(path: Path, exn: Exception, decode_with_ffmpeg):
    """libsndfile rejected a file it should read (an MP3 variant, a mislabelled container): try ffmpeg,
    and if that fails too, say what both said."""
    if shutil.which("ffmpeg") is None:
        raise AudioError(f"{path}: not decodable by libsndfile ({exn}); the file is corrupt or not audio") from exn
    try:
        return decode_with_ffmpeg(path)
    except AudioError as ffmpeg_exn:
        raise AudioError(f"{path}: corrupt or not audio (libsndfile: {exn}; "
                         f"ffmpeg: {str(ffmpeg_exn).removeprefix(f'{path}: ')})") from exn


def _mono(data: np.ndarray) -> np.ndarray:
    """(N, channels) -> (N,) float32: the mean of the channels (how every decoder here mixes)."""
    samples = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(samples, dtype=np.float32)


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
    ffmpeg, rate = _ffmpeg_and_rate(path)
    cmd = _ffmpeg_command(ffmpeg, path, rate)
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


def _ffmpeg_and_rate(path: Path) -> tuple[str, int]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(f"{path}: {path.suffix or 'this'} files need ffmpeg, which is not installed "
                         "(Debian/Ubuntu: apt-get install ffmpeg; macOS: brew install ffmpeg)")
    return ffmpeg, _probe_rate(path, ffmpeg)


def _local_input(path: Path) -> list[str]:
    """ffmpeg's input options for the local file `path`, and nothing but it.

    ffmpeg reads a name as a URL when it has a protocol prefix: a file named `tcp:HOST:PORT.wav` or
    `http:HOST:PORT.m4a` would make it connect there, and a playlist or concat file could name any
    URL. `file:` + the absolute path makes the name a local path whatever it holds, and the whitelist
    keeps every input, nested ones included, to local files."""
    return ["-protocol_whitelist", "file", "-i", f"file:{path.absolute()}"]


def _ffmpeg_command(ffmpeg: str, path: Path, rate: int) -> list[str]:
    """ffmpeg decoding the first audio stream to mono float32 at the file's own rate, on stdout:
    resampling stays with torchaudio, the same for every format."""
    return [ffmpeg, "-nostdin", "-v", "error", *_local_input(path), "-vn", "-ac", "1", "-ar", str(rate),
            "-f", "f32le", "-acodec", "pcm_f32le", "-"]


def _probe_rate(path: Path, ffmpeg: str) -> int:
    """The first audio stream's sample rate, from `ffmpeg -i` (ffprobe is not always installed)."""
    proc = subprocess.run([ffmpeg, "-nostdin", "-hide_banner", *_local_input(path)], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    for line in proc.stderr.decode("utf-8", "replace").splitlines():
        if "Audio:" in line and " Hz" in line:
            for part in line.split(","):
                part = part.strip()
                if part.endswith(" Hz") and part[:-3].isdigit():
                    return int(part[:-3])
    raise AudioError(f"{path}: ffmpeg found no audio stream in it")


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


@dataclass(frozen=True)
class ChunkRules:
    """How a recording is cut into chunks, the same for the build and for predict: kept in a build's
    manifest and a checkpoint (their `config.audio`) and read back with `from_audio`.

    Attributes:
        sample_rate: Hz the chunks are cut at (the features' rate).
        chunk_seconds: chunk length; `hop_seconds` (0 = chunk_seconds) the distance between starts.
        min_fraction: a trailing partial chunk is kept, zero-padded, if this fraction of a chunk is in no
            full chunk.
        short_clip: for clips shorter than one chunk: "pad" with zeros, "repeat" the clip, or "drop" it.
        silence_peak: chunks whose peak |sample| is below it are silent (0: none are).
    """

    sample_rate: int
    chunk_seconds: float
    hop_seconds: float = 0.0
    min_fraction: float = 0.5
    short_clip: str = "pad"
    silence_peak: float = 0.0

    @property
    def chunk(self) -> int:
        """Samples per chunk."""
        return samples_at(self.chunk_seconds, self.sample_rate)

    @property
    def hop(self) -> int:
        """Samples between chunk starts."""
        return samples_at(self.hop_seconds or self.chunk_seconds, self.sample_rate)

    @classmethod
    def from_audio(cls, audio: dict[str, Any], sample_rate: int, chunk_seconds: float) -> ChunkRules:
        """From a manifest's or checkpoint's `config.audio` (rate and length from its features). Keys that
        older builds did not record take what those builds did (no overlap) or the defaults."""
        defaults = AudioConfig()
        skip = audio.get("skip_silent", defaults.skip_silent)
        silence = float(audio.get("silence_peak", defaults.silence_peak)) if skip else 0.0
        return cls(sample_rate=int(sample_rate), chunk_seconds=float(chunk_seconds),
                   hop_seconds=float(audio.get("hop_seconds", 0.0)),
                   min_fraction=float(audio.get("min_fraction", defaults.min_fraction)),
                   short_clip=str(audio.get("short_clip", defaults.short_clip)), silence_peak=silence)

    @classmethod
    def from_config(cls, cfg: Config) -> ChunkRules:
        a = cfg.audio
        return cls(sample_rate=a.sample_rate, chunk_seconds=a.chunk_seconds, hop_seconds=a.hop_seconds,
                   min_fraction=a.min_fraction, short_clip=a.short_clip,
                   silence_peak=a.silence_peak if a.skip_silent else 0.0)


def cut_chunks(samples: np.ndarray, rules: ChunkRules) -> tuple[np.ndarray, np.ndarray]:
    """Cut a clip into fixed-length chunks.

    Args:
        samples: (N,) float32 mono audio at `rules.sample_rate`.

    Returns:
        (chunks: (C, chunk_samples) float32, starts: (C,) float64 seconds)
    """
    chunk, short_clip = rules.chunk, rules.short_clip
    starts = chunk_starts(len(samples), chunk, rules.hop, rules.min_fraction, short_clip)
    out = np.zeros((len(starts), chunk), dtype=np.float32)
    for i, start in enumerate(starts):
        piece = samples[start:start + chunk]
        if len(piece) < chunk and short_clip == "repeat" and len(samples) < chunk:
            piece = np.tile(samples, -(-chunk // len(samples)))[:chunk]
        out[i, :len(piece)] = piece
    return out, np.asarray(starts, dtype=np.float64) / rules.sample_rate


# torchaudio.functional.resample defaults, which `audio.resample` uses: they set the filter's reach.
LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99
MAX_RESAMPLE_SAMPLES = 1 << 17  # input samples resampled per torchaudio call (bounds its working memory)


# --- streamed reading: recordings of any length in bounded memory (predict) ---------------------


class StreamingResampler:
    """Resample a stream piece by piece, giving the samples that resampling it whole would give.

    torchaudio's sinc resampler (`audio.resample`) works in frames: with the rates reduced by their
    gcd to `o` -> `n`, output frame t (samples t*n .. t*n + n-1) is computed from the input around
    sample t*o, within `width` samples. Each call resamples a segment that starts at a frame
    boundary (a multiple of `o` input samples) `context` samples before the first frame it emits,
    and emits only frames whose whole filter reach lies inside the segment, so no emitted sample
    sees the zero padding that torchaudio adds at segment edges -- except at the true start and end
    of the recording, where resampling the whole file sees the same zeros. The `context` samples
    (a few hundred) around each segment are resampled twice. Output lengths equal torchaudio's for
    the whole input; values agree to float32 rounding (~1e-7: conv1d sums in another order).

    Args:
        orig_rate: sample rate of the pushed audio (Hz).
        new_rate: sample rate of the emitted audio (Hz).
    """

    def __init__(self, orig_rate: int, new_rate: int):
        self.orig_rate, self.new_rate = int(orig_rate), int(new_rate)
        self.o, self.n = resample_ratio(self.orig_rate, self.new_rate)  # reduced, and bounded for odd rates
        # torchaudio's filter half-length in input samples, plus one for rounding.
        width = math.ceil(LOWPASS_FILTER_WIDTH * self.o / (min(self.o, self.n) * ROLLOFF)) + 1
        self.context = self.o * (width // self.o + 2)  # a multiple of o, > width + o
        self.step = self.o * max(1, MAX_RESAMPLE_SAMPLES // self.o)
        self.buffer = np.zeros(0, dtype=np.float32)  # input from `buffer_start` (a multiple of o) on
        self.buffer_start = 0
        self.next_frame = 0  # first output frame not yet emitted
        self.length = 0  # input samples pushed so far

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add (N,) float32 input; return the output samples that are now final (possibly none)."""
        if self.o == self.n:
            self.length += len(samples)
            return samples
        out = []
        # Resample at most `step` new samples per call: torch's conv1d unfolds its input (about
        # kernel-size floats per output frame), which for a whole block would cost far more than the block.
        for begin in range(0, len(samples), self.step):
            piece = samples[begin:begin + self.step]
            self.length += len(piece)
            self.buffer = np.concatenate([self.buffer, piece])
            stop = (self.length - self.context) // self.o
            if stop > self.next_frame:
                out.append(self._emit(stop))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def finish(self) -> np.ndarray:
        """Return the rest of the output, up to the length resampling the whole input would give."""
        if self.o == self.n or self.length == 0:
            return np.zeros(0, dtype=np.float32)
        return self._emit(None)

    def _emit(self, stop: int | None) -> np.ndarray:
        start = self.buffer_start
        end = self.length if stop is None else stop * self.o + self.context
        out = resample(self.buffer[: end - start], self.orig_rate, self.new_rate)
        first = (self.next_frame - start // self.o) * self.n
        if stop is None:
            # The length torchaudio gives the whole input (it rounds n*L/o in float32).
            total = int(torch.ceil(torch.as_tensor(self.n * self.length / self.o)).item())
            out = out[first: first + max(0, total - self.next_frame * self.n)]
        else:
            out = out[first: (stop - start // self.o) * self.n]
            self.next_frame = stop
            self.buffer_start = max(0, stop * self.o - self.context)
            self.buffer = self.buffer[self.buffer_start - start:]
        return np.ascontiguousarray(out, dtype=np.float32)


def open_audio(path: str | Path, block_seconds: float) -> tuple[int, Iterator[np.ndarray]]:
    """Open a recording for reading in blocks, decoded as `audio.decode` decodes it.

    Args:
        path: any file libsndfile reads, or any file ffmpeg reads when ffmpeg is installed.
        block_seconds: roughly how much audio each block holds.

    Returns:
        (sample_rate: Hz of the file, blocks: iterator of (N,) float32 mono blocks in [-1, 1]).

    Raises:
        AudioError: missing, empty, corrupt or unsupported file, or ffmpeg needed but missing (at open,
            or while reading the blocks).
    """
    path = _readable_file(path)
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        try:
            handle = sf.SoundFile(str(path))
        except Exception as exn:  # LibsndfileError/RuntimeError: fall back to ffmpeg as `decode` does
            return _ffmpeg_instead(path, exn, lambda p: _open_ffmpeg(p, block_seconds))
        try:
            check_rate(path, handle.samplerate)
        except AudioError:
            handle.close()
            raise
        return int(handle.samplerate), _soundfile_blocks(handle, path, max(1, int(block_seconds * handle.samplerate)))
    return _open_ffmpeg(path, block_seconds)


def _soundfile_blocks(handle: sf.SoundFile, path: Path, frames: int) -> Iterator[np.ndarray]:
    with handle:
        while True:
            try:
                data = handle.read(frames, dtype="float32", always_2d=True)
            except Exception as exn:
                raise AudioError(f"{path}: decoding failed part-way ({exn}); the file is corrupt") from exn
            if len(data) == 0:
                return
            yield _mono(data)


def _open_ffmpeg(path: Path, block_seconds: float) -> tuple[int, Iterator[np.ndarray]]:
    ffmpeg, rate = _ffmpeg_and_rate(path)
    check_rate(path, rate)
    return rate, _ffmpeg_blocks(ffmpeg, path, rate, max(1, int(block_seconds * rate)))


def _ffmpeg_blocks(ffmpeg: str, path: Path, rate: int, frames: int) -> Iterator[np.ndarray]:
    cmd = _ffmpeg_command(ffmpeg, path, rate)
    # stderr goes to a file: a pipe nobody reads could fill up and stall ffmpeg.
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL)
        try:
            got = 0
            while True:
                data = proc.stdout.read(4 * frames)
                if not data:
                    break
                usable = len(data) - len(data) % 4  # read(n) returns less than n only at the end
                got += usable
                yield np.frombuffer(data[:usable], dtype="<f4").astype(np.float32)
            code = proc.wait()
            if code != 0 or got == 0:
                errors.seek(0)
                reason = errors.read().decode("utf-8", "replace").strip().splitlines()
                raise AudioError(f"{path}: ffmpeg could not decode it ({reason[-1] if reason else 'no audio stream'})")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.wait()


class ChunkReader:
    """The chunks of one recording, read in blocks: what `cut_chunks(load(path, rate), rules)` returns,
    without ever holding the whole recording.

    Args:
        path: the recording.
        rules: how to cut it (the build's: `ChunkRules.from_audio`).
        block_chunks: chunks' worth of audio read per block.

    After iteration, `num_samples` is the recording's length at the rules' rate and `source_rate` its own rate.
    """

    def __init__(self, path: str | Path, rules: ChunkRules, block_chunks: int = 8):
        self.path, self.rules, self.block_chunks = Path(path), rules, max(1, block_chunks)
        self.sample_rate, self.chunk, self.hop = rules.sample_rate, rules.chunk, rules.hop
        self.num_samples = 0
        self.source_rate: int | None = None

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (chunks: (C, chunk_samples) float32, starts: (C,) int64 sample offsets at the rules' rate)."""
        rules = self.rules
        rate, blocks = open_audio(self.path, self.block_chunks * rules.chunk_seconds)
        self.source_rate, self.num_samples = rate, 0
        resampler = StreamingResampler(rate, self.sample_rate)
        pending = np.zeros(0, dtype=np.float32)  # resampled audio not yet in a chunk; starts at `emitted`
        emitted = 0
        try:
            for raw in blocks:
                if not np.isfinite(raw).all():
                    raise AudioError(f"{self.path}: contains NaN or infinite sample values")
                pending, emitted, out = self._full_chunks(pending, resampler.push(raw), emitted)
                if out is not None:
                    yield out
        finally:
            blocks.close()  # closes the file or stops ffmpeg also when the caller stops early
        pending, emitted, out = self._full_chunks(pending, resampler.finish(), emitted)
        if out is not None:
            yield out
        if self.num_samples == 0:
            raise AudioError(f"{self.path}: no audio samples in the file")
        if self.num_samples < self.chunk:  # the whole clip is in `pending`: the build's own rules apply
            chunks, _ = cut_chunks(pending, self.rules)
            if len(chunks) == 0:
                raise AudioError(f"{self.path}: {self.num_samples / self.sample_rate:.2f} s is shorter than one "
                                 f"chunk ({self.rules.chunk_seconds} s) and audio.short_clip = "
                                 f"{self.rules.short_clip!r}")
            yield chunks, np.zeros(1, dtype=np.int64)
        elif (unheard := len(pending) - (self.chunk - self.hop)) > 0 and unheard >= rules.min_fraction * self.chunk:
            # `pending` starts at the next chunk's start; its first chunk - hop samples are in the last chunk
            tail = np.zeros((1, self.chunk), dtype=np.float32)
            tail[0, :len(pending)] = pending
            yield tail, np.array([emitted], dtype=np.int64)

    def _full_chunks(self, pending: np.ndarray, new: np.ndarray, emitted: int
                     ) -> tuple[np.ndarray, int, tuple[np.ndarray, np.ndarray] | None]:
        self.num_samples += len(new)
        pending = np.concatenate([pending, new]) if len(pending) else new
        count = (len(pending) - self.chunk) // self.hop + 1 if len(pending) >= self.chunk else 0
        if count == 0:
            return pending, emitted, None
        windows = np.lib.stride_tricks.sliding_window_view(pending, self.chunk)[::self.hop][:count]
        starts = emitted + self.hop * np.arange(count, dtype=np.int64)
        return pending[count * self.hop:].copy(), emitted + count * self.hop, (windows.copy(), starts)
