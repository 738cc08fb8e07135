"""Export a trained model: safetensors to share it, ONNX or TorchScript to run it without audioshard.

    audioshard export --checkpoint runs/first/best_model.pt --format safetensors --out model.safetensors
    audioshard export --checkpoint runs/first/best_model.pt --format onnx --out model.onnx
    audioshard export --checkpoint runs/first/best_model.pt --format torchscript --out model.pt

safetensors (`audioshard.weights`): the weights in the format people exchange them in, plus a JSON
with everything else a checkpoint holds; `predict`, `evaluate` and `model.init_checkpoint` read the
pair as they read a checkpoint, with no pickle on the way.

The exported model takes normalised log-mel spectrograms, `mel: (batch, 1, n_mels, frames)` float32
(any batch size), and returns `logits: (batch, num_classes)`. `OUT.json` beside it says how to make
that input from audio (sample rate, chunking, mel parameters, normalisation) and names the classes.
Every export is loaded back and compared with the PyTorch model on a random batch before it is kept;
the largest difference is written into the sidecar.

ONNX goes through the exporter torch keeps (`torch.onnx.export(..., dynamo=True)`: the model is
captured by `torch.export` and translated by onnxscript), with the batch axis dynamic; it needs
`onnx`, `onnxscript` and, for the parity check, `onnxruntime`: `pip install -e '.[export]'`.
TorchScript is deprecated in torch (its warnings are shown, not hidden); it stays for programs that
load models with `torch.jit.load`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audioshard import __version__
from audioshard.checkpoint import Checkpoint, read_checkpoint
from audioshard.errors import AudioshardError
from audioshard.features import AMIN
from audioshard.names import EXPORT_FORMATS

ONNX_OPSET = 18  # the lowest the dynamo-based exporter writes
MAX_BATCH = 1 << 16  # the exported batch axis: 1..MAX_BATCH
PARITY_ATOL = 1e-4  # logits; float32 kernels differ between runtimes in the last bits only


class ExportError(AudioshardError, RuntimeError):
    """The model could not be exported, or the export does not reproduce the PyTorch outputs."""


def sidecar_path(out: str | Path) -> Path:
    """Where the JSON description of an export goes: `model.onnx` -> `model.onnx.json`."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def _export_torchscript(model: torch.nn.Module, out: Path) -> Any:
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
        import onnxscript  # noqa: F401 - what torch's exporter translates with
    except ImportError as exn:
        raise ExportError(f"ONNX export needs the onnx, onnxscript and onnxruntime packages ({exn.name} is "
                          "missing): pip install -e '.[export]'") from exn
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        torch.onnx.export(model, (example,), str(out), input_names=["mel"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, opset_version=ONNX_OPSET, dynamo=True, verbose=False,
                          external_data=False)
    except Exception as exn:
        raise ExportError(f"torch.onnx.export failed: {type(exn).__name__}: {exn}") from exn
    onnx.checker.check_model(str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"mel": x})[0]

    return run


def _export_safetensors(card: Checkpoint, out: Path) -> Any:
    """The weights and their JSON, read back the way `predict` reads them (no torch.load on the way)."""
    from audioshard.weights import save_safetensors

    save_safetensors(card, out)
    loaded = read_checkpoint(out).model().cpu().eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return loaded(torch.from_numpy(x)).numpy()

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
        **(_multilabel_output(card) if card.multilabel else {}),
    }


def _multilabel_output(card: Checkpoint) -> dict[str, Any]:
    """What a multi-label model's logits mean, and the per-class thresholds chosen on val."""
    return {"multilabel": True, "thresholds": list(card.thresholds),  # in `classes` order, as checkpoints hold them
            "output": {"name": "logits", "shape": ["batch", len(card.classes)], "dtype": "float32",
                       "meaning": "one score per class in `classes` order; sigmoid gives each class's probability; "
                                  "a recording's probabilities are the mean of its chunks', and a class is present "
                                  "where that is >= its threshold (`thresholds`, in `classes` order)"}}


def export_model(checkpoint: str | Path, fmt: str, out: str | Path, *, atol: float = PARITY_ATOL) -> dict[str, Any]:
    """Export a checkpoint's model, check it against PyTorch, write the sidecar.

    Args:
        checkpoint: a `best_model.pt` or `last.pt` from `audioshard train` (or a safetensors export).
        fmt: "safetensors", "onnx" or "torchscript".
        out: the file to write; the sidecar goes to `sidecar_path(out)` (OUT.json). For safetensors the
            sidecar is also what `predict` reads the weights with.
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
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # nothing half-written at `out`
    try:
        written = staging / ("model.safetensors" if fmt == "safetensors" else out.name)
        parity = _export_checked(card, model, fmt, written, atol)
        os.replace(written, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    info = describe(card, fmt, parity)
    info["checkpoint"] = str(checkpoint)
    if fmt == "safetensors":  # the sidecar is the model's description too: a checkpoint's records, no weights
        from audioshard.weights import card_record

        info = {**info, **card_record(card), "export": fmt}
    sidecar_path(out).write_text(json.dumps(info, indent=1, default=float) + "\n", encoding="utf-8")
    return info


def _export_checked(card: Checkpoint, model: torch.nn.Module, fmt: str, out: Path, atol: float) -> float:
    """Write the export to `out`, load it back and return its largest logit difference from PyTorch on a
    batch of another size than the example's (which proves the batch axis dynamic)."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 1, *card.features.shape, generator=generator)
    if fmt == "safetensors":
        run = _export_safetensors(card, out)
    else:
        run = _export_torchscript(model, out) if fmt == "torchscript" else _export_onnx(model, example, out)
    check = torch.randn(5, 1, *card.features.shape, generator=generator)
    with torch.inference_mode():
        expected = model(check).numpy()
    got = run(check.numpy())
    if got.shape != expected.shape:
        raise ExportError(f"the {fmt} export returned shape {got.shape} for a batch of 5, expected {expected.shape}")
    parity = float(np.abs(got - expected).max())
    if not parity <= atol:
        raise ExportError(f"the {fmt} export differs from PyTorch by up to {parity:.3g} (allowed {atol:g})")
    return parity
