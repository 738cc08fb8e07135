"""Paired variants of one trained run, scored on its held-out split without training again.

One training gives several models to compare on exactly the same draws, so the comparison is paired
(the run-to-run spread of ±2.5 points cancels): the weights of the last step or their moving average
(when the run had `train.ema_epochs`), BatchNorm statistics as trained (running averages over augmented,
mixed batches) or re-estimated on the clean train split, one view per chunk or several time-rolled ones,
and how a recording's chunks are pooled (mean logits, the default; mean probabilities; the most confident).

    .venv/bin/python recipes/esc50.py --variants ...      # rows named SETTING+VARIANT beside SETTING's
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from audioshard.augment import BatchTransform
from audioshard.checkpoint import read_checkpoint
from audioshard.evaluate import predict_split, scores
from audioshard.loader import make_loader
from audioshard.manifest import Manifest, load_manifest
from audioshard.models import adapt_batchnorm
from audioshard.stream import ShardStream

RULES = ("logits", "prob", "maxprob")


class RolledViews(torch.nn.Module):
    """The mean logits of `views` copies of each chunk rolled in time by equal steps (training rolls too)."""

    def __init__(self, model: torch.nn.Module, views: int):
        super().__init__()
        self.model, self.views = model, views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[-1]
        return torch.stack([self.model(torch.roll(x, i * frames // self.views, dims=-1))
                            for i in range(self.views)]).mean(0)


def pooled(logits: np.ndarray, y: np.ndarray, source: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(recording predictions, recording labels) with the chunks of each recording pooled by `rule`."""
    ids, inverse = np.unique(source, return_inverse=True)
    z = np.exp(logits - logits.max(1, keepdims=True))
    values = logits if rule == "logits" else z / z.sum(1, keepdims=True)
    out = np.full((len(ids), logits.shape[1]), -np.inf if rule == "maxprob" else 0.0)
    (np.maximum if rule == "maxprob" else np.add).at(out, inverse, values)
    labels = np.zeros(len(ids), dtype=np.int64)
    labels[inverse] = y
    return out.argmax(1), labels


def clean_train_batches(manifest: Manifest) -> Iterator[torch.Tensor]:
    """The train split normalised, unaugmented, shuffled across blocks (so each batch mixes classes)."""
    transform = BatchTransform(manifest.mean, manifest.std, augment=None)
    stream = ShardStream(manifest, "train", 64, shuffle=True, shuffle_blocks=64, seed=1)
    return (transform(b).x for b in make_loader(stream))


def weight_sets(run: Path) -> dict[str, dict]:
    """"last": the last step's weights; "ema": their moving average, when the run kept one."""
    last = read_checkpoint(run / "last.pt")
    if "trained_weights" in last.training:
        return {"last": last.training["trained_weights"]["model"], "ema": last.weights}
    return {"last": last.weights}


def score_variants(run: Path, shards: str, split: str = "val") -> dict[str, dict]:
    """{variant name: {"recording": scores, "chunk": scores}} for every combination."""
    manifest = load_manifest(shards)
    card = read_checkpoint(run / "last.pt")
    out: dict[str, dict] = {}
    for weights_name, weights in weight_sets(run).items():
        for bn in ("trained", "recal"):
            model = card.model()
            model.load_state_dict(copy.deepcopy(weights))
            if bn == "recal":
                adapt_batchnorm(model, clean_train_batches(manifest))
            for views in (1, 2):
                net = RolledViews(model, views) if views > 1 else model
                pred = predict_split(net.eval(), manifest, split, torch.device("cpu"), 256, 0)
                chunk = scores(pred["y"], pred["logits"].argmax(1), len(manifest.classes))
                for rule in RULES:
                    y_hat, y = pooled(pred["logits"], pred["y"], pred["source"], rule)
                    out[f"{weights_name}/bn-{bn}/views{views}/{rule}"] = {
                        "recording": scores(y, y_hat, len(manifest.classes)), "chunk": chunk}
    return out
