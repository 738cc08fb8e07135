"""Evaluate a model on one split: chunk-level and recording-level figures, reports and plots.

    audioshard evaluate --checkpoint runs/x/best_model.pt --shards shards/ --split test --out runs/x/eval

Recording-level ("clip") figures average the logits of all chunks of one source recording: one
long recording cut into many chunks would otherwise sway chunk-level figures by its size alone.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, classification_report, confusion_matrix, f1_score

from audioshard import multilabel
from audioshard.augment import BatchTransform
from audioshard.distributed import all_gather
from audioshard.loader import make_loader
from audioshard.manifest import Manifest
from audioshard.models import MIN_ADAPT_EXAMPLES, AdaptError, adapt_batchnorm
from audioshard.shardfile import ShardDataError
from audioshard.stream import ShardStream
from audioshard.termsafe import printable


@torch.inference_mode()
def predict_split(model: torch.nn.Module, manifest: Manifest, split: str, device: torch.device,
                  batch_size: int = 256, num_workers: int = 0, strict: bool = False) -> dict[str, Any]:
    """Logits for every chunk of a split (this rank's part under DDP, gathered to all ranks).

    Returns:
        {"logits": (N, C) float32, "y": (N,), "source": (N,), "start": (N,)}, sorted by (source, start)
        so that the order does not depend on workers or ranks, and "skipped_blocks" (int, all ranks).
    """
    transform = BatchTransform(manifest.mean, manifest.std, augment=None)
    stream = ShardStream(manifest, split, batch_size, strict=strict)
    loader = make_loader(stream, num_workers=num_workers)
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {"logits": [], "y": [], "source": [], "start": []}
    for batch in loader:
        batch = transform(batch._replace(x=batch.x.to(device, non_blocking=True)))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch.x)
        parts["logits"].append(logits.float().cpu().numpy())
        for key in ("y", "source", "start"):
            parts[key].append(getattr(batch, key).numpy())
    model.train(was_training)
    classes = len(manifest.classes)
    out = {k: np.concatenate(v) if v else np.zeros((0, classes) if k == "logits" else 0) for k, v in parts.items()}
    skipped = stream.skipped_blocks
    gathered = all_gather((out, skipped))  # every rank's share (one item in a single process)
    if len(gathered) > 1:
        out = {k: np.concatenate([g[0][k] for g in gathered]) for k in out}
        skipped = sum(g[1] for g in gathered)
    if not len(out["y"]) and manifest.samples(split):  # every rank agrees: the counts are gathered
        raise ShardDataError(f"nothing readable in the {split} split of {manifest.root}: {skipped} bad blocks or "
                             f"shards skipped (the lines above say why); check them with `audioshard verify "
                             f"{manifest.root}`")
    order = np.lexsort((out["start"], out["source"]))
    return {**{k: v[order] for k, v in out.items()}, "skipped_blocks": skipped}


def clip_level(logits: np.ndarray, y: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean logits per source recording -> (clip_logits (R, C), clip_y (R,), source ids (R,))."""
    ids, inverse = np.unique(source, return_inverse=True)
    sums = np.zeros((len(ids), logits.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, logits)
    counts = np.bincount(inverse, minlength=len(ids))[:, None]
    clip_y = np.zeros(len(ids), dtype=np.int64)
    clip_y[inverse] = y  # every chunk of a recording has the recording's label
    return sums / counts, clip_y, ids


def scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    if len(y_true) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "balanced_accuracy": float("nan"), "n": 0}
    labels = list(range(num_classes))
    majority = np.bincount(y_true, minlength=num_classes).max() / len(y_true)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "majority_baseline": float(majority),
        "n": int(len(y_true)),
    }


def summarize(pred: dict[str, np.ndarray], classes: list[str], loss: float | None = None,
              thresholds: list[float] | None = None) -> dict[str, Any]:
    """Chunk-level and recording-level metrics of a `predict_split` result (a multi-label build's: mAP, AP and
    F1 per class at `thresholds`, see multilabel.py)."""
    y, logits = pred["y"], pred["logits"]
    if y.ndim == 2:
        return multilabel.summarize(pred, classes, thresholds, loss)
    chunk = scores(y, logits.argmax(1) if len(y) else y, len(classes))
    clip_logits, clip_y, _ = clip_level(logits, y, pred["source"])
    clip = scores(clip_y, clip_logits.argmax(1) if len(clip_y) else clip_y, len(classes))
    result = {"chunk": chunk, "clip": clip, "skipped_blocks": int(pred.get("skipped_blocks", 0))}
    if loss is not None:
        result["loss"] = loss
    return result


MAX_ANNOTATED, MAX_TICKS, MAX_FIGURE_INCHES = 40, 100, 20.0
# Names and titles drawn as the text they are: matplotlib otherwise reads `$...$` as math (a bad formula in a class
# or file name raised at savefig) and, with text.usetex on in a user's matplotlibrc, hands the text to LaTeX.
PLAIN_TEXT = {"parse_math": False, "usetex": False}


def save_confusion_matrix(path: Path, y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    n = len(classes)
    # Bounded for any class count: the figure stops growing at MAX_FIGURE_INCHES, cells get their count
    # written only up to MAX_ANNOTATED classes and tick labels only up to MAX_TICKS (every k-th beyond):
    # one text object per cell made many classes take minutes and gigabytes (docs/reliability.md).
    size = min(MAX_FIGURE_INCHES, max(4.0, 0.6 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    ticks = range(0, n, max(1, -(-n // MAX_TICKS)))
    names = [classes[i][:40] for i in ticks]  # a class name can be any length
    ax.set_xticks(ticks, names, rotation=45 if n <= MAX_ANNOTATED else 90, ha="right",
                  fontsize=None if n <= MAX_ANNOTATED else 5, **PLAIN_TEXT)
    ax.set_yticks(ticks, names, fontsize=None if n <= MAX_ANNOTATED else 5, **PLAIN_TEXT)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title if n <= MAX_ANNOTATED else f"{title}; {n} classes, counts in {Path(path).stem}.csv",
                 **PLAIN_TEXT)
    if n <= MAX_ANNOTATED:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    else:  # the counts themselves, where a picture cannot show them
        np.savetxt(Path(path).with_suffix(".csv"), matrix, fmt="%d", delimiter=",")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(out_dir: Path, split: str, pred: dict[str, np.ndarray], classes: list[str],
                  label_prefix: str = "", recordings: Sequence[str] | None = None,
                  thresholds: list[float] | None = None) -> dict[str, Any]:
    """The files a run writes for one split: label arrays, confusion matrix PNG, text report; returns metrics.

    Files: {label_prefix}pred_labels.npy, {label_prefix}true_labels.npy (chunk level, sorted by
    source and start), {split}_predictions.npz (logits, y, source, start), {split}_confusion_matrix.png,
    {split}_report.txt (chunk- and recording-level) and, given the split's `recordings` (names by source
    index: `manifest.sources(split)`), {split}_recordings.csv: one row per recording, named.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if pred["y"].ndim == 2:
        return _write_multilabel(out_dir, split, pred, classes, label_prefix, thresholds)
    y, y_hat = pred["y"], pred["logits"].argmax(1)
    np.save(out_dir / f"{label_prefix}pred_labels.npy", y_hat.astype(np.int64), allow_pickle=False)
    np.save(out_dir / f"{label_prefix}true_labels.npy", y.astype(np.int64), allow_pickle=False)
    # every chunk's logits and where it comes from: what `audioshard report` draws the page from
    np.savez(out_dir / f"{split}_predictions.npz", logits=pred["logits"].astype(np.float32), y=y,
             source=pred["source"], start=pred["start"])
    clip_logits, clip_y, _ = clip_level(pred["logits"], y, pred["source"])
    clip_hat = clip_logits.argmax(1)
    metrics = summarize(pred, classes)
    labels = list(range(len(classes)))
    report = [
        f"{split} split: {len(y)} chunks from {len(clip_y)} recordings",
        "",
        "Chunk level (each chunk on its own):",
        classification_report(y, y_hat, labels=labels, target_names=classes, digits=3, zero_division=0),
        "Recording level (mean of the chunk logits of each source recording):",
        classification_report(clip_y, clip_hat, labels=labels, target_names=classes, digits=3, zero_division=0),
        f"majority-class baseline (chunk level): {metrics['chunk']['majority_baseline']:.3f}",
    ]
    (out_dir / f"{split}_report.txt").write_text("\n".join(report) + "\n", encoding="utf-8")
    if recordings is not None:
        _write_named(out_dir / f"{split}_recordings.csv", pred, classes, recordings)
    image = out_dir / f"{split}_confusion_matrix.png"
    draw(image, save_confusion_matrix, image, y, y_hat, classes,
         f"{split}: chunk-level (acc {metrics['chunk']['accuracy']:.3f})")
    return metrics


def _write_multilabel(out_dir: Path, split: str, pred: dict[str, np.ndarray], classes: list[str], label_prefix: str,
                      thresholds: list[float] | None) -> dict[str, Any]:
    """A multi-label split's files: multi-hot true and predicted labels (at the thresholds), the predictions
    and the per-class report. No confusion matrix: with several classes per chunk there is no one cell to count."""
    metrics = summarize(pred, classes, thresholds=thresholds)
    decided = multilabel.probabilities(pred["logits"]) >= np.asarray(metrics["chunk"]["thresholds"])[None, :]
    np.save(out_dir / f"{label_prefix}pred_labels.npy", decided.astype(np.int64), allow_pickle=False)
    np.save(out_dir / f"{label_prefix}true_labels.npy", pred["y"].astype(np.int64), allow_pickle=False)
    np.savez(out_dir / f"{split}_predictions.npz", logits=pred["logits"].astype(np.float32), y=pred["y"],
             source=pred["source"], start=pred["start"])
    text = f"{split} split (multi-label): {len(pred['y'])} chunks\n\n" + multilabel.report_text(metrics, classes)
    (out_dir / f"{split}_report.txt").write_text(text, encoding="utf-8")
    return metrics


def recording_table(pred: dict[str, np.ndarray], classes: list[str], recordings: Sequence[str]):
    """One row per recording of a `predict_split` result (a pandas DataFrame): `recording` (its path as built),
    `true`, `predicted`, `confidence` (softmax of the mean chunk logits, the recording-level rule), `correct`,
    `chunks` and `chunks_agreeing` (chunks whose own argmax is the recording's prediction), worst first."""
    import pandas as pd

    clip_logits, clip_y, ids = clip_level(pred["logits"], pred["y"], pred["source"])
    z = np.exp(clip_logits - clip_logits.max(1, keepdims=True))
    probabilities = z / z.sum(1, keepdims=True)
    predicted = clip_logits.argmax(1)
    _, inverse, counts = np.unique(pred["source"], return_inverse=True, return_counts=True)
    agreeing = np.bincount(inverse, weights=pred["logits"].argmax(1) == predicted[inverse], minlength=len(ids))
    table = pd.DataFrame({"recording": [recordings[int(i)] for i in ids], "true": [classes[c] for c in clip_y],
                          "predicted": [classes[c] for c in predicted],
                          "confidence": probabilities[np.arange(len(ids)), predicted].round(4),
                          "correct": predicted == clip_y, "chunks": counts, "chunks_agreeing": agreeing.astype(int)})
    return table.sort_values(["correct", "confidence"], ascending=[True, False], kind="stable", ignore_index=True)


def _write_named(path: Path, pred: dict[str, np.ndarray], classes: list[str], recordings: Sequence[str]) -> None:
    """{split}_recordings.csv, when the build's recording list can be read: the names are extra (a build copied
    without its list files still trains and evaluates); a list that cannot be read is reported, never fatal."""
    from audioshard.errors import AudioshardError

    try:
        write_recordings_csv(path, recording_table(pred, classes, recordings))
    except (AudioshardError, OSError) as exn:
        print(f"note: {path.name} not written: the build's recording names cannot be read "
              f"({printable(exn)})", file=sys.stderr)


def write_recordings_csv(path: Path, table) -> None:
    """The table as CSV, names written as text a spreadsheet never runs as a formula (`csvsafe`)."""
    from audioshard.csvsafe import cell

    safe = table.copy()
    for column in ("recording", "true", "predicted"):
        safe[column] = safe[column].map(cell)
    safe.to_csv(path, index=False)


def predictions_frame(run_dir: str | Path, split: str = "val", shards: str | None = None):
    """One row per recording of a run's (or an evaluation's) saved predictions, as a pandas DataFrame
    (`recording_table`): names exactly as built, from `{split}_predictions.npz` (checked as `report` checks
    it) and the build's recording list (`shards`, default: the build metrics.json names)."""
    from audioshard.manifest import load_manifest
    from audioshard.report import read_metrics, read_predictions

    run = Path(run_dir)
    manifest = load_manifest(shards or read_metrics(run / "metrics.json").get("shards") or "")
    return recording_table(read_predictions(run, split, manifest), manifest.classes, manifest.sources(split))


def draw(path: Path, plot: Callable[..., Any], *args: Any) -> bool:
    """`plot(*args)`, which draws `path`, called after the results it shows are saved: a picture that cannot be
    drawn (a font, a renderer, a name matplotlib refuses) is reported on stderr and costs nothing else. Returns
    whether it was drawn."""
    try:
        plot(*args)
    except Exception as exn:  # noqa: BLE001 - the numbers are written already; the picture is extra
        import matplotlib.pyplot as plt

        plt.close("all")
        print(f"note: {printable(path)} not drawn ({type(exn).__name__}: {printable(str(exn)[:300])}); the results it "
              "would show are in the files beside it", file=sys.stderr)
        return False
    return True


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=float) + "\n", encoding="utf-8")


@torch.no_grad()
def adapt_to_split(model: torch.nn.Module, manifest: Manifest, split: str, device: torch.device,
                   batch_size: int = 64, strict: bool = False) -> int:
    """`adapt_batchnorm` on every chunk of a split (labels unused); returns the chunk count.

    For a split that is new data from one place, speaker or device (a speaker-independent test
    speaker): what `predict --adapt` does with a folder of new recordings."""
    transform = BatchTransform(manifest.mean, manifest.std, augment=None)
    stream = ShardStream(manifest, split, batch_size, strict=strict)
    seen = adapt_batchnorm(model, (transform(b._replace(x=b.x.to(device))).x for b in make_loader(stream)))
    if seen < MIN_ADAPT_EXAMPLES:
        raise AdaptError(f"split {split!r} has {seen} chunks; adapting the model's statistics needs at least "
                         f"{MIN_ADAPT_EXAMPLES} (a mix of classes). Evaluate without --adapt")
    return seen


def evaluate_checkpoint(checkpoint: str | Path, shards: str, split: str, out_dir: str | Path,
                        device_name: str = "auto", batch_size: int = 256, num_workers: int = 0,
                        fetcher=None, strict: bool = False, adapt: bool = False) -> dict[str, Any]:
    """Evaluate a saved checkpoint on one split of a build; writes reports into `out_dir`.

    With `adapt`, the model's BatchNorm statistics are first re-estimated on the split's own chunks
    (unlabelled: `adapt_to_split`); metrics.json then says `"adapted": N chunks`."""
    from audioshard.checkpoint import check_compatible, read_checkpoint
    from audioshard.distributed import pick_device
    from audioshard.manifest import load_manifest

    device = pick_device(device_name)
    card = read_checkpoint(checkpoint)
    manifest = load_manifest(shards, fetcher) if fetcher else load_manifest(shards)
    check_compatible(card, manifest, str(checkpoint))
    model = card.model().to(device)
    adapted = adapt_to_split(model, manifest, split, device, strict=strict) if adapt else 0
    pred = predict_split(model, manifest, split, device, batch_size=batch_size, num_workers=num_workers,
                         strict=strict)
    out_dir = Path(out_dir)
    metrics = write_reports(out_dir, split, pred, manifest.classes, recordings=manifest.sources(split),
                            thresholds=card.thresholds)
    metrics.update({"split": split, "checkpoint": str(checkpoint), "shards": str(shards), "adapted": adapted})
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def iter_metrics_lines(metrics: dict[str, Any]) -> Iterable[str]:
    for level in ("chunk", "clip"):
        m = metrics[level]
        if metrics.get("multilabel"):
            yield (f"{level:>5}-level: mAP {m['mAP']:.3f}  micro-F1 {m['micro_f1']:.3f}  macro-F1 {m['macro_f1']:.3f}"
                   f"  (n={m['n']})")
            continue
        yield (f"{level:>5}-level: accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  "
               f"balanced acc {m['balanced_accuracy']:.3f}  (n={m['n']})")
