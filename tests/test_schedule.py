"""schedule.py: the training recipe's numbers (epochs, learning-rate curve, class weights, mixup)."""

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN  # noqa: F401 - the shared fixtures' module

from audioshard.config import load_config
from audioshard.manifest import load_manifest
from audioshard.schedule import AUTO_EPOCHS, class_weights, lr_lambda, mixup, planned_epochs


def test_automatic_schedule_scales_epochs_with_the_train_split_and_an_explicit_value_wins():
    cfg = load_config(overrides=["train.samples_budget=400000"])
    assert cfg.train.epochs == 0  # the default is the automatic schedule
    assert planned_epochs(cfg, 3600) == 112  # ceil(400000 / 3600): a few thousand chunks train for long
    assert planned_epochs(cfg, 40_000) == 10
    assert planned_epochs(cfg, 5_000_000) == AUTO_EPOCHS[0]  # millions of chunks: a few epochs, not fewer
    assert planned_epochs(cfg, 50) == AUTO_EPOCHS[1]  # a tiny set: capped (validation each epoch costs too)
    assert planned_epochs(load_config(overrides=["train.epochs=7"]), 3600) == 7


def test_learning_rate_warms_up_then_falls_by_a_cosine_to_one_percent_at_the_last_step():
    cfg = load_config(overrides=["train.epochs=10", "train.warmup_epochs=1"])
    factor = lr_lambda(cfg, steps_per_epoch=100)
    assert factor(0) == pytest.approx(0.01) and factor(99) == pytest.approx(1.0)  # linear warm-up over epoch 1
    assert factor(100) == pytest.approx(1.0) and factor(999) > 0.01 and factor(1000) == pytest.approx(0.01)
    falling = [factor(step) for step in range(100, 1001, 50)]
    assert falling == sorted(falling, reverse=True)
    flat = lr_lambda(load_config(overrides=["train.epochs=10", "train.schedule=constant"]), 100)
    assert flat(150) == flat(999) == 1.0


def test_mixup_keeps_the_first_label_dominant_and_is_off_at_alpha_zero():
    x, y = torch.arange(8.0).reshape(4, 2), torch.arange(4)
    mixed, partner, lam = mixup(x, y, 0.3, np.random.default_rng(0))
    again = mixup(x, y, 0.3, np.random.default_rng(0))
    assert 0.5 <= lam <= 1.0 and torch.equal(mixed, again[0]) and sorted(partner.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner])
    same, labels, one = mixup(x, y, 0.0, np.random.default_rng(0))
    assert one == 1.0 and same is x and labels is y


def test_class_weights_are_inverse_frequency_and_average_one_per_training_chunk(real_build):
    manifest = load_manifest(real_build)
    counts = np.array([manifest.split("train").class_counts[c] for c in manifest.classes], dtype=float)
    weights = class_weights(manifest).numpy()
    assert (weights * counts).sum() == pytest.approx(counts.sum(), rel=1e-6)  # the loss keeps its scale
    assert np.allclose(weights * counts, (weights * counts)[0])  # every class weighs the same in total
