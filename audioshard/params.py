"""Feature parameters: what a build records and a checkpoint carries, and the bounds a file from a
stranger may ask for. No torch here: reading a manifest (`audioshard info`) stays fast."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from audioshard.config import Config


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


MIN_RATE, MAX_RATE = 1_000, 768_000  # Hz: below telephone speech, above the fastest studio formats

# What a manifest or checkpoint from a stranger may ask for: far beyond any real build, yet small enough
# that nothing sized from them can exhaust memory (one chunk's features: at most MAX_MELS x MAX_FRAMES).
MAX_MELS, MAX_FRAMES, MAX_CHUNK_SECONDS = 1024, 8192, 3600.0


def feature_params_problem(params: FeatureParams) -> str:
    """What is wrong with feature parameters read from a file ('' when nothing is)."""
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
