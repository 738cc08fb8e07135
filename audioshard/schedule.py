"""The training recipe's numbers, as functions of the config and the data: how many epochs, the
learning-rate curve, class weights, mixup and the weight average that is evaluated and saved.

Kept apart from the loop (`train.py`) because each is a small decision with its own reasons and tests,
and a user reading why a run behaves as it does should find them in one place.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from audioshard.augment import DB_TO_NEPERS, power_sum_db
from audioshard.config import Config
from audioshard.manifest import Manifest


def class_weights(manifest: Manifest) -> torch.Tensor:
    """Inverse-frequency weights from the train split's chunk counts: every present class weighs the same in
    total, and a training chunk weighs 1 on average (so the loss keeps its scale)."""
    counts = np.array([manifest.split("train").class_counts[c] for c in manifest.classes], dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


AUTO_EPOCHS = (5, 300)  # bounds of the automatic schedule: a cosine needs a few epochs; tiny sets need a cap,
                        # or the per-epoch validation and start-up would cost more than the training


def planned_epochs(cfg: Config, train_samples: int) -> int:
    """`train.epochs`, or with 0 (auto) enough whole epochs to see `train.samples_budget` training
    examples, within AUTO_EPOCHS: small data sets get many epochs, large ones few, at about the same cost."""
    if cfg.train.epochs:
        return cfg.train.epochs
    low, high = AUTO_EPOCHS
    return min(high, max(low, math.ceil(cfg.train.samples_budget / max(1, train_samples))))


def lr_lambda(cfg: Config, steps_per_epoch: int):
    """Linear warm-up for `warmup_epochs`, then constant or cosine decay to 1% at the last step."""
    warmup = cfg.train.warmup_epochs * steps_per_epoch
    total = max(1, cfg.train.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.train.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator, domain: str = "log",
          mean: float = 0.0, std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix each example with another of the batch: lam ~ Beta(alpha, alpha) per batch.

    domain "log": a weighted mean of the two log-mel inputs (mixup, Zhang et al. 2018). domain "power":
    the sum of the two sounds' powers, as if both played at once, with the partner set (1 - lam) / lam as
    loud as the example (between-class learning, Tokozume et al. 2018); x is normalised as
    (dB - mean) / std, which `mean` and `std` undo for the sum.
    Returns (mixed x, the partner labels, lam); the loss is lam * CE(y) + (1 - lam) * CE(partner).
    """
    if alpha <= 0 or len(y) < 2:
        return x, y, 1.0
    lam = float(rng.beta(alpha, alpha))
    lam = max(lam, 1 - lam)  # keep the first label dominant, so accuracy on `y` stays meaningful
    perm = torch.from_numpy(rng.permutation(len(y))).to(x.device)
    if domain == "power":
        return power_mix(x, x[perm], lam, mean, std), y[perm], lam
    return lam * x + (1 - lam) * x[perm], y[perm], lam


def sound_level(db: torch.Tensor) -> torch.Tensor:
    """Each example's level in dB: the mean power over the bands of its loudest frame (B, 1, mels, frames) ->
    (B, 1, 1, 1). The loudest frame, not the mean, so that a short event in silence counts as loud as it is."""
    bands = db.shape[2]
    frame_power = torch.logsumexp(db * DB_TO_NEPERS, dim=2, keepdim=True) / DB_TO_NEPERS - 10.0 * math.log10(bands)
    return frame_power.amax(dim=(1, 3), keepdim=True)


def power_mix(x: torch.Tensor, partner: torch.Tensor, lam: float, mean: float, std: float) -> torch.Tensor:
    """x and partner played together: a power sum in which the partner's amplitude is (1 - lam) / lam of x's
    (levels from `sound_level`), so the label weights say how much of each one hears, whatever the two
    recordings' own levels. A weighted mean of log-mels is instead the geometric mean of two spectra: no real
    mixture sounds like that, and a quiet example would weigh as much as a loud one."""
    if lam >= 1.0:
        return x
    db, partner_db = x.float() * std + mean, partner.float() * std + mean
    shift = sound_level(db) - sound_level(partner_db) - 20.0 * math.log10(lam / (1.0 - lam))
    mixed = power_sum_db(db, partner_db + shift)
    return ((mixed - mean) / std).to(x.dtype)


def weight_average(model: torch.nn.Module, cfg: Config, steps_per_epoch: int) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights and BatchNorm statistics over about
    `train.ema_epochs` epochs (None when 0): what is evaluated and saved instead of the last step's
    weights. Late in training the weights still wander from batch to batch, and on data unlike the
    training set (a new speaker or device) that moves the score by several points from one epoch to
    the next; the average sits in the middle of that wandering (Polyak averaging; as in timm's ModelEma)."""
    if not cfg.train.ema_epochs:
        return None
    decay = math.exp(-1.0 / (cfg.train.ema_epochs * steps_per_epoch))  # time constant: ema_epochs of steps
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def mixed_loss(logits: torch.Tensor, y: torch.Tensor, y_mix: torch.Tensor, lam: float,
               weight: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """The loss of a (mixed) batch. One class per chunk: cross-entropy, mixup as lam * CE(y) + (1 - lam) *
    CE(partner). Multi-hot rows (a multi-label build): one binary cross-entropy per class against the mixed
    targets lam * y + (1 - lam) * partner (mixup of two sound scenes holds both, in part).

    Logits of shape (members, B, C) (a `models.Ensemble` in training): the mean of the members' own losses, so
    each member's gradient is the one it would get alone."""
    if logits.dim() == 3:
        members = logits.shape[0]
        repeat = (members, 1) if y.dim() == 2 else (members,)
        logits, y, y_mix = logits.flatten(0, 1), y.repeat(*repeat), y_mix.repeat(*repeat)
    logits = logits.float()
    if y.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits, lam * y.float() + (1 - lam) * y_mix.float())
    loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)
    if lam < 1.0:
        loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y_mix, weight=weight, label_smoothing=smoothing)
    return loss


def top1_hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Chunks whose most probable class is (one of) theirs: accuracy's count, for one label or several."""
    top = logits.argmax(1)
    return (top == y).sum() if y.dim() == 1 else y.gather(1, top[:, None]).sum()
