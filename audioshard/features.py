"""Log-mel features: the one place that turns audio chunks into what the model sees.

Used by `build` (to write shards) and by `predict` (on new recordings), with the parameters that
a build records in its manifest and a checkpoint carries, so both compute exactly the same thing.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torchaudio

from audioshard.params import (  # noqa: F401 - re-exported: features are computed from them
    MAX_CHUNK_SECONDS,
    MAX_FRAMES,
    MAX_MELS,
    FeatureParams,
    feature_params_problem,
    samples_at,
)

CHUNKS_PER_PASS = 8  # chunks featurised together (see log_mel)
AMIN = 1e-10  # power floor before log10: digital silence maps to 10*log10(AMIN) = -100 dB


@lru_cache(maxsize=4)
def mel_parts(params: FeatureParams) -> tuple[torch.Tensor, torch.Tensor]:
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
    window, fbank = mel_parts(params)
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
