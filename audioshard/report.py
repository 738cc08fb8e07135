"""One page about a run: `RUN/report.html`, self-contained (images inline, no network).

    audioshard report runs/first                  # (re)write runs/first/report.html
    audioshard report runs/first --shards URL     # when the build has moved since training

`train` writes it at the end; this rewrites it from what the run folder holds (metrics.json,
history.jsonl, config.toml, best_model.pt, the saved predictions of val and test) and the build
(class counts, audio hours, skipped inputs, and the spectrograms of the recordings the model gets
most wrong). Drawing stays cheap for any class count: beyond MAX_ANNOTATED classes the confusion
matrix becomes a table of the most confused pairs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from audioshard.errors import AudioshardError
from audioshard.evaluate import MAX_ANNOTATED, clip_level
from audioshard.manifest import Manifest, load_manifest
from audioshard.names import SPLITS
from audioshard.stream import ShardStream

WORST = 12  # recordings shown with their spectrogram
CONFUSED_PAIRS = 25  # rows of the most-confused table (many classes)


class ReportError(AudioshardError, ValueError):
    """The run folder lacks what the report is made from."""


def write_report(run_dir: str | Path, shards: str | None = None, fetcher=None) -> Path:
    """Write `run_dir/report.html`; `shards` overrides the build location saved in metrics.json; `fetcher`
    (an `audioshard.remote.Fetcher`: cache, timeouts, retries) reads a remote build as `train` did.

    Raises:
        ReportError: metrics.json or a *_predictions.npz is not what `train` writes, or the build's classes
            are not the run's (`--shards` naming another build).
    """
    run = Path(run_dir)
    metrics = read_metrics(run / "metrics.json")
    where = shards or metrics.get("shards") or ""
    manifest = load_manifest(where, fetcher) if fetcher else load_manifest(where)
    classes = manifest.classes
    _check_same_build(run, metrics, manifest)
    body = [_header(run, metrics), _data_section(manifest), _settings_section(run), _curves_section(run, metrics)]
    if manifest.multilabel:  # per-class figures from metrics.json; no confusion or single "wrong" class to show
        body += [_multilabel_section(s, metrics[s], classes) for s in ("val", "test") if s in metrics]
    else:
        preds = {s: read_predictions(run, s, manifest) for s in ("val", "test")
                 if (run / f"{s}_predictions.npz").exists()}
        body += [*[_split_section(run, s, p, classes) for s, p in preds.items()],
                 _worst_section(manifest, preds, classes)]
    page = PAGE.format(title=html.escape(f"audioshard run {run.name}"), body="\n".join(body))
    out = run / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


MAX_METRICS_BYTES = 16 << 20  # metrics.json of a run is a few KB (classes included)
MAX_PREDICTION_BYTES = 1 << 30  # a split's saved logits: 1 GiB is ~2.7 M chunks of 100 classes


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json, size-capped and checked value by value (ReportError when it is not what `train`
    wrote); also read by `evaluate.predictions_frame`."""
    try:
        with open(path, "rb") as stream:
            text = stream.read(MAX_METRICS_BYTES + 1)
        if len(text) > MAX_METRICS_BYTES:
            raise ValueError(f"larger than {MAX_METRICS_BYTES >> 20} MB")
        metrics = json.loads(text)
    except (OSError, ValueError, RecursionError) as exn:
        raise ReportError(f"{path}: cannot read it ({exn}); is this a finished `audioshard train` run folder?") from exn
    if problem := _metrics_problem(metrics):
        raise ReportError(f"{path}: {problem}; it is not what `audioshard train` writes. Train again, or evaluate "
                          "the checkpoint with `audioshard evaluate`")
    return metrics


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _metrics_problem(metrics: Any) -> str:
    """What in metrics.json the page cannot use ('' when nothing): each value it shows, checked for its type."""
    if not isinstance(metrics, dict):
        return "expected a JSON object"
    for key in ("device", "shards"):
        if key in metrics and not isinstance(metrics[key], str):
            return f"{key!r} must be a string"
    for key in ("epochs", "best_epoch"):
        if key in metrics and not (type(metrics[key]) is int and metrics[key] >= 0):
            return f"{key!r} must be a count"
    for key in ("train_seconds", "seconds_per_epoch"):
        if key in metrics and not (_is_number(metrics[key]) and metrics[key] >= 0):
            return f"{key!r} must be a number of seconds"
    classes = metrics.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        return "'classes' must be a list of names"
    for split in ("val", "test"):
        if split in metrics:
            clip = metrics[split].get("clip") if isinstance(metrics[split], dict) else None
            if not isinstance(clip, dict) or not all(type(clip.get(k)) in (int, float) for k in ("accuracy",
                                                                                                   "macro_f1")):
                return f"'{split}' must hold clip accuracy and macro_f1 numbers"
            if "mAP" in clip and (type(clip["mAP"]) not in (int, float) or not _per_class_ok(clip.get("per_class"))):
                return f"'{split}' must hold a mAP number and per-class AP, F1 and threshold numbers"
    return ""


def _per_class_ok(rows: Any) -> bool:
    return isinstance(rows, dict) and all(isinstance(row, dict) and all(
        type(row.get(k)) in (int, float) for k in ("ap", "f1", "threshold")) for row in rows.values())


def _check_same_build(run: Path, metrics: dict[str, Any], manifest: Manifest) -> None:
    """The build's classes must be the run's (metrics.json records them; else the checkpoint does): a page drawn
    with another build's names would label every score wrongly."""
    classes, where = metrics.get("classes"), run / "metrics.json"
    if classes is None and (run / "best_model.pt").exists():
        from audioshard.checkpoint import read_checkpoint

        classes, where = read_checkpoint(run / "best_model.pt").classes, run / "best_model.pt"
    if classes is not None and classes != manifest.classes:
        raise ReportError(f"the build at {manifest.root} has classes {_names(manifest.classes)}, but the run was "
                          f"trained on {_names(classes)} ({where}); give --shards the build this run was trained on")


def _names(names: list[str], most: int = 10) -> str:
    return "[" + ", ".join(repr(n[:40]) for n in names[:most]) + (f", ... {len(names)} in all" if len(names) > most
                                                                  else "") + "]"


PREDICTION_KINDS = {"logits": "f", "y": "iu", "source": "iu", "start": "f"}


def read_predictions(run: Path, split: str, manifest: Manifest) -> dict[str, np.ndarray]:
    """The saved predictions of a split, checked: numeric arrays of one length, logits (N, classes) and labels,
    sources and starts within the build's. A file that is not what `train` wrote is a ReportError."""
    path = run / f"{split}_predictions.npz"
    try:
        with zipfile.ZipFile(path) as archive:
            size = sum(member.file_size for member in archive.infolist())
        if size > MAX_PREDICTION_BYTES:
            raise ValueError(f"{size} bytes unpacked, more than {MAX_PREDICTION_BYTES >> 20} MB")
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in PREDICTION_KINDS if k not in data.files]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            pred = {k: data[k] for k in PREDICTION_KINDS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exn:
        raise ReportError(f"{path}: cannot read it ({str(exn)[:200]}); run `audioshard evaluate` again to "
                          "rewrite it, or delete it") from exn
    if problem := _prediction_problem(pred, manifest, split):
        raise ReportError(f"{path}: {problem}; it does not belong to this run and build. Run `audioshard "
                          "evaluate` again to rewrite it, or delete it")
    return pred


def _prediction_problem(pred: dict[str, np.ndarray], manifest: Manifest, split: str) -> str:
    for key, kinds in PREDICTION_KINDS.items():
        if pred[key].dtype.kind not in kinds or pred[key].ndim != (2 if key == "logits" else 1):
            return f"{key} is a {pred[key].ndim}-d {pred[key].dtype} array"
    n, classes = len(pred["y"]), len(manifest.classes)
    if not len(pred["logits"]) == len(pred["source"]) == len(pred["start"]) == n:
        return "its arrays differ in length"
    if pred["logits"].shape[1] != classes:
        return f"logits for {pred['logits'].shape[1]} classes, the build has {classes}"
    if n > manifest.samples(split):
        return f"{n} chunks, the build's {split} split has {manifest.samples(split)}"
    if not np.isfinite(pred["logits"]).all() or not np.isfinite(pred["start"]).all() or (pred["start"] < 0).any():
        return "NaN or infinite logits, or starts that are not seconds >= 0"
    if n and not (pred["y"].min() >= 0 and pred["y"].max() < classes):
        return f"labels outside 0..{classes - 1}"
    if n and not (pred["source"].min() >= 0 and pred["source"].max() < manifest.source_count(split)):
        return f"recordings outside 0..{manifest.source_count(split) - 1}"
    return ""


def _header(run: Path, metrics: dict[str, Any]) -> str:
    cells = [("run", run.name), ("device", metrics.get("device", "?")),
             ("epochs", f"{metrics.get('epochs')} (model of epoch {metrics.get('best_epoch')})"),
             ("time", f"{metrics.get('train_seconds', 0) / 60:.1f} min, "
                      f"{metrics.get('seconds_per_epoch', 0):.1f} s an epoch")]
    for split in ("val", "test"):
        if split in metrics:
            clip = metrics[split]["clip"]
            first = f"mAP {clip['mAP']:.3f}" if "mAP" in clip else f"accuracy {clip['accuracy']:.3f}"
            cells.append((f"{split}: recordings", f"{first}, macro-F1 {clip['macro_f1']:.3f}"))
    items = "".join(f"<div><b>{html.escape(k)}</b><br>{html.escape(str(v))}</div>" for k, v in cells)
    return f'<header><h1>{html.escape(run.name)}</h1><div class="facts">{items}</div></header>'


def _data_section(manifest: Manifest) -> str:
    rows = [[name] + [manifest.split(s).class_counts.get(name, 0) for s in SPLITS] for name in manifest.classes]
    hours = {s: manifest.split(s).audio_seconds / 3600 for s in SPLITS}
    foot = ["audio hours"] + [f"{hours[s]:.2f}" for s in SPLITS]
    skipped = manifest.skipped
    reasons = "".join(f"<li>{html.escape(str(s.get('reason', ''))[:300])}</li>" for s in skipped[:50])
    more = f"<p>... and {len(skipped) - 50} more (audioshard info -v)</p>" if len(skipped) > 50 else ""
    return (f"<section><h2>Data</h2><p>{len(manifest.classes)} classes, build at "
            f"{html.escape(manifest.root)}; chunks per class and split:</p>"
            + _table(["class", *SPLITS], rows, foot)
            + f"<h3>Skipped inputs: {len(skipped)}</h3><ul>{reasons}</ul>{more}</section>")


def _settings_section(run: Path) -> str:
    path = run / "config.toml"
    text = path.read_text(encoding="utf-8") if path.exists() else "(config.toml missing)"
    keep: list[str] = []
    for line in text.splitlines():
        if line.startswith("["):
            if keep and keep[-1].startswith("["):
                keep.pop()  # a section none of whose settings is shown
            keep.append(line)
        elif line.split("=")[0].strip() in SETTINGS:
            keep.append(line)
    return f"<section><h2>Settings that matter</h2><pre>{html.escape(chr(10).join(keep))}</pre></section>"


SETTINGS = {"sample_rate", "chunk_seconds", "hop_seconds", "n_mels", "hop_length", "epochs", "samples_budget",
            "batch_size", "lr", "mixup_alpha", "mixup_domain", "select_metric", "name", "width", "members",
            "input_norm", "freq_warp", "time_stretch", "background_prob", "time_shift", "gain_db", "eq_db", "seed"}


def _curves_section(run: Path, metrics: dict[str, Any]) -> str:
    image = run / "training_curves.png"
    img = _img(image.read_bytes(), "training curves") if image.exists() else "<p>(no curves)</p>"
    return f"<section><h2>Training</h2>{img}</section>"


def _split_section(run: Path, split: str, pred: dict[str, np.ndarray], classes: list[str]) -> str:
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(classes)))
    clip_logits, clip_y, _ = clip_level(pred["logits"], pred["y"], pred["source"])
    chunk = precision_recall_fscore_support(pred["y"], pred["logits"].argmax(1), labels=labels, zero_division=0)
    clip = precision_recall_fscore_support(clip_y, clip_logits.argmax(1), labels=labels, zero_division=0)
    rows = [[name, *(f"{v[i]:.3f}" for v in clip[:3]), int(clip[3][i]), *(f"{v[i]:.3f}" for v in chunk[:3])]
            for i, name in enumerate(classes)]
    table = _table(["class", "recording P", "R", "F1", "recordings", "chunk P", "R", "F1"], rows)
    return (f"<section><h2>{split}</h2><h3>Confusion (chunk level)</h3>{_confusion(run, split, pred, classes)}"
            f"<h3>Per class</h3>{table}</section>")


def _multilabel_section(split: str, figures: dict[str, Any], classes: list[str]) -> str:
    """A multi-label split: per class, average precision and F1 at its threshold, recording and chunk level."""
    clip, chunk = figures["clip"]["per_class"], figures["chunk"]["per_class"]
    rows = [[name, f"{clip[name]['ap']:.3f}", f"{clip[name]['f1']:.3f}", f"{clip[name]['threshold']:.2f}",
             f"{chunk[name]['ap']:.3f}", f"{chunk[name]['f1']:.3f}"]
            for name in classes if name in clip and name in chunk]
    table = _table(["class", "recording AP", "F1", "threshold", "chunk AP", "F1"], rows)
    return (f"<section><h2>{split}</h2><p>mAP {figures['clip']['mAP']:.3f} (recordings), "
            f"{figures['chunk']['mAP']:.3f} (chunks); thresholds chosen on val</p>{table}</section>")


def _confusion(run: Path, split: str, pred: dict[str, np.ndarray], classes: list[str]) -> str:
    image = run / f"{split}_confusion_matrix.png"
    if len(classes) <= MAX_ANNOTATED and image.exists():
        return _img(image.read_bytes(), f"{split} confusion matrix")
    k = len(classes)
    counts = np.bincount(pred["y"] * k + pred["logits"].argmax(1), minlength=k * k).reshape(k, k)
    np.fill_diagonal(counts, 0)
    flat = np.argsort(counts, axis=None)[::-1][:CONFUSED_PAIRS]
    rows = [[classes[i // k], classes[i % k], int(counts.flat[i])] for i in flat if counts.flat[i] > 0]
    return f"<p>{k} classes: the most confused pairs</p>" + _table(["true", "predicted as", "chunks"], rows)


def _worst_section(manifest: Manifest, preds: dict[str, dict[str, np.ndarray]], classes: list[str]) -> str:
    """The recordings the model is most confidently wrong about, with the chunk that misled it most."""
    picks = []
    for split, pred in preds.items():
        probs = _softmax(pred["logits"])
        for source in np.unique(pred["source"]):
            rows = np.flatnonzero(pred["source"] == source)
            mean = probs[rows].mean(0)
            guess, truth = int(mean.argmax()), int(pred["y"][rows[0]])
            if guess != truth:
                worst = rows[int(probs[rows, guess].argmax())]
                picks.append((float(mean[guess]), split, int(source), float(pred["start"][worst]), truth, guess))
    picks = sorted(picks, reverse=True)[:WORST]
    thumbs = _thumbnails(manifest, {(p[1], p[2], round(p[3], 3)) for p in picks})
    cards = "".join(_card(manifest, p, classes, thumbs.get((p[1], p[2], round(p[3], 3)))) for p in picks)
    return (f"<section><h2>Most wrong recordings</h2><p>{len(picks)} shown, by confidence in the wrong class"
            f"</p><div class=\"cards\">{cards or '<p>none wrong</p>'}</div></section>")


def _card(manifest: Manifest, pick: tuple, classes: list[str], png: bytes | None) -> str:
    confidence, split, source, start, truth, guess = pick
    path = manifest.sources(split)[source]
    img = _img(png, "spectrogram") if png else ""
    return (f"<div class=\"card\">{img}<p><b>{html.escape(classes[truth])}</b> heard as "
            f"<b>{html.escape(classes[guess])}</b> ({confidence:.2f})<br><small>{html.escape(split)}: "
            f"{html.escape(path)} at {start:.1f} s</small></p></div>")


def _thumbnails(manifest: Manifest, wanted: set[tuple[str, int, float]]) -> dict[tuple, bytes]:
    """PNG thumbnails of the wanted chunks (split, source, start), read in one pass per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found: dict[tuple, bytes] = {}
    for split in {w[0] for w in wanted}:
        for batch in ShardStream(manifest, split, 256):
            for x, source, start in zip(batch.x, batch.source, batch.start, strict=True):
                key = (split, int(source), round(float(start), 3))
                if key in wanted and key not in found:
                    fig, ax = plt.subplots(figsize=(2.4, 1.4), dpi=80)
                    ax.imshow(x[0].numpy().astype(np.float32), origin="lower", aspect="auto", cmap="magma")
                    ax.axis("off")
                    fig.tight_layout(pad=0)
                    buffer = io.BytesIO()
                    fig.savefig(buffer, format="png")
                    plt.close(fig)
                    found[key] = buffer.getvalue()
    return found


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(head: list[str], rows: list[list[Any]], foot: list[Any] | None = None) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    tfoot = "<tfoot><tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in foot) + "</tr></tfoot>" if foot else ""
    return ('<div class="scroll"><table><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{cells}</tbody>{tfoot}</table></div>")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; }}
header {{ background: #1f4e79; color: white; padding: 16px 24px; }}
header h1 {{ margin: 0 0 8px; font-size: 22px; }}
.facts {{ display: flex; flex-wrap: wrap; gap: 24px; }}
section {{ padding: 8px 24px; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 8px 0; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.scroll {{ display: inline-block; max-height: 420px; overflow-y: auto; }}
img {{ max-width: 100%; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ width: 200px; border: 1px solid #ccc; padding: 6px; }}
.card img {{ width: 192px; height: 112px; }}
</style></head>
<body>
{body}
<script>
// For checks (and curious readers): how many of the page's images decoded.
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""
