"""Predict on new recordings: any file, any sample rate, any length, with exactly the training features.

    audioshard predict --checkpoint runs/first/best_model.pt recording.wav
    audioshard predict --checkpoint runs/first/best_model.pt field/ --format csv > predictions.csv
    audioshard predict --checkpoint runs/first/best_model.pt night.flac --per-chunk --plot night.png

Everything that decides what the model sees comes from the checkpoint: feature parameters
(`features`, the build's), normalisation (`normalization`, the train split's mean/std) and the
chunking rules (`config["audio"]`: `hop_seconds`, `min_fraction`, `short_clip`, `skip_silent`). Chunks
are cut as the build cut them (overlapping when `audio.hop_seconds` is below the chunk length, so the
timeline's rows overlap too). A recording's prediction is the softmax of the mean of its chunk logits,
silent chunks left out as the build left them out: the recording-level rule of `evaluate`.

Long recordings are streamed, never loaded whole (`audio.ChunkReader`: the same decoders, mono mix,
resampling and `ChunkRules` as the build), so chunks start at the same samples and hold the same
values as at build time. Chunks are gathered into batches of `batch_size` for the model. Memory is
bounded by one batch, whatever the recording's length (an hour of 48 kHz audio would be 690 MB as float32).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from audioshard import labels, multilabel
from audioshard.audio import AudioError, ChunkReader, silent_chunks
from audioshard.augment import BatchTransform
from audioshard.checkpoint import read_checkpoint
from audioshard.config import AudioConfig
from audioshard.csvsafe import cell
from audioshard.errors import AudioshardError
from audioshard.features import log_mel
from audioshard.models import MIN_ADAPT_EXAMPLES, adapt_batchnorm
from audioshard.names import PREDICT_FORMATS
from audioshard.termsafe import printable

FORMATS = PREDICT_FORMATS


class PredictError(AudioshardError, ValueError):
    """Prediction cannot start (no input files, a bad --plot target, an unusable checkpoint)."""


# --- the model ---------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One recording's prediction.

    Attributes:
        path: the recording, as given or found.
        classes: class names, in the model's output order.
        chunk_logits: (C, K) float32, one row per chunk.
        starts, ends: (C,) float64 seconds of each chunk (the last one may end early: zero padding).
        seconds: the recording's length (s).
        source_rate: the file's own sample rate (Hz).
        silent: (C,) bool, chunks below the build's `audio.silence_peak` (left out of the recording's
            prediction, as they were left out of the shards, unless every chunk is silent).
    """

    path: str
    classes: list[str]
    chunk_logits: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    seconds: float
    source_rate: int
    silent: np.ndarray | None = None
    thresholds: list[float] | None = None  # a multi-label model's, per class: then several classes may be present

    @property
    def probabilities(self) -> np.ndarray:
        """(K,) softmax of the mean logits of the chunks that are not silent (the recording-level rule of
        `evaluate`, over the chunks a build would have kept); for a multi-label model, the mean of the chunks'
        per-class probabilities (multilabel.per_recording's rule)."""
        heard = self.chunk_logits
        if self.silent is not None and not self.silent.all():
            heard = heard[~self.silent]
        if self.thresholds is not None:
            return multilabel.probabilities(heard).mean(axis=0)
        return _softmax(heard.mean(axis=0))

    @property
    def present(self) -> list[str]:
        """A multi-label model's answer: every class over its threshold, most probable first."""
        probs = self.probabilities
        over = [k for k in np.argsort(-probs) if probs[k] >= self.thresholds[k]] if self.thresholds else []
        return [self.classes[k] for k in over]

    @property
    def label(self) -> str:
        """The class (a multi-label model: the classes present joined by `;`, "-" for none)."""
        if self.thresholds is not None:
            return labels.SEPARATOR.join(self.present) or "-"
        return self.classes[int(np.argmax(self.probabilities))]

    @property
    def probability(self) -> float:
        return float(self.probabilities.max())

    @property
    def chunk_probabilities(self) -> np.ndarray:
        """(C, K) softmax of each chunk's logits (a multi-label model: each class's own probability)."""
        if self.thresholds is not None:
            return multilabel.probabilities(self.chunk_logits)
        return _softmax(self.chunk_logits)

    def to_dict(self, per_chunk: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.path, "class": self.label, "probability": round(self.probability, 6),
            "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, self.probabilities, strict=True)},
            "chunks": len(self.starts), "seconds": round(self.seconds, 3), "source_rate": self.source_rate}
        if self.thresholds is not None:
            out["present"] = self.present
        if per_chunk:
            probs = self.chunk_probabilities
            out["timeline"] = [
                {"start": round(float(s), 3), "end": round(float(e), 3), "class": self.classes[int(p.argmax())],
                 "probability": round(float(p.max()), 6),
                 "probabilities": {c: round(float(v), 6) for c, v in zip(self.classes, p, strict=True)}}
                for s, e, p in zip(self.starts, self.ends, probs, strict=True)]
        return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Predictor:
    """A checkpoint ready to predict: model, feature parameters, normalisation and chunking rules.

    Args:
        checkpoint: a `best_model.pt` or `last.pt` from `audioshard train`.
        device: "auto", "cpu", "cuda" or "mps".
        batch_size: chunks per forward pass (memory: about 1 MB per chunk of 2 s at 16 kHz, all told).
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto", batch_size: int = 64):
        from audioshard.distributed import pick_device

        if batch_size <= 0:
            raise PredictError(f"--batch-size must be > 0, got {batch_size}")
        card = read_checkpoint(checkpoint)  # schema checked: every field below is there
        self.classes, self.params, self.rules = card.classes, card.features, card.rules
        self.thresholds = card.thresholds  # a multi-label model's decision per class
        self.transform = BatchTransform(card.mean, card.std, augment=None)
        self.device = pick_device(device)
        self.model = card.model().to(self.device)
        self.checkpoint, self.batch_size = str(checkpoint), batch_size

    def chunks(self, path: str | Path) -> ChunkReader:
        """The recording's chunks at the checkpoint's rate and length, read in blocks."""
        return ChunkReader(path, self.rules)

    def batches(self, reader: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Regroup a reader's chunks (or several readers' in a row) into batches of `batch_size` (the last one smaller):
        (chunks: (B, chunk_samples) float32, starts: (B,) seconds)."""
        held: list[tuple[np.ndarray, np.ndarray]] = []
        count = 0
        for chunks, starts in reader:
            held.append((chunks, starts))
            count += len(chunks)
            while count >= self.batch_size:
                chunks, starts = np.concatenate([h[0] for h in held]), np.concatenate([h[1] for h in held])
                yield chunks[:self.batch_size], starts[:self.batch_size] / self.params.sample_rate
                held = [(chunks[self.batch_size:], starts[self.batch_size:])]
                count -= self.batch_size
        if count:
            yield np.concatenate([h[0] for h in held]), np.concatenate([h[1] for h in held]) / self.params.sample_rate

    def features(self, path: str | Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (mel: (B, n_mels, frames) float16 dB, starts: (B,) seconds) per batch: what the shards hold."""
        for chunks, starts in self.batches(self.chunks(path)):
            yield log_mel(chunks, self.params), starts

    def model_input(self, mel: np.ndarray) -> torch.Tensor:
        """(C, n_mels, frames) float16 dB -> (C, 1, n_mels, frames) float32 on the device, normalised as in training."""
        return self.transform.normalize(torch.from_numpy(mel).unsqueeze(1).to(self.device))

    def adapt(self, paths: Sequence[str | Path]) -> int:
        """Re-estimate the model's BatchNorm statistics on the chunks of these recordings (no labels:
        `adapt_batchnorm`), in batches of `batch_size` pooled across files. Files that cannot be decoded
        are passed over here (the prediction pass reports them). Returns the number of chunks used.

        Raises:
            PredictError: fewer than MIN_ADAPT_EXAMPLES chunks. AdaptError: the model has no BatchNorm.
        """
        def every_chunk() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for path in paths:
                try:
                    yield from self.chunks(path)
                except Exception:  # noqa: BLE001, S112 - reported with its reason by the prediction pass
                    continue

        inputs = (self.model_input(log_mel(chunks, self.params)) for chunks, _ in self.batches(every_chunk()))
        seen = adapt_batchnorm(self.model, inputs) if paths else 0
        if seen < MIN_ADAPT_EXAMPLES:
            raise PredictError(f"--adapt needs at least {MIN_ADAPT_EXAMPLES} chunks of new recordings (a mix of "
                               f"classes) to measure their statistics; these give {seen}. Give more recordings, "
                               "or predict without --adapt")
        return seen

    @torch.inference_mode()
    def logits(self, mel: np.ndarray) -> np.ndarray:
        """(C, n_mels, frames) float16 dB -> (C, K) float32 logits (normalised as in training)."""
        x = self.model_input(mel)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(x)
        return out.float().cpu().numpy()

    def predict_file(self, path: str | Path) -> Prediction:
        """Predict one recording, streaming it in blocks.

        Raises:
            AudioError: the file cannot be decoded, or gives no chunk (see `audio.short_clip`).
        """
        reader = self.chunks(path)
        logits, starts, silent = [], [], []
        for chunks, batch_starts in self.batches(reader):
            logits.append(self.logits(log_mel(chunks, self.params)))
            starts.append(batch_starts)
            silent.append(silent_chunks(chunks, self.rules.silence_peak))
        start_s = np.concatenate(starts)
        seconds = reader.num_samples / self.params.sample_rate
        ends = np.minimum(start_s + self.params.chunk_seconds, max(seconds, 0.0))
        return Prediction(str(path), self.classes, np.concatenate(logits), start_s, ends, seconds,
                          int(reader.source_rate or 0), np.concatenate(silent), self.thresholds)


# --- files, output and plots -------------------------------------------------------------------


def find_audio(inputs: Sequence[str | Path], extensions: Iterable[str]) -> list[Path]:
    """Files named directly (any extension), plus the audio files under named folders (recursive, sorted,
    hidden files and folders left out). Paths that do not exist are returned too and fail when read."""
    extensions = {e.lower() for e in extensions}
    found: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in extensions
                                and not any(part.startswith(".") for part in p.relative_to(item).parts)))
        else:
            found.append(item)
    return found


def plot_timeline(pred: Prediction, out: str | Path) -> Path:
    """A PNG of each class's chunk probability over the recording (a step per chunk)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from audioshard.evaluate import PLAIN_TEXT

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    minutes = pred.seconds > 600
    scale = 60.0 if minutes else 1.0
    edges = np.append(pred.starts, pred.ends[-1]) / scale
    probs = pred.chunk_probabilities
    if pred.thresholds is not None:
        return _plot_rows(pred, probs, edges, minutes, out)
    fig, ax = plt.subplots(figsize=(min(20.0, 6.0 + len(pred.starts) / 60), 3.5))
    lines = [ax.stairs(probs[:, k], edges, baseline=None, linewidth=1.2) for k in range(len(pred.classes))]
    ax.set_ylim(0, 1.02)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("time (min)" if minutes else "time (s)")
    ax.set_ylabel("probability")
    ax.set_title(f"{Path(pred.path).name[:80]}: {pred.label[:40]} ({pred.probability:.2f}), {len(pred.starts)} chunks",
                 fontsize=10, **PLAIN_TEXT)
    # Handles and labels given together: a name starting with "_" is shown too (matplotlib hides such labels)
    legend = ax.legend(lines, [name[:40] for name in pred.classes], loc="upper right", fontsize=8,
                       ncol=min(len(pred.classes), 6))
    for text in legend.get_texts():
        text.update(PLAIN_TEXT)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


MAX_ROWS = 40  # timeline rows drawn for a multi-label model (the most probable classes first)


def _plot_rows(pred: Prediction, probs: np.ndarray, edges: np.ndarray, minutes: bool, out: Path) -> Path:
    """A multi-label timeline: one row per class (its probability per chunk, its threshold dashed), so that
    sounds present at the same time are seen at once."""
    import matplotlib.pyplot as plt

    from audioshard.evaluate import PLAIN_TEXT

    order = list(np.argsort(-pred.probabilities)[:MAX_ROWS])
    fig, axes = plt.subplots(len(order), 1, sharex=True, squeeze=False,
                             figsize=(min(20.0, 6.0 + len(pred.starts) / 60), 0.9 * len(order) + 1.2))
    for ax, k in zip(axes[:, 0], order, strict=True):
        ax.stairs(probs[:, k], edges, baseline=0, fill=True, alpha=0.6)
        ax.axhline(pred.thresholds[k], linestyle="--", linewidth=0.8, color="black")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(pred.classes[k][:20], rotation=0, ha="right", fontsize=8, **PLAIN_TEXT)
        ax.set_yticks([])
    axes[-1, 0].set_xlim(edges[0], edges[-1])
    axes[-1, 0].set_xlabel("time (min)" if minutes else "time (s)")
    axes[0, 0].set_title(f"{Path(pred.path).name[:80]}: {pred.label[:80]}", fontsize=10, **PLAIN_TEXT)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _plot_paths(files: list[Path], plot: Path) -> dict[Path, Path]:
    """One PNG per file: `plot` itself for a single file named *.png, otherwise files inside folder `plot`."""
    if plot.suffix.lower() == ".png":
        if len(files) > 1:
            raise PredictError(f"--plot {plot} names one PNG, but there are {len(files)} files; give a folder")
        return {files[0]: plot}
    if plot.exists() and not plot.is_dir():
        raise PredictError(f"--plot {plot}: exists and is not a folder; give a folder or a .png file")
    out: dict[Path, Path] = {}
    used: set[str] = set()
    absolute = [Path(os.path.abspath(path)) for path in files]  # no resolve(): links stay named as given
    common = Path(os.path.commonpath([path.parent for path in absolute]))
    for path, full in zip(files, absolute, strict=True):
        stem = "_".join(full.relative_to(common).with_suffix("").parts) or "recording"
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        out[path] = plot / f"{name}.png"
    return out


@dataclass
class PredictSummary:
    """What `predict_files` did: predictions made, and files that failed with their reasons."""

    predictions: list[Prediction] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    adapted: int = 0  # chunks the model's statistics were adapted on (0: not adapted)


class _Writer:
    """Writes results as they come (table, csv) or at the end (json)."""

    def __init__(self, fmt: str, classes: list[str], per_chunk: bool, out: TextIO, name_width: int,
                 multilabel: bool = False):
        self.fmt, self.classes, self.per_chunk, self.out = fmt, classes, per_chunk, out
        self.width = max(4, min(name_width, 60))
        self.shown = [printable(c) for c in classes]  # names for the table: control characters made visible
        # a multi-label answer may name every class: wide enough for all of them, up to a point
        self.class_width = min(40, len(";".join(self.shown))) if multilabel else max(5, *(len(c) for c in self.shown))
        self.csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        self.records: list[dict[str, Any]] = []

    def header(self) -> None:
        probs = [f"p_{c}" for c in self.classes]
        if self.csv is not None:
            self.csv.writerow(["file", "start", "end", "class", "probability", *probs] if self.per_chunk else
                              ["file", "class", "probability", *probs, "chunks", "seconds"])
        elif self.fmt == "table":
            cw = self.class_width
            cols = "  ".join(f"{c[:8]:>8}" for c in self.shown)
            print(f"{'file':<{self.width}}  {'class':<{cw}}  {'prob':>5}  {cols}  {'chunks':>6}  {'seconds':>8}",
                  file=self.out)

    def write(self, pred: Prediction) -> None:
        if self.fmt == "json":
            self.records.append(pred.to_dict(self.per_chunk))
            return
        probs = pred.probabilities
        if self.csv is not None:
            if self.per_chunk:
                for s, e, p in zip(pred.starts, pred.ends, pred.chunk_probabilities, strict=True):
                    # class names and paths as text, never a spreadsheet formula (the header's start with "p_")
                    self.csv.writerow([cell(pred.path), f"{s:.3f}", f"{e:.3f}", cell(self.classes[int(p.argmax())]),
                                       f"{p.max():.6f}", *(f"{v:.6f}" for v in p)])
            else:
                self.csv.writerow([cell(pred.path), cell(pred.label), f"{pred.probability:.6f}",
                                   *(f"{v:.6f}" for v in probs),
                                   len(pred.starts), f"{pred.seconds:.3f}"])
            self.out.flush()
            return
        cw, shown = self.class_width, printable(pred.path)
        name = shown if len(shown) <= self.width else "..." + shown[-(self.width - 3):]
        cols = "  ".join(f"{v:>8.3f}" for v in probs)
        label = printable(pred.label)  # a multi-label model's: every class present
        print(f"{name:<{self.width}}  {label:<{cw}}  {pred.probability:>5.2f}  {cols}  {len(pred.starts):>6}  "
              f"{pred.seconds:>8.1f}", file=self.out)
        if self.per_chunk:
            print(f"    {'start':>9}  {'end':>9}  {'class':<{cw}}  {'prob':>5}", file=self.out)
            for s, e, p in zip(pred.starts, pred.ends, pred.chunk_probabilities, strict=True):
                print(f"    {s:>9.2f}  {e:>9.2f}  {self.shown[int(p.argmax())]:<{cw}}  {p.max():>5.2f}",
                      file=self.out)
        self.out.flush()

    def close(self, checkpoint: str, failed: list[dict[str, str]], adapted: int) -> None:
        if self.fmt == "json":
            json.dump({"checkpoint": checkpoint, "classes": self.classes, "adapted_on_chunks": adapted,
                       "files": self.records, "failed": failed}, self.out, indent=1)
            self.out.write("\n")


def predict_files(checkpoint: str | Path, inputs: Sequence[str | Path], fmt: str = "table", per_chunk: bool = False,
                  plot: str | Path | None = None, batch_size: int = 64, device: str = "auto",
                  extensions: Iterable[str] | None = None, out: TextIO | None = None,
                  err: TextIO | None = None, adapt: bool = False) -> PredictSummary:
    """Predict every recording in `inputs` and write the results as they come.

    Args:
        checkpoint: a `best_model.pt` from `audioshard train`.
        inputs: files (any extension) and folders (searched recursively for `extensions`).
        fmt: "table" (for people), "csv" (one row per file, or per chunk with `per_chunk`) or "json" (one
            document: {"checkpoint", "classes", "files": [...], "failed": [{"file", "reason"}]}).
        per_chunk: add each chunk's start, end (s), class and probability.
        plot: a .png (one file) or a folder (one PNG per file) for probability-over-time plots.
        batch_size: chunks per forward pass.
        device: "auto", "cpu", "cuda" or "mps".
        extensions: audio extensions for folders (default: the config's `audio.extensions`).
        out, err: where results and failures go (default stdout, stderr).
        adapt: first re-estimate the model's BatchNorm statistics on all the input recordings (no labels):
            for a batch of recordings from a new speaker, microphone or site, a mix of classes
            (`Predictor.adapt`). Every file is then decoded twice.

    Returns:
        A PredictSummary. A file that cannot be decoded is reported on `err` and counted, never fatal.

    Raises:
        PredictError: no input files, a bad format or --plot target. CheckpointError: unusable checkpoint.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if fmt not in FORMATS:
        raise PredictError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    files = find_audio(inputs, extensions if extensions is not None else AudioConfig().extensions)
    if not files:
        raise PredictError(f"no audio files in {', '.join(str(i) for i in inputs)} (extensions: "
                           f"{', '.join(sorted(extensions if extensions is not None else AudioConfig().extensions))})")
    plots = _plot_paths(files, Path(plot)) if plot is not None else {}
    predictor = Predictor(checkpoint, device=device, batch_size=batch_size)
    summary = PredictSummary()
    if adapt:
        summary.adapted = predictor.adapt(files)
        print(f"audioshard predict: BatchNorm statistics adapted on {summary.adapted} chunks of these recordings",
              file=err)
    writer = _Writer(fmt, predictor.classes, per_chunk, out, max(len(printable(f)) for f in files),
                     multilabel=predictor.thresholds is not None)
    writer.header()
    for path in files:
        try:
            pred = predictor.predict_file(path)
        except Exception as exn:  # noqa: BLE001 - one odd file (or a decoder bug on it) must not end the run
            reason = (str(exn).removeprefix(f"{path}: ") if isinstance(exn, AudioError)
                      else f"could not be decoded ({type(exn).__name__}: {exn})")
            summary.failed.append({"file": str(path), "reason": reason})
            print(f"audioshard predict: skipped {printable(path)}: {printable(reason)}", file=err)
            continue
        summary.predictions.append(pred)
        writer.write(pred)
        if path in plots:
            try:
                summary.plots.append(plot_timeline(pred, plots[path]))
            except Exception as exn:  # noqa: BLE001 - the prediction is printed already; the picture is extra
                import matplotlib.pyplot as plt

                plt.close("all")
                print(f"audioshard predict: {printable(plots[path])} not drawn ({type(exn).__name__}: "
                      f"{printable(str(exn)[:300])})", file=err)
    writer.close(predictor.checkpoint, summary.failed, summary.adapted)
    if summary.failed:
        print(f"audioshard predict: {len(summary.predictions)} of {len(files)} files predicted, "
              f"{len(summary.failed)} could not be read", file=err)
    return summary

