"""Evaluation that names recordings: `{split}_recordings.csv` from `evaluate` and `train`, and the pandas
tables of a build (`Manifest.to_pandas`) and of saved predictions (`predictions_frame`)."""

import csv

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_TRAIN

from audioshard.config import load_config
from audioshard.evaluate import evaluate_checkpoint, predictions_frame, write_recordings_csv
from audioshard.manifest import load_manifest
from audioshard.train import train


@pytest.fixture(scope="module")
def run(real_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    train(str(real_build), out, load_config(overrides=[*TINY_TRAIN, "train.epochs=2", "train.sanity_steps=0"]),
          progress=False)
    return out


def test_evaluate_writes_one_named_row_per_recording(run, real_build, tmp_path):
    metrics = evaluate_checkpoint(run / "best_model.pt", str(real_build), "test", tmp_path)
    manifest = load_manifest(real_build)
    with open(tmp_path / "test_recordings.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["recording", "true", "predicted", "confidence", "correct", "chunks", "chunks_agreeing"]
    assert sorted(r["recording"] for r in rows) == sorted(manifest.sources("test"))
    labels = {r["path"]: r["label"] for r in manifest.recording_rows("test")}
    assert all(r["true"] == labels[r["recording"]] for r in rows)
    correct = [r["correct"] == "True" for r in rows]
    assert sum(correct) / len(rows) == pytest.approx(metrics["clip"]["accuracy"])
    assert sum(int(r["chunks"]) for r in rows) == metrics["chunk"]["n"]
    assert all(0 <= int(r["chunks_agreeing"]) <= int(r["chunks"]) and 0 < float(r["confidence"]) <= 1 for r in rows)
    assert correct == sorted(correct)  # the mistakes first: what a user opens the file for


def test_a_run_names_its_val_and_test_recordings_and_reads_back_as_a_frame(run, real_build):
    manifest = load_manifest(real_build)
    for split in ("val", "test"):
        frame = predictions_frame(run, split)
        assert isinstance(frame, pd.DataFrame) and len(frame) == manifest.source_count(split)
        on_disk = pd.read_csv(run / f"{split}_recordings.csv", keep_default_na=False)
        assert list(frame["recording"]) == list(on_disk["recording"])
        assert frame["correct"].mean() == pytest.approx(
            np.mean(on_disk["correct"].astype(str) == "True"))


def test_names_that_look_like_formulas_stay_text_in_the_csv(tmp_path):
    table = pd.DataFrame({"recording": ["=HYPERLINK(1)", "plain.wav"], "true": ["+x", "a"], "predicted": ["a", "@b"],
                          "confidence": [0.5, 0.9], "correct": [False, True], "chunks": [2, 1],
                          "chunks_agreeing": [1, 1]})
    write_recordings_csv(tmp_path / "r.csv", table)
    with open(tmp_path / "r.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["recording"] for r in rows] == ["'=HYPERLINK(1)", "plain.wav"]
    assert rows[0]["true"] == "'+x" and rows[1]["predicted"] == "'@b"


def test_a_builds_recordings_as_a_frame(real_build):
    manifest = load_manifest(real_build)
    frame = manifest.to_pandas()
    for split in ("train", "val", "test"):
        part = frame[frame["split"] == split]
        assert list(part["path"]) == list(manifest.sources(split))
        assert list(part["source"]) == list(range(manifest.source_count(split)))
    assert set(frame["label"]) == set(manifest.classes)
    assert list(manifest.to_pandas("val")["path"]) == list(manifest.sources("val"))
