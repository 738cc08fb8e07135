"""How much averaging several trained models gains, measured on runs that already exist.

    .venv/bin/python recipes/ensemble.py --shards B --runs R1 R2 [R3 ...] [--split val]

Each run's `best_model.pt` scores the split alone, then the models together: their chunk logits (or
probabilities) averaged before a recording's chunks are pooled (mean of logits, as `evaluate` does). The runs
must have been trained on the same shards; a pair of runs that differ only in their seed (or in one setting)
measures what an ensemble of two costs (twice the training) and buys, without training anything again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax
from variants import pooled

from audioshard.checkpoint import read_checkpoint
from audioshard.evaluate import predict_split, scores
from audioshard.manifest import Manifest, load_manifest


def split_logits(run: Path, manifest: Manifest, split: str) -> dict[str, np.ndarray]:
    """The chunk logits of one run's best_model.pt on `split` (sorted by recording and start, so runs align)."""
    model = read_checkpoint(run / "best_model.pt").model()
    return predict_split(model.eval(), manifest, split, torch.device("cpu"), 256, 0)


def level_scores(logits: np.ndarray, pred: dict[str, np.ndarray], classes: int) -> dict[str, dict]:
    y_hat, y = pooled(logits, pred["y"], pred["source"], "logits")
    return {"recording": scores(y, y_hat, classes), "chunk": scores(pred["y"], logits.argmax(1), classes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="the build every run was trained on")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders holding best_model.pt")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    manifest = load_manifest(args.shards)  # read once: every run scores the same build
    classes = len(manifest.classes)
    preds = [split_logits(run, manifest, args.split) for run in args.runs]
    for pred in preds[1:]:  # the same chunks in the same order, or the average means nothing
        if not all(np.array_equal(pred[key], preds[0][key]) for key in ("source", "start")):
            raise SystemExit("the runs scored different chunks: were they trained on the same shards?")
    out = {str(run): level_scores(p["logits"], p, classes) for run, p in zip(args.runs, preds, strict=True)}
    out["ensemble/logits"] = level_scores(np.mean([p["logits"] for p in preds], 0), preds[0], classes)
    # averaged probabilities, logged: the recording pool then takes the mean of log-probabilities
    mean_prob = np.mean([softmax(p["logits"], axis=1) for p in preds], 0)
    out["ensemble/prob"] = level_scores(np.log(mean_prob), preds[0], classes)
    for name, s in out.items():
        print(f"{name}: recording accuracy {s['recording']['accuracy']:.4f} macro-F1 {s['recording']['macro_f1']:.4f}"
              f" | chunk accuracy {s['chunk']['accuracy']:.4f}")
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
