"""schedule.py: the training recipe's numbers (epochs, learning-rate curve, class weights, mixup)."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN  # noqa: F401 - the shared fixtures' module

from audioshard.config import load_config
from audioshard.manifest import load_manifest
from audioshard.schedule import AUTO_EPOCHS, class_weights, lr_lambda, mixup, planned_epochs, power_mix, sound_level


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


def test_power_mixing_sums_powers_at_the_level_lam_asks_whatever_the_recordings_levels():
    mean, std = -50.0, 10.0
    db = torch.full((2, 1, 4, 6), -100.0)
    db[0, 0, :, 2] = -20.0  # a click in silence: its level is its loudest frame's
    db[1] = -60.0  # a steady sound, 40 dB quieter
    assert sound_level(db).flatten().tolist() == [-20.0, -60.0]
    normalised = (db - mean) / std
    mixed = power_mix(normalised[:1], normalised[1:], 0.5, mean, std) * std + mean
    # lam 0.5: the partner is raised to the click's level; both at once is their power sum (+3.01 dB)
    assert torch.allclose(mixed[0, 0, :, 2], torch.tensor(-20.0 + 10 * math.log10(2)), atol=1e-4)
    assert torch.allclose(mixed[0, 0, :, 0], torch.tensor(-20.0), atol=1e-4)
    # lam 0.9: the partner sits 20 log10(9) = 19.1 dB below the example, and a quieter recording of the
    # same partner gives the same mixture (the label says what one hears, not how it was recorded)
    quieter = power_mix(normalised[:1], (db[1:] - 30.0 - mean) / std, 0.9, mean, std) * std + mean
    assert torch.allclose(quieter[0, 0, :, 0], torch.tensor(-20.0 - 20 * math.log10(9)), atol=1e-3)
    assert torch.allclose(quieter, power_mix(normalised[:1], normalised[1:], 0.9, mean, std) * std + mean, atol=1e-3)
    example = normalised[:1]
    assert power_mix(example, normalised[1:], 1.0, mean, std) is example  # nothing to mix in


def test_power_domain_draws_as_log_mixup_does_and_differs_only_in_the_mixture():
    x, y = torch.randn(8, 1, 4, 6), torch.arange(8)
    log_mixed, log_partner, log_lam = mixup(x, y, 1.0, np.random.default_rng(3))
    mixed, partner, lam = mixup(x, y, 1.0, np.random.default_rng(3), "power", -50.0, 10.0)
    assert lam == log_lam and torch.equal(partner, log_partner) and not torch.allclose(mixed, log_mixed)
    # labels are 0..7, so the partner labels are the partners' indices
    assert torch.allclose(mixed, power_mix(x, x[partner], lam, -50.0, 10.0))
    assert mixed.dtype == x.dtype and mixed.shape == x.shape


def test_class_weights_are_inverse_frequency_and_average_one_per_training_chunk(real_build):
    manifest = load_manifest(real_build)
    counts = np.array([manifest.split("train").class_counts[c] for c in manifest.classes], dtype=float)
    weights = class_weights(manifest).numpy()
    assert (weights * counts).sum() == pytest.approx(counts.sum(), rel=1e-6)  # the loss keeps its scale
    assert np.allclose(weights * counts, (weights * counts)[0])  # every class weighs the same in total
