"""Several sounds at once: the figures and decisions of a multi-label model (one sigmoid per class).

A multi-label build (`labels.py`) gives each chunk a multi-hot row; the model's logits are read as one
independent probability per class. What a single-label run reports as accuracy and F1 of the arg-max, a
multi-label run reports as average precision per class (threshold-free), its macro mean (mAP), and F1 at
per-class decision thresholds chosen on the val split (the F1-best threshold of each class), which the
checkpoint keeps so that `predict` and exports decide the same way. A recording's probabilities are the
mean of its chunks'.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, f1_score

DEFAULT_THRESHOLD = 0.5  # for a class val cannot inform (no positive example there)
MAX_CANDIDATES = 512  # thresholds tried per class: quantiles of its val probabilities


def probabilities(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -60, 60)))


def per_recording(probs: np.ndarray, y: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean probabilities, multi-hot labels) per recording, in order of recording index."""
    ids, inverse = np.unique(source, return_inverse=True)
    sums = np.zeros((len(ids), probs.shape[1]))
    np.add.at(sums, inverse, probs)
    labels = np.zeros((len(ids), y.shape[1]), dtype=y.dtype)
    labels[inverse] = y  # every chunk of a recording carries the recording's classes
    return sums / np.bincount(inverse, minlength=len(ids))[:, None], labels


def choose_thresholds(probs: np.ndarray, y: np.ndarray) -> list[float]:
    """Per class, the threshold with the best F1 on these (val) predictions; DEFAULT_THRESHOLD where the
    class has no positive example. Candidates are quantiles of the class's probabilities (bounded work)."""
    chosen = []
    for k in range(y.shape[1]):
        truth = y[:, k] > 0
        if not truth.any():
            chosen.append(DEFAULT_THRESHOLD)
            continue
        candidates = np.unique(np.quantile(probs[:, k], np.linspace(0, 1, min(MAX_CANDIDATES, len(truth)))))
        predicted = probs[:, k][None, :] >= candidates[:, None]
        hits = (predicted & truth).sum(1)
        f1 = 2 * hits / np.maximum(1, predicted.sum(1) + truth.sum())
        chosen.append(float(candidates[int(np.argmax(f1))]))
    return chosen


def scores(y: np.ndarray, probs: np.ndarray, thresholds: list[float], classes: list[str]) -> dict[str, Any]:
    """mAP and per-class AP (classes present), F1 at the thresholds, and the top-1 hit rate (the share of
    chunks whose most probable class is one of theirs: what the epoch lines call accuracy)."""
    if not len(y):
        return {"mAP": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan"), "micro_f1": float("nan"),
                "n": 0, "per_class": {}}
    decided = probs >= np.asarray(thresholds)[None, :]
    present = [k for k in range(y.shape[1]) if y[:, k].any()]
    per_class = {name: {"ap": float(average_precision_score(y[:, k], probs[:, k])) if k in present else float("nan"),
                        "f1": float(f1_score(y[:, k], decided[:, k], zero_division=0)),
                        "threshold": float(thresholds[k]), "positives": int(y[:, k].sum())}
                 for k, name in enumerate(classes)}
    return {"mAP": float(np.mean([per_class[classes[k]]["ap"] for k in present])) if present else float("nan"),
            "accuracy": float(y[np.arange(len(y)), probs.argmax(1)].mean()),
            "macro_f1": float(f1_score(y[:, present], decided[:, present], average="macro", zero_division=0)),
            "micro_f1": float(f1_score(y, decided, average="micro", zero_division=0)),
            "n": int(len(y)), "per_class": per_class}


def summarize(pred: dict[str, np.ndarray], classes: list[str], thresholds: list[float] | None = None,
              loss: float | None = None) -> dict[str, Any]:
    """Chunk- and recording-level figures of a multi-label `predict_split` result (thresholds: DEFAULT_THRESHOLD
    for every class until they are chosen)."""
    thresholds = thresholds or [DEFAULT_THRESHOLD] * len(classes)
    probs = probabilities(pred["logits"])
    clip_probs, clip_y = per_recording(probs, pred["y"], pred["source"])
    result = {"chunk": scores(pred["y"], probs, thresholds, classes),
              "clip": scores(clip_y, clip_probs, thresholds, classes),
              "skipped_blocks": int(pred.get("skipped_blocks", 0)), "multilabel": True}
    result["chunk"]["thresholds"] = list(thresholds)
    if loss is not None:
        result["loss"] = loss
    return result


def report_text(metrics: dict[str, Any], classes: list[str]) -> str:
    """The text report of one split: per class AP, F1 at its threshold, positives; chunk and recording level."""
    lines = []
    for level in ("chunk", "clip"):
        figures = metrics[level]
        lines += [f"{level} level: mAP {figures['mAP']:.3f}, micro-F1 {figures['micro_f1']:.3f}, macro-F1 "
                  f"{figures['macro_f1']:.3f}, top-1 hit {figures['accuracy']:.3f} (n={figures['n']})",
                  f"{'class':<30} {'AP':>6} {'F1':>6} {'threshold':>9} {'positives':>9}"]
        lines += [f"{name[:30]:<30} {row['ap']:>6.3f} {row['f1']:>6.3f} {row['threshold']:>9.2f} {row['positives']:>9}"
                  for name, row in ((n, figures["per_class"][n]) for n in classes if n in figures["per_class"])]
        lines.append("")
    return "\n".join(lines)
