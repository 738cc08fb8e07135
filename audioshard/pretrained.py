"""Start from published PANNs weights: a checkpoint file you downloaded yourself (nothing is downloaded here).

    Cnn14_16k_mAP=0.438.pth   model.name = "panns_cnn14", shards built with `--preset panns16k`
    Cnn6_mAP=0.343.pth        model.name = "panns_cnn6",  shards built with `--preset panns32k`

    audioshard build raw/ --out shards/ --preset panns16k
    audioshard train --shards shards/ --out runs/panns --set model.name=panns_cnn14 \\
        --set model.init_weights=Cnn14_16k_mAP=0.438.pth

PANNs (Kong et al. 2020, github.com/qiuqiangkong/audioset_tagging_cnn) save `{"model": state_dict, ...}`;
a bare state dict is accepted too. The file is read with `torch.load(weights_only=True)`: tensors,
containers, numbers and NumPy arrays (the 16 kHz release stores some), never Python objects, so
nothing in it can run. Every tensor of the backbone must be there with the shape audioshard's layout
has (models.PannsCNN names them as PANNs does); PANNs' own front end (`spectrogram_extractor.*`,
`logmel_extractor.*`: audioshard's log-mel comes from the shards) and AudioSet head (`fc_audioset.*`)
are ignored and listed. The front end is still read: its mel filterbank says which sample rate,
FFT size and band edges the network learned on, and shards built otherwise are refused.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from audioshard.checkpoint import archive_problem, tree_problem
from audioshard.errors import AudioshardError
from audioshard.models import is_head
from audioshard.params import FeatureParams

IGNORED_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.", "fc_audioset.")
MEL_FILTERBANK = "logmel_extractor.melW"  # (n_fft // 2 + 1, n_mels): librosa.filters.mel(...).T
COUNTER = "num_batches_tracked"  # BatchNorm's step counter: loaded when present, never required
PRESET_OF_FFT = {512: "panns16k", 1024: "panns32k"}  # the front ends of the 16 kHz and 32 kHz releases
FILTERBANK_TOLERANCE = 1e-4  # of the largest weight; torchaudio's Slaney filters equal librosa's to ~2e-6


class PretrainedError(AudioshardError, ValueError):
    """A pretrained weights file cannot be read, or does not fit the model or the shards."""


@dataclass(frozen=True)
class InitReport:
    """What `load_init_weights` did: tensors loaded, ignored from the file, and kept fresh in the model."""

    loaded: list[str]
    ignored: list[str]
    fresh: list[str]

    def summary(self, path: str) -> str:
        return (f"initialised {len(self.loaded)} of {len(self.loaded) + len(self.fresh)} tensors from {path}"
                f"; new: {', '.join(self.fresh) or 'none'}; ignored from the file: {_prefixes(self.ignored)}")


def _prefixes(names: list[str]) -> str:
    groups = sorted({name.rsplit(".", 1)[0] + ".*" for name in names})
    return ", ".join(groups) or "none"


def _numpy_globals() -> list:
    """What NumPy arrays and scalars in a pickle need, under both module names a file may use (NumPy 1
    wrote `numpy.core.multiarray`, NumPy 2 writes `numpy._core.multiarray`). They rebuild data only."""
    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - NumPy < 2
        from numpy.core import multiarray
    named = [(fn, f"{module}.{fn.__name__}") for fn in (multiarray._reconstruct, multiarray.scalar)
             for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    dtypes = [type(np.dtype(code)) for code in "?bhilqBHILQefdFD"]
    return [*named, np.ndarray, np.dtype, *dtypes]


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a PANNs checkpoint (`{"model": state}`) or a bare state dict, read without
    unpickling anything but tensors, containers, numbers and NumPy arrays.

    Raises:
        PretrainedError: the file is missing, not a torch file, holds Python objects, or no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"model.init_weights: {path} is not a file (download the checkpoint yourself; "
                              "audioshard never downloads weights)")
    problem = archive_problem(path)  # before torch.load reads an entry: a small zip may inflate to GBs
    if problem:
        raise PretrainedError(f"model.init_weights: refused {path}: {problem}; download the checkpoint again")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exn:
        raise PretrainedError(f"model.init_weights: refused {path}: it holds Python objects, not only tensors "
                              f"(weights_only load: {str(exn).splitlines()[-1][:200]}). audioshard never "
                              "unpickles code; if you trust the file, re-save its tensors with "
                              "torch.save({'model': state_dict}, ...)") from exn
    except (RuntimeError, OSError, EOFError) as exn:
        raise PretrainedError(f"model.init_weights: {path} is not a readable torch checkpoint: {exn}") from exn
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"model.init_weights: {path} holds no state dict (expected {{'model': "
                              "{name: tensor}} as PANNs save it, or {name: tensor})")
    problem = tree_problem(state, tensor_bytes=2 * path.stat().st_size + (1 << 20))  # names and shared tensors
    if problem:
        raise PretrainedError(f"model.init_weights: refused {path}: its state dict {problem}")
    return state


def guess_model(state: dict[str, torch.Tensor]) -> str:
    """The audioshard model whose layout a PANNs state dict has ('' when neither)."""
    first = state.get("conv_block1.conv1.weight")
    if first is None or first.ndim != 4:
        return ""
    if "conv_block6.conv2.weight" in state and first.shape[-1] == 3:
        return "panns_cnn14"
    if "conv_block4.conv1.weight" in state and "conv_block5.conv1.weight" not in state and first.shape[-1] == 5:
        return "panns_cnn6"
    return ""


def _fix(state: dict[str, torch.Tensor], model_name: str) -> str:
    guess = guess_model(state)
    if guess and guess != model_name:
        return f"model.name must be {guess} for this checkpoint"
    if not guess:
        return ("this is not a PANNs CNN14 or CNN6 checkpoint (audioshard loads these two layouts: "
                "Cnn14_16k_mAP=0.438.pth, Cnn14_mAP=0.431.pth, Cnn6_mAP=0.343.pth)")
    return "the file is damaged or was saved from a modified network; download it again"


def match_weights(own: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], path: str,
                  model_name: str) -> tuple[list[str], list[str]]:
    """Which of `theirs` to load into a model with state `own` (names and shapes only: meta tensors do).

    Every tensor of `own` but the head must be in `theirs` with the same shape (BatchNorm counters
    may be absent); `theirs` may add only PANNs' front end and AudioSet head.

    Returns:
        (names to load, names ignored), sorted.

    Raises:
        PretrainedError: naming the file, the tensor, both shapes and the fix.
    """
    ignored = sorted(k for k in theirs if k.startswith(IGNORED_PREFIXES))
    for name, tensor in own.items():
        if is_head(name) or (name.endswith(COUNTER) and name not in theirs):
            continue
        if name not in theirs:
            raise PretrainedError(f"model.init_weights: {path} has no tensor {name} ({tuple(tensor.shape)} in "
                                  f"{model_name}): {_fix(theirs, model_name)}")
        if theirs[name].shape != tensor.shape:
            hint = ("build the shards with 64 mel bands (--preset panns16k or panns32k)" if name.startswith("bn0.")
                    else _fix(theirs, model_name))
            raise PretrainedError(f"model.init_weights: {path}: tensor {name} has shape {tuple(theirs[name].shape)}"
                                  f", {model_name} has {tuple(tensor.shape)}: {hint}")
    unknown = sorted(set(theirs) - set(own) - set(ignored))
    if unknown:
        raise PretrainedError(f"model.init_weights: {path} holds tensors {model_name} does not have "
                              f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}): "
                              f"{_fix(theirs, model_name)}")
    return sorted(k for k in theirs if k in own and not is_head(k)), ignored


def check_front_end(theirs: dict[str, torch.Tensor], features: FeatureParams, path: str) -> None:
    """The shards' features must be the ones the network learned on: PANNs' mel filterbank (sample rate,
    FFT size, band edges, mel bands), their 10-ms hop and no dynamic-range clipping (top_db 0).

    Raises:
        PretrainedError: naming what differs and the preset to build with.
    """
    from audioshard.features import mel_parts  # torchaudio: only when there is a front end to compare

    melw = theirs.get(MEL_FILTERBANK)
    if melw is None:
        return  # a state dict without PANNs' front end: nothing to compare (the docs say which preset)
    n_fft = 2 * (melw.shape[0] - 1)
    preset = PRESET_OF_FFT.get(n_fft, "panns16k or panns32k")
    fix = f"build the shards with `audioshard build ... --preset {preset}`"
    if (n_fft, melw.shape[1]) != (features.n_fft, features.n_mels):
        raise PretrainedError(f"model.init_weights: {path} was trained on features with n_fft {n_fft} and "
                              f"{melw.shape[1]} mel bands; these shards have n_fft {features.n_fft} and "
                              f"{features.n_mels}: {fix}")
    ours = mel_parts(features)[1]
    if (ours - melw.float()).abs().max() > FILTERBANK_TOLERANCE * melw.abs().max():
        raise PretrainedError(f"model.init_weights: {path} was trained with another mel filterbank (sample rate "
                              f"or f_min/f_max) than these shards' ({features.sample_rate} Hz, "
                              f"{features.f_min}-{features.f_max} Hz): {fix}")
    if features.hop_length != features.sample_rate // 100 or features.top_db:
        raise PretrainedError(f"model.init_weights: PANNs were trained with a 10-ms hop and no top_db clipping; "
                              f"these shards have hop_length {features.hop_length} and top_db {features.top_db}: "
                              f"{fix}")


def fold_normalization(state: dict[str, torch.Tensor], mean: float, std: float, eps: float,
                       ) -> dict[str, torch.Tensor]:
    """`state` with bn0's running statistics moved from dB to audioshard's normalised input.

    PANNs feed bn0 log-mel dB; audioshard's batches are (dB - mean) / std with the build's one mean and
    std. With running mean m, variance v: (dB - m) / sqrt(v + eps) = (x - (m - mean) / std) /
    sqrt((v + eps) / std² ), so bn0 (and every layer after it) computes exactly what PANNs' would.
    In training mode bn0 uses batch statistics, which the affine map leaves unchanged.
    """
    out = dict(state)
    out["bn0.running_mean"] = (state["bn0.running_mean"] - mean) / std
    out["bn0.running_var"] = (state["bn0.running_var"] + eps) / std**2 - eps
    return out


def load_init_weights(model: nn.Module, path: str, model_name: str, features: FeatureParams, mean: float,
                      std: float) -> InitReport:
    """Load a PANNs checkpoint onto `model` (a models.PannsCNN), checked against the shards' features.

    Args:
        model: the freshly built model; its head stays as initialised (other classes than AudioSet's).
        path: the checkpoint file (`model.init_weights`).
        model_name: `model.name`, for the messages.
        features, mean, std: the shards' feature parameters and normalisation (manifest).

    Returns:
        the names loaded, ignored and kept fresh (loaded weights equal the file's; bn0's running
        statistics are moved to the normalised input: `fold_normalization`).
    """
    theirs = read_weights(path)
    own = model.state_dict()
    names, ignored = match_weights(own, theirs, path, model_name)
    check_front_end(theirs, features, path)
    eps = model.bn0.eps if isinstance(getattr(model, "bn0", None), nn.BatchNorm2d) else 1e-5
    state = fold_normalization({k: theirs[k] for k in names}, mean, std, eps)
    model.load_state_dict(state, strict=False)
    return InitReport(loaded=names, ignored=ignored, fresh=sorted(set(own) - set(names)))
