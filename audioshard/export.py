"""Export a trained model for use without audioshard: TorchScript or ONNX, plus a JSON sidecar.

    audioshard export --checkpoint runs/first/best_model.pt --format onnx --out model.onnx
    audioshard export --checkpoint runs/first/best_model.pt --format torchscript --out model.pt

The exported model takes normalised log-mel spectrograms, `mel: (batch, 1, n_mels, frames)` float32
(any batch size), and returns `logits: (batch, num_classes)`. `OUT.json` beside it says how to make
that input from audio (sample rate, chunking, mel parameters, normalisation) and names the classes.
Every export is loaded back and compared with the PyTorch model on a random batch before it is kept;
the largest difference is written into the sidecar.

ONNX uses torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`): the newer
`torch.export`-based default needs the `onnxscript` package, which this path does not. It needs
`onnx`, and the parity check `onnxruntime`: `pip install 'audioshard[export]'`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audioshard import __version__
from audioshard.checkpoint import Checkpoint, read_checkpoint
from audioshard.errors import AudioshardError
from audioshard.features import AMIN
from audioshard.names import EXPORT_FORMATS

ONNX_OPSET = 17
PARITY_ATOL = 1e-4  # logits; float32 kernels differ between runtimes in the last bits only


class ExportError(AudioshardError, RuntimeError):
    """The model could not be exported, or the export does not reproduce the PyTorch outputs."""


def sidecar_path(out: str | Path) -> Path:
    """Where the JSON description of an export goes: `model.onnx` -> `model.onnx.json`."""
    out = Path(out)
    return out.with_name(out.name + ".json")


@contextmanager
def _quiet() -> Iterator[None]:
    """torch warns that TorchScript and its ONNX exporter are deprecated; they are still what works
    without extra packages (see the module docstring), so the export does not repeat it to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*(TorchScript-based ONNX|removed)")
        yield


def _export_torchscript(model: torch.nn.Module, out: Path) -> Any:
    with _quiet():
        scripted = torch.jit.script(model)  # script, not trace: no shape is baked in
        scripted.save(str(out))
        loaded = torch.jit.load(str(out), map_location="cpu")
    loaded.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, out: Path) -> Any:
    try:
        import onnx
        import onnxruntime
    except ImportError as exn:
        raise ExportError(f"ONNX export needs the onnx and onnxruntime packages ({exn.name} is missing): "
                          "pip install 'audioshard[export]'") from exn
    try:
        with _quiet():
            torch.onnx.export(model, (example,), str(out), input_names=["mel"], output_names=["logits"],
                              dynamic_axes={"mel": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=ONNX_OPSET, dynamo=False)
    except Exception as exn:
        raise ExportError(f"torch.onnx.export failed: {type(exn).__name__}: {exn}") from exn
    onnx.checker.check_model(str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"mel": x})[0]

    return run


def describe(card: Checkpoint, fmt: str, parity: float) -> dict[str, Any]:
    """The sidecar: everything needed to turn audio into the model's input and its output into classes."""
    params, rules = card.features, card.rules
    return {
        "format": fmt,
        "audioshard_version": __version__,
        "classes": list(card.classes),
        "input": {"name": "mel", "shape": ["batch", 1, params.n_mels, params.frames], "dtype": "float32",
                  "meaning": "normalised log-mel: (mel_db - normalization.mean) / normalization.std"},
        "output": {"name": "logits", "shape": ["batch", len(card.classes)], "dtype": "float32",
                   "meaning": "class scores in `classes` order; a recording's class is the argmax of its "
                              "chunks' mean logits (softmax of the mean for probabilities)"},
        "features": params.to_dict(),
        "feature_recipe": {
            "audio": f"mono (mean of channels), resampled to {params.sample_rate} Hz (band-limited sinc, "
                     "torchaudio.functional.resample defaults)",
            "chunking": {"chunk_seconds": rules.chunk_seconds, "chunk_samples": rules.chunk,
                         "hop_seconds": rules.hop_seconds or rules.chunk_seconds,
                         "min_fraction": rules.min_fraction, "short_clip": rules.short_clip,
                         "silence_peak": rules.silence_peak,
                         "rule": "full chunks every hop_seconds; a last partial chunk is zero-padded and kept if "
                                 ">= min_fraction of a chunk is in no full chunk; a clip shorter than one chunk is "
                                 "padded with zeros ('pad'), looped ('repeat') or dropped ('drop'); chunks whose "
                                 "peak |sample| is below silence_peak are left out of a recording's mean unless "
                                 "all are"},
            "spectrogram": {"transform": "torchaudio.transforms.MelSpectrogram", "power": 2.0, "center": True,
                            "pad_mode": "reflect", "window": "hann", "norm": "slaney", "mel_scale": "slaney",
                            "n_fft": params.n_fft, "hop_length": params.hop_length, "n_mels": params.n_mels,
                            "f_min": params.f_min, "f_max": params.f_max},
            "db": f"10 * log10(max(power, {AMIN})), then per chunk max(db, db.max() - top_db) with top_db = "
                  f"{params.top_db}; stored as {params.dtype} at build time",
        },
        "normalization": {"mean": card.mean, "std": card.std},
        "model_args": dict(card.model_args),
        "parity_max_abs_diff": parity,
    }


def export_model(checkpoint: str | Path, fmt: str, out: str | Path, *, atol: float = PARITY_ATOL) -> dict[str, Any]:
    """Export a checkpoint's model to TorchScript or ONNX, check it against PyTorch, write the sidecar.

    Args:
        checkpoint: a `best_model.pt` or `last.pt` from `audioshard train`.
        fmt: "onnx" or "torchscript".
        out: the file to write; the sidecar goes to `sidecar_path(out)` (OUT.json).
        atol: largest absolute logit difference accepted between the export and PyTorch.

    Returns:
        The sidecar's contents.

    Raises:
        ExportError: unknown format, missing ONNX packages, or an export that does not match PyTorch.
        CheckpointError: unreadable checkpoint.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    card = read_checkpoint(checkpoint)
    model = card.model().cpu().eval()
    params = card.features
    out.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 1, *params.shape, generator=generator)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        run = _export_torchscript(model, tmp) if fmt == "torchscript" else _export_onnx(model, example, tmp)
        # A batch size other than the example's: proves the batch axis is dynamic.
        check = torch.randn(5, 1, *params.shape, generator=generator)
        with torch.inference_mode():
            expected = model(check).numpy()
        got = run(check.numpy())
        if got.shape != expected.shape:
            raise ExportError(f"the {fmt} export returned shape {got.shape} for a batch of 5, "
                              f"expected {expected.shape}")
        parity = float(np.abs(got - expected).max())
        if not parity <= atol:
            raise ExportError(f"the {fmt} export differs from PyTorch by up to {parity:.3g} (allowed {atol:g})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    info = describe(card, fmt, parity)
    info["checkpoint"] = str(checkpoint)
    sidecar_path(out).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info
