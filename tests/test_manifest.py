"""manifest.json stays small: what grows with the recordings lives in list files beside it (format 2),
read and checked like shards, only by what shows recordings by name; version-1 builds are still read."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_TRAIN, copy_build
from http_server import ShardServer

from audioshard.assemble import SplitTally, TrainStats, build_manifest, write_lists
from audioshard.config import load_config
from audioshard.evaluate import evaluate_checkpoint
from audioshard.info import format_info, verify_build
from audioshard.loader import make_loader
from audioshard.manifest import (
    MANIFEST_NAME,
    MAX_LIST_BYTES,
    ManifestError,
    load_manifest,
    sha256_file,
    write_json_atomic,
)
from audioshard.names import SPLITS
from audioshard.remote import Fetcher
from audioshard.report import _softmax, write_report
from audioshard.stream import ShardStream
from audioshard.train import train

FAST = Fetcher(timeout=2.0, retries=1, backoff=0.05)


def synthetic_build(folder, recordings: int, skipped: int, classes: int = 50) -> None:
    """What the build writes (manifest and list files) for `recordings` recordings of 5 chunks each in
    shards of 1024 chunks, and `skipped` skipped inputs: the build's own assembly, without the audio."""
    names = [f"class{c:03d}" for c in range(classes)]
    tallies = {split: SplitTally() for split in SPLITS}
    for i in range(recordings):
        split = "train" if i % 10 < 8 else SPLITS[1 + i % 2]  # 80 / 10 / 10
        tallies[split].add(f"{names[i % classes]}/recording_{i:07d}.wav", names[i % classes], 5, 10.0, 0)
    bad = [{"path": f"class000/bad_{i:05d}.wav", "reason": f"class000/bad_{i:05d}.wav: could not be decoded"}
           for i in range(skipped)]
    lists = write_lists(folder, tallies, bad, {})
    splits = {}
    for split, tally in tallies.items():
        chunks = sum(tally.class_counts.values())
        shards = [{"file": f"{split}-{k:06d}.tar", "samples": min(1024, chunks - 1024 * k), "sha256": "0" * 64,
                   "bytes": 8_400_000} for k in range(-(-chunks // 1024))]
        splits[split] = tally.to_dict(shards, names, lists[split])
    stats = TrainStats()
    stats.add((-25_000.0, 800_000.0, 1000))
    write_json_atomic(folder / MANIFEST_NAME, build_manifest(
        input_path="raw", cfg=load_config(), classes=names, splits=splits, stats=stats, skipped=lists["skipped"],
        ignored={}, warnings=[], fingerprint="f" * 64))


def test_the_manifest_of_100k_recordings_stays_small_and_the_lists_hold_them(tmp_path):
    synthetic_build(tmp_path, 100_000, 2_000)
    size = (tmp_path / MANIFEST_NAME).stat().st_size
    manifest = load_manifest(tmp_path)
    # The same build with its lists inline, as version 1 wrote it: what every process parsed before.
    splits = manifest.data["splits"]
    inline = {**manifest.data, "skipped": manifest.skipped,
              "splits": {s: {**info, "sources": list(manifest.sources(s))} for s, info in splits.items()}}
    print(f"manifest.json of 100,000 recordings: {size:,} bytes (lists inline: {len(json.dumps(inline, indent=1)):,})")
    assert size < 200_000 < 4_000_000 < len(json.dumps(inline, indent=1))
    assert [manifest.source_count(s) for s in SPLITS] == [80_000, 10_000, 10_000] == \
        [len(manifest.sources(s)) for s in SPLITS]
    assert manifest.skipped_count == 2_000 and manifest.skipped[-1]["path"] == "class000/bad_01999.wav"
    assert manifest.sources("val")[3] == "class038/recording_0000038.wav"  # rows 8, 18, 28, 38 of the input
    assert manifest.recording_rows("val")[3] == {"path": "class038/recording_0000038.wav", "label": "class038"}
    for split in SPLITS:
        lines = (tmp_path / f"{split}-recordings.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == manifest.source_count(split) and json.loads(lines[0])["path"] in manifest.sources(split)


def test_the_manifest_stays_small_at_a_million_recordings(tmp_path):
    synthetic_build(tmp_path, 1_000_000, 0, classes=500)
    size = (tmp_path / MANIFEST_NAME).stat().st_size
    print(f"manifest.json of 1,000,000 recordings in {sum(len(load_manifest(tmp_path).shards(s)) for s in SPLITS)} "
          f"shards: {size:,} bytes")
    assert size < 1 << 20


def test_names_are_read_only_when_used(tmp_path):
    """Lengths come from the manifest: with the list files gone, everything but the names still works,
    and asking for a name is a clear error naming the file."""
    synthetic_build(tmp_path, 1_000, 10)
    for path in tmp_path.glob("*.jsonl"):
        path.unlink()
    manifest = load_manifest(tmp_path)
    assert len(manifest.sources("train")) == 800 and manifest.samples("train") == 4000
    with pytest.raises(ManifestError, match=r"skipped\.jsonl: the list of skipped inputs cannot be used"):
        format_info(manifest, str(tmp_path))
    with pytest.raises(ManifestError, match=r"train-recordings\.jsonl: the recordings list of split 'train' cannot"):
        manifest.sources("train")[0]


@pytest.fixture(scope="module")
def run_without_lists(real_build, tmp_path_factory):
    """A real build whose list files are gone, and a run trained on it with two loader workers."""
    build = copy_build(real_build, tmp_path_factory.mktemp("nolists"))
    for path in build.glob("*.jsonl"):
        path.unlink()
    run = build.parent / "run"
    train(str(build), run, load_config(overrides=[*TINY_TRAIN, "train.epochs=1", "train.num_workers=2"]),
          progress=False)
    return build, run


def test_training_and_its_loader_workers_never_read_the_lists(run_without_lists, real_build):
    build, run = run_without_lists
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "best_model.pt").exists() and metrics["test"]["clip"]["n"] > 0
    manifest = load_manifest(build)
    seen = sum(len(b.y) for b in make_loader(ShardStream(manifest, "train", 16, shuffle=True), num_workers=2))
    assert seen == manifest.samples("train")


def test_evaluate_info_and_report_show_the_recordings(run_without_lists, real_build, tmp_path):
    build, run = run_without_lists
    for path in real_build.glob("*.jsonl"):  # the lists back: what reports by name needs
        (build / path.name).write_bytes(path.read_bytes())
    manifest = load_manifest(build)
    metrics = evaluate_checkpoint(run / "best_model.pt", str(build), "test", tmp_path / "eval")
    assert metrics["clip"]["n"] == manifest.source_count("test")
    info = format_info(manifest, str(build), verbose=True)
    assert f"test-recordings.jsonl: {manifest.source_count('test')} recordings" in info
    page = write_report(run, str(build)).read_text()
    with np.load(run / "test_predictions.npz") as pred:
        probs, y, source = _softmax(pred["logits"]), pred["y"], pred["source"]
    wrong = [manifest.sources("test")[s] for s in np.unique(source)
             if probs[source == s].mean(0).argmax() != y[source == s][0]]
    assert any(name in page for name in wrong) if wrong else "none wrong" in page


def as_version_1(build) -> None:
    """Rewrite a build as version 1 wrote it: the lists inline in manifest.json, no list files."""
    manifest = load_manifest(build)
    data = {k: v for k, v in json.loads(json.dumps(manifest.data)).items() if k != "skipped_file"}
    data.update(format_version=1, skipped=manifest.skipped, provenance=manifest.provenance)
    for split, info in data["splits"].items():
        info.pop("recordings_file")
        info["sources"] = list(manifest.sources(split))
    (build / MANIFEST_NAME).write_text(json.dumps(data, indent=1))
    for path in build.glob("*.jsonl"):
        path.unlink()


def test_a_version_1_build_still_loads_and_evaluates(run_without_lists, real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    as_version_1(build)
    old, new = load_manifest(build), load_manifest(real_build)
    assert old.format_version == 1 and new.format_version == 3
    assert [list(old.sources(s)) for s in SPLITS] == [list(new.sources(s)) for s in SPLITS]
    assert old.skipped == new.skipped and old.provenance == new.provenance
    assert "format v1" in format_info(old, str(build), verbose=True)
    checkpoint = run_without_lists[1] / "best_model.pt"
    assert evaluate_checkpoint(checkpoint, str(build), "val", tmp_path / "v1")["chunk"] == \
        evaluate_checkpoint(checkpoint, str(real_build), "val", tmp_path / "v2")["chunk"]


def test_a_version_2_build_with_its_whole_config_still_loads_and_gives_the_same_build_settings(real_build, tmp_path):
    """Format 3 records each build setting once (the chunking in `features`, nothing of [train]); a format-2
    manifest, which held the whole config, still loads and gives the same [audio] and [features] settings."""
    new = load_manifest(real_build)
    assert set(new.data["config"]) == {"audio", "split", "shards"}
    assert "chunk_seconds" not in new.data["config"]["audio"] and new.features.chunk_seconds == 2.0
    build = copy_build(real_build, tmp_path)
    whole = load_config(overrides=["features.f_max=8000"]).to_dict()  # the resolved f_max, as format 3 gives it
    (build / MANIFEST_NAME).write_text(json.dumps({**new.data, "format_version": 2, "config": whole}))
    old = load_manifest(build)
    assert old.format_version == 2 and old.build_config() == new.build_config()
    assert old.build_config()["audio"]["chunk_seconds"] == 2.0 and old.build_config()["features"]["n_mels"] == 64


@pytest.mark.parametrize("change", ["one byte", "truncated", "longer"])
def test_a_tampered_list_file_is_a_clear_error_and_never_parsed(real_build, tmp_path, change):
    build = copy_build(real_build, tmp_path)
    path = build / "val-recordings.jsonl"
    data = path.read_bytes()
    # Not JSON any more: had it been parsed, the error would be a JSON one (or none, for the extra row).
    path.write_bytes({"one byte": data[:5] + b"X" + data[6:], "truncated": data[:-10],
                      "longer": data + b'{"path": "car/extra.wav", "label": "car"}\n'}[change])
    manifest = load_manifest(build)  # the lists are checked when read, not at load
    with pytest.raises(ManifestError, match=r"val-recordings\.jsonl: the recordings list of split 'val' cannot be "
                                            r"used: .*(sha256 does not match|bytes, the manifest says)") as error:
        manifest.sources("val")[0]
    assert "JSON" not in str(error.value)
    good, report = verify_build(str(build))
    assert not good and "1 problem(s)" in report and "val-recordings.jsonl" in report
    shards = sum(len(load_manifest(real_build).shards(s)) for s in SPLITS)
    assert verify_build(str(real_build)) == (True, f"{real_build}: {shards} shards and 4 list files checked "
                                                   "against manifest.json: all sizes, sha256 checksums, blocks and "
                                                   "counts match")
    proc = subprocess.run([sys.executable, "-m", "audioshard", "show", str(build), "--split", "val", "--index", "0",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "val-recordings.jsonl" in proc.stderr


def test_a_tampered_list_file_over_http_is_retried_then_named(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    (build / "skipped.jsonl").write_bytes(b'{"path": "x", "reason": "forged"}\n')
    with ShardServer(build) as server:
        manifest = load_manifest(server.url, FAST)
        with pytest.raises(ManifestError, match=r"127\.0\.0\.1.*/skipped\.jsonl: the list of skipped inputs cannot "
                                                r"be used: .*gave up after 2 attempts"):
            _ = manifest.skipped
        assert server.hits["/skipped.jsonl"] == 2
        assert load_manifest(server.url, FAST).sources("test")[0] == load_manifest(real_build).sources("test")[0]


def reseal_list(build, name: str, content: bytes, rows: int | None = None) -> None:
    """Replace a list file and make the manifest agree (a hostile publisher writes the manifest too)."""
    (build / name).write_bytes(content)
    data = json.loads((build / MANIFEST_NAME).read_text())
    entry = data["skipped_file"] if name == "skipped.jsonl" else data["splits"][name.split("-")[0]]["recordings_file"]
    entry.update(bytes=len(content), sha256=sha256_file(build / name), **({"rows": rows} if rows is not None else {}))
    (build / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize(("content", "message"), [
    (b"[1, 2]\n", "line 1: expected a skipped input"),
    (b'{"path": "a", "reason": "b"}\n' * 2, "more than the 1 rows the manifest says"),
    (b"", "0 rows, the manifest says 1"),
    (b"[" * 100_000 + b"\n", "line 1: not a JSON object"),
    (b'{"path": "a", "reason": "\xff"}\n', "not UTF-8 text"),
    (b'{"path": "a", "reason": "b", "provenance": {"url": 3}}\n', "'provenance' must map column names to text"),
])
def test_a_resealed_hostile_list_file_is_a_clear_error(real_build, tmp_path, content, message):
    build = copy_build(real_build, tmp_path)
    reseal_list(build, "skipped.jsonl", content, rows=1)
    with pytest.raises(ManifestError, match=message):
        _ = load_manifest(build).skipped


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["splits"]["val"]["recordings_file"].update(bytes=MAX_LIST_BYTES + 1), "list file is at most 1024 MB"),
    (lambda d: d["splits"]["val"]["recordings_file"].update(rows=10 ** 9), "as many rows as the split has recordings"),
    (lambda d: d["splits"]["val"]["recordings_file"].update(file="../../etc/passwd"), "points outside"),
    (lambda d: d["skipped_file"].update(sha256="0" * 63), "no valid sha256"),
    (lambda d: d["splits"]["val"].pop("recordings_file"), "'recordings_file' must hold file, rows, bytes and sha256"),
])
def test_list_file_entries_are_checked_at_load(real_build, tmp_path, edit, message):
    build = copy_build(real_build, tmp_path)
    data = json.loads((build / MANIFEST_NAME).read_text())
    edit(data)
    (build / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        load_manifest(build)
