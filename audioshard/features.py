"""Log-mel features: the one place that turns audio chunks into what the model sees.

Used by `build` (to write shards) and by `predict` (on new recordings), with the parameters that
a build records in its manifest and a checkpoint carries, so both compute exactly the same thing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torchaudio

from audioshard.config import Config

CHUNKS_PER_PASS = 8  # chunks featurised together (see log_mel)
AMIN = 1e-10  # power floor before log10: digital silence maps to 10*log10(AMIN) = -100 dB


def samples_at(seconds: float, sample_rate: int) -> int:
    """Samples in `seconds` of audio: the one rounding every chunk and hop length goes through."""
    return int(round(seconds * sample_rate))


@dataclass(frozen=True)
class FeatureParams:
    """Everything needed to compute the same features again (recorded in manifest and checkpoint)."""

    sample_rate: int
    chunk_seconds: float
    n_mels: int
    n_fft: int
    hop_length: int
    f_min: float
    f_max: float
    top_db: float
    dtype: str = "float16"

    @classmethod
    def from_config(cls, cfg: Config) -> FeatureParams:
        f = cfg.features
        return cls(sample_rate=cfg.audio.sample_rate, chunk_seconds=cfg.audio.chunk_seconds, n_mels=f.n_mels,
                   n_fft=f.n_fft, hop_length=f.hop_length, f_min=f.f_min,
                   f_max=f.f_max or cfg.audio.sample_rate / 2, top_db=f.top_db)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureParams:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def chunk_samples(self) -> int:
        return samples_at(self.chunk_seconds, self.sample_rate)

    @property
    def frames(self) -> int:
        """Time frames per chunk (centred STFT: 1 + samples // hop)."""
        return 1 + self.chunk_samples // self.hop_length

    @property
    def shape(self) -> tuple[int, int]:
        """(n_mels, frames) of one chunk's features."""
        return (self.n_mels, self.frames)


# What a manifest or checkpoint from a stranger may ask for: far beyond any real build, yet small enough
# that nothing sized from them can exhaust memory (one chunk's features: at most MAX_MELS x MAX_FRAMES).
MAX_MELS, MAX_FRAMES, MAX_CHUNK_SECONDS = 1024, 8192, 3600.0


def feature_params_problem(params: FeatureParams) -> str:
    """What is wrong with feature parameters read from a file ('' when nothing is)."""
    from audioshard.audio import MAX_RATE, MIN_RATE

    for name in ("sample_rate", "n_mels", "n_fft", "hop_length"):
        value = getattr(params, name)
        if type(value) is not int or value <= 0:
            return f"features {name} = {value!r:.50}, expected a positive integer"
    for name in ("chunk_seconds", "f_min", "f_max", "top_db"):
        value = getattr(params, name)
        if type(value) not in (int, float) or not 0 <= value < math.inf:
            return f"features {name} = {value!r:.50}, expected a finite number >= 0"
    if params.dtype != "float16":
        return f"features dtype = {params.dtype!r:.50}, expected 'float16'"
    if not MIN_RATE <= params.sample_rate <= MAX_RATE or not 0 < params.chunk_seconds <= MAX_CHUNK_SECONDS:
        return f"features sample_rate {params.sample_rate} or chunk_seconds {params.chunk_seconds} out of range"
    if not params.f_min < params.f_max <= params.sample_rate / 2 or params.n_fft > params.chunk_samples:
        return "features f_min < f_max <= sample_rate / 2 and n_fft <= one chunk do not hold"
    if params.n_mels > MAX_MELS or params.frames > MAX_FRAMES:
        return f"features of {params.n_mels} x {params.frames}; at most {MAX_MELS} mels x {MAX_FRAMES} frames"
    return ""


@lru_cache(maxsize=4)
def _mel_parts(params: FeatureParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hann window, mel filterbank (n_fft // 2 + 1, n_mels)), built once per parameter set."""
    window = torch.hann_window(params.n_fft)
    fbank = torchaudio.functional.melscale_fbanks(params.n_fft // 2 + 1, params.f_min, params.f_max, params.n_mels,
                                                  params.sample_rate, norm="slaney", mel_scale="slaney")
    return window, fbank


def _reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """(C, N) -> (C, N + 2 pad), mirrored at both ends without repeating the edge sample: what
    `torch.stft(center=True, pad_mode="reflect")` does, with plain copies (cheaper on a CPU)."""
    chunks, n = x.shape
    if pad >= n:  # reflection needs more samples than pad; let torch raise its usual error
        return torch.nn.functional.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    out = torch.empty(chunks, n + 2 * pad, dtype=x.dtype)
    out[:, pad:pad + n] = x
    out[:, :pad] = x[:, 1:pad + 1].flip(1)
    out[:, pad + n:] = x[:, n - pad - 1:n - 1].flip(1)
    return out


def _mel_power(x: torch.Tensor, params: FeatureParams) -> torch.Tensor:
    """torchaudio's MelSpectrogram(power=2, centred, reflect padding, slaney), computed as re² + im²:
    the same values without the square root and re-squaring of `abs().pow(2)`."""
    window, fbank = _mel_parts(params)
    spec = torch.stft(_reflect_pad(x, params.n_fft // 2), params.n_fft, params.hop_length, window=window,
                      center=False, return_complex=True)
    power = torch.addcmul(spec.real.square(), spec.imag, spec.imag)  # re² + im²: (C, freqs, frames)
    return torch.matmul(power.transpose(1, 2), fbank).transpose(1, 2)  # (C, n_mels, frames)


@torch.inference_mode()
def log_mel(chunks: np.ndarray | torch.Tensor, params: FeatureParams) -> np.ndarray:
    """Log-mel spectrograms of a batch of chunks.

    Args:
        chunks: (C, chunk_samples) float32 audio at `params.sample_rate`.

    Returns:
        (C, n_mels, frames) in `params.dtype` (float16), dB re 1.0 full scale, floored at
        max - top_db per chunk and at -100 dB.
    """
    x = torch.as_tensor(chunks, dtype=torch.float32)
    if x.ndim != 2 or x.shape[1] != params.chunk_samples:
        raise ValueError(f"expected chunks of shape (C, {params.chunk_samples}), got {tuple(x.shape)}")
    out = torch.empty((x.shape[0], *params.shape), dtype=getattr(torch, params.dtype))
    # A few chunks at a time: their spectra (~2 MB) stay in the core's cache, which makes a long file
    # faster than one big batch and keeps parallel build workers from contending for memory.
    for first in range(0, x.shape[0], CHUNKS_PER_PASS):
        part = x[first:first + CHUNKS_PER_PASS]
        db = _mel_power(part, params).clamp_(min=AMIN).log10_().mul_(10.0)  # in place: no temporaries
        if params.top_db:
            # Per chunk, so one loud chunk does not flatten its neighbours.
            db = db.clamp_(min=db.amax(dim=(1, 2), keepdim=True) - params.top_db)
        out[first:first + len(part)] = db  # torch's float16 rounding equals numpy's astype, and is cheaper
    return out.numpy()
