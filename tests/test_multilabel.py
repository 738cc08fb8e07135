"""Several sounds at once (labels.py, multilabel.py, split's iterative stratification): mixtures of real drone,
car and speech recordings with known labels, built, streamed, trained, evaluated, predicted and exported."""

import csv
import dataclasses
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import DCS, TINY_TRAIN
from webdataset.tariterators import group_by_keys

from audioshard import labels
from audioshard.build import build_shards
from audioshard.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from audioshard.config import load_config
from audioshard.export import export_model
from audioshard.loader import open_shards
from audioshard.manifest import load_manifest
from audioshard.predict import Predictor
from audioshard.shardfile import ShardDataError, decode_block, member_limits, tar_members
from audioshard.split import Source, split_sources
from audioshard.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from mixtures import make_mixtures  # noqa: E402 - the recipe's generator, importable once recipes/ is on the path


@pytest.fixture(scope="module")
def mixtures(tmp_path_factory) -> tuple[Path, Path]:
    """(listing CSV, build) of 48 five-second mixtures, labels exactly the classes mixed in."""
    folder = tmp_path_factory.mktemp("mix")
    listing = make_mixtures(DCS, folder / "audio", 48, seed=1)
    out = folder / "shards"
    build_shards(listing, out, load_config(overrides=["shards.block_size=16"]), workers=2, progress=False)
    return listing, out


def test_label_cells_name_several_classes_and_one_class_stays_as_it_was():
    assert labels.parse(" drone ; speech;drone;") == ("drone", "speech")
    assert labels.joined("car") == "car" and labels.joined("speech ;car") == "speech;car"
    assert labels.class_names([("car",), ("speech", "drone"), ("car",)]) == ["car", "drone", "speech"]
    assert not labels.is_multilabel([("car",), ("drone",)]) and labels.is_multilabel([("car",), ("car", "drone")])
    assert labels.multi_hot(("speech", "car"), {"car": 0, "drone": 1, "speech": 2}).tolist() == [1, 0, 1]
    # a folder's name is one class, `;` or not: only a CSV cell lists several
    assert Source("/a/x.wav", "x.wav", "rock;pop", "x.wav").names == ("rock;pop",)


def test_the_multilabel_split_keeps_every_class_in_every_split_and_groups_whole():
    """Iterative stratification: 200 groups of two recordings, classes of very different frequency, combined."""
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d", "rare"]
    sources = []
    for group in range(200):
        chosen = [n for n, p in zip(names, [0.6, 0.4, 0.3, 0.2, 0.06], strict=True) if rng.random() < p] or ["a"]
        sources += [Source(f"/x/{group}-{i}.wav", f"{group}-{i}.wav", ";".join(chosen), f"g{group}",
                           classes=tuple(chosen)) for i in range(2)]
    assignment, notes = split_sources(sources, 0.15, 0.15, seed=0)
    by_group = {}
    for s in sources:
        by_group.setdefault(s.group, set()).add(assignment[s.rel])
    assert all(len(splits) == 1 for splits in by_group.values())  # no group straddles two splits
    groups = {s.group: s for s in sources}
    for name in names:
        having = [g for g, s in groups.items() if name in labels.parse(s.label)]
        shares = Counter(assignment[groups[g].rel] for g in having)
        for split, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs(shares[split] / len(having) - share) < 0.12, (name, shares)
    assert notes == []


def test_a_mixture_build_carries_each_recordings_classes_to_every_batch(mixtures):
    listing, build = mixtures
    manifest = load_manifest(build)
    assert manifest.multilabel and manifest.classes == ["car", "drone", "speech"]
    assert "labels.npy" in manifest.block_members and manifest.data["multilabel"] is True
    with open(listing, newline="") as stream:
        truth = {row["path"]: labels.multi_hot(labels.parse(row["label"]), {"car": 0, "drone": 1, "speech": 2}).tolist()
                 for row in csv.DictReader(stream)}
    for workers in (0, 2):
        batches = list(open_shards(str(build), "train", batch_size=8, num_workers=workers, augment=False))
        names = manifest.source_names("train")
        seen = {(int(s), float(t)) for b in batches for s, t in zip(b.source, b.start, strict=True)}
        assert len(seen) == manifest.samples("train")
        for batch in batches:
            assert batch.y.shape == (len(batch.x), 3)
            for source, row in zip(batch.source, batch.y, strict=True):
                assert row.tolist() == truth[names[int(source)]]


def test_other_tools_reading_chunk_by_chunk_get_each_chunks_multi_hot_row(mixtures):
    """`audioshard.unblock` (webdataset) and `unblock_batch` (Hugging Face datasets) on a multi-label build."""
    import webdataset as wds

    from audioshard.interop import unblock, unblock_batch

    _, build = mixtures
    manifest = load_manifest(build)
    want = {(int(s), round(float(t), 3)): row.tolist()
            for b in open_shards(str(build), "train", batch_size=8, augment=False)
            for s, t, row in zip(b.source, b.start, b.y, strict=True)}
    urls = sorted(str(p) for p in build.glob("train-*.tar"))
    chunks = list(wds.WebDataset(urls, shardshuffle=False).compose(unblock))
    assert {(c["source"], round(c["start"], 3)): c["labels"].tolist() for c in chunks} == want
    assert len(chunks) == manifest.samples("train") and all(c["labels"][c["label"]] == 1 for c in chunks)
    block = next(iter(wds.WebDataset(urls[:1], shardshuffle=False)))
    columns = unblock_batch({key: [value] for key, value in block.items()})
    assert len(columns["labels"]) == len(columns["mel"]) and columns["labels"][0].shape == (3,)
    buffer = io.BytesIO()
    np.save(buffer, np.full((len(columns["mel"]), 3), 2, np.uint8), allow_pickle=False)  # not 0/1
    with pytest.raises(ShardDataError, match="0/1"):
        list(unblock([dict(block, **{"labels.npy": buffer.getvalue()})]))


@pytest.fixture(scope="module")
def trained(mixtures, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("mlrun") / "run"
    cfg = load_config(overrides=[*TINY_TRAIN, "train.epochs=4", "train.tensorboard=true", "train.select_metric=mAP"])
    metrics = train(str(mixtures[1]), run, cfg, progress=False)
    return run, metrics


def test_train_evaluate_predict_and_export_a_multilabel_model(mixtures, trained, tmp_path):
    listing, _ = mixtures
    run, metrics = trained
    for split in ("val", "test"):
        figures = metrics[split]["clip"]
        assert set(figures["per_class"]) == {"car", "drone", "speech"} and 0 <= figures["mAP"] <= 1
        assert all(0 <= row["ap"] <= 1 and 0 <= row["threshold"] <= 1 for row in figures["per_class"].values())
    card = read_checkpoint(run / "best_model.pt")
    assert card.multilabel and card.thresholds == [metrics["val"]["clip"]["per_class"][c]["threshold"]
                                                    for c in card.classes]
    assert "mAP" in (run / "test_report.txt").read_text() and "mAP" in (run / "report.html").read_text()
    assert np.load(run / "test_pred_labels.npy").shape[1] == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    maps = [e.value for e in events.Scalars("val/mAP")]
    assert [e.step for e in events.Scalars("val/mAP")] == [1, 2, 3, 4]
    losses = [json.loads(line)["val_loss"] for line in (run / "history.jsonl").read_text().splitlines()]
    best = max(range(4), key=lambda i: (maps[i], -losses[i], -i))  # the first of the best (mAP, then lower loss)
    assert metrics["best_epoch"] == best + 1  # train.select_metric = "mAP"
    assert events.Scalars("val_AP/drone")[-1].value == pytest.approx(metrics["val"]["clip"]["per_class"]["drone"]["ap"])

    with open(listing, newline="") as stream:
        held_out = [row for row in csv.DictReader(stream) if row["split"] == "test"][:3]
    predictor = Predictor(run / "best_model.pt")
    for row in held_out:
        pred = predictor.predict_file(listing.parent / row["path"])
        probs, names = pred.probabilities, card.classes
        over = [c for c in sorted(names, key=lambda c: -probs[names.index(c)])
                if probs[names.index(c)] >= card.thresholds[names.index(c)]]
        assert pred.present == over and pred.label == (";".join(over) or "-")
        assert pred.to_dict()["present"] == over

    sidecar = export_model(run / "best_model.pt", "safetensors", tmp_path / "m.safetensors")
    assert sidecar["multilabel"] is True and sidecar["thresholds"] == card.thresholds
    assert read_checkpoint(tmp_path / "m.safetensors").thresholds == card.thresholds


@pytest.mark.parametrize("thresholds", [[0.5, 0.5, 1.5], [0.5, 0.5], [0.5, float("nan"), 0.5]])
def test_forged_thresholds_are_refused_naming_the_file(trained, tmp_path, thresholds):
    card = read_checkpoint(trained[0] / "best_model.pt")
    path = tmp_path / "forged.pt"
    save_checkpoint(path, dataclasses.replace(card, thresholds=thresholds))
    with pytest.raises(CheckpointError, match=r"forged\.pt.*'thresholds' must be 3 numbers in 0\.\.1"):
        read_checkpoint(path)


def test_a_forged_multi_hot_row_is_a_named_bad_block(mixtures):
    manifest = load_manifest(mixtures[1])
    shard = manifest.shards("train")[0]
    with open(mixtures[1] / shard.file, "rb") as stream:
        sample = next(group_by_keys(tar_members(stream, shard.file, member_limits(manifest))))
    good = decode_block(sample, manifest)
    assert good["y"].shape == (len(good["x"]), 3) and set(np.unique(good["y"])) <= {0, 1}
    forged = np.array(good["y"]) * 2
    buffer = io.BytesIO()
    np.save(buffer, forged)
    with pytest.raises(ShardDataError, match="labels.npy must hold one row of 0/1 per chunk"):
        decode_block({**sample, "labels.npy": buffer.getvalue()}, manifest)


def test_show_and_check_name_every_class_of_a_chunk(mixtures, tmp_path, capsys):
    from audioshard.cli import main

    listing, build = mixtures
    manifest = load_manifest(build)
    assert main(["show", str(build), "--split", "train", "--index", "0", "--out", str(tmp_path / "c.png")]) == 0
    shown = capsys.readouterr().out
    first = next(b for b in open_shards(str(build), "train", batch_size=8, shuffle=False, augment=False))
    want = ";".join(c for c, on in zip(manifest.classes, first.y[0].tolist(), strict=True) if on)
    assert f"label {want}," in shown
    assert main(["check", str(build)]) == 0
    assert "y (64, 3)" in capsys.readouterr().out


def test_balanced_sampling_on_a_multilabel_build_is_a_clear_error_before_training(mixtures, tmp_path):
    from audioshard.config import ConfigError

    with pytest.raises(ConfigError, match="multi-label build.*set train.balanced = false"):
        train(str(mixtures[1]), tmp_path / "run", load_config(overrides=[*TINY_TRAIN, "train.balanced=true"]),
              progress=False)
    assert not (tmp_path / "run" / "best_model.pt").exists()


def test_select_metric_map_on_a_single_label_build_is_a_clear_error(real_build, tmp_path):
    from audioshard.config import ConfigError

    with pytest.raises(ConfigError, match="'mAP' is for multi-label builds"):
        train(str(real_build), tmp_path / "run", load_config(overrides=[*TINY_TRAIN, "train.select_metric=mAP"]),
              progress=False)
