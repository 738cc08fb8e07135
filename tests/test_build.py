import io
import json
import os
import shutil
import tarfile
import time

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from conftest import DCS, SMALL_BUILD, chunk_table, link_tree

import audioshard.build as build_module
from audioshard.audio import chunk_starts
from audioshard.build import BuildError, build_shards, clean, discover, merge_parts
from audioshard.config import load_config
from audioshard.manifest import load_manifest, sha256_file
from audioshard.split import SPLITS, Source, split_sources
from audioshard.stream import ShardStream


def read_all(manifest, split):
    return list(ShardStream(manifest, split, batch_size=1000))


def split_of(build) -> dict[str, str]:
    """Each recording of a build and its split, from the list files."""
    manifest = load_manifest(build)
    return {rel: split for split in SPLITS for rel in manifest.sources(split)}


def test_real_build_accounts_for_every_input(real_raw, real_build):
    manifest = load_manifest(real_build)
    assert manifest.classes == ["car", "drone", "speech"]
    inputs = {f"{p.parent.name}/{p.name}" for p in real_raw.rglob("*.wav")}
    placed = [s for split in SPLITS for s in manifest.sources(split)]
    skipped = {s["path"] for s in manifest.skipped}
    assert len(placed) == len(set(placed)), "a source appears in two splits"
    assert set(placed) | skipped == inputs and not set(placed) & skipped
    for split in SPLITS:  # every class is in every split (stratified)
        assert all(manifest.split(split).recordings[c] > 0 for c in manifest.classes)


def test_real_build_counts_and_checksums_match_the_shards(real_build):
    manifest = load_manifest(real_build)
    for split in SPLITS:
        batches = read_all(manifest, split)
        labels = np.concatenate([b.y.numpy() for b in batches])
        assert len(labels) == manifest.samples(split)
        counts = {c: int((labels == i).sum()) for i, c in enumerate(manifest.classes)}
        assert counts == manifest.split(split).class_counts
        for shard in manifest.shards(split):
            assert sha256_file(real_build / shard.file) == shard.sha256
            with tarfile.open(real_build / shard.file) as tar:
                mels = [m for m in tar.getmembers() if m.name.endswith(".mel.npy")]
                rows = [np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False).shape[0] for m in mels]
                assert sum(rows) == shard.samples


def test_8k_speech_is_resampled_before_chunking(real_build):
    manifest = load_manifest(real_build)
    assert manifest.features.sample_rate == 16000
    expected = 0
    for split in SPLITS:
        for rel in manifest.sources(split):
            if rel.startswith("speech/"):
                info = sf.info(str(DCS / rel))
                assert info.samplerate == 8000
                expected += len(chunk_starts(info.frames * 2, 32000, 16000, 0.5, "pad"))  # 2-s chunks every 1 s
    assert expected == sum(manifest.split(s).class_counts["speech"] for s in SPLITS)  # (no silent chunk in them)


def test_chunks_keep_source_start_and_label(real_build):
    manifest = load_manifest(real_build)
    for batch in read_all(manifest, "val"):
        for y, source, start in zip(batch.y, batch.source, batch.start, strict=True):
            rel = manifest.sources("val")[int(source)]
            assert rel.split("/")[0] == manifest.classes[int(y)]
            assert float(start) % 1.0 == 0.0  # the default hop_seconds


def test_shards_are_plain_webdataset_tars(real_build):
    manifest = load_manifest(real_build)
    url = str(real_build / manifest.shards("train")[0].file)
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert samples and {"mel.npy", "label.npy", "source.npy", "start.npy"} <= set(samples[0])


def test_same_output_for_any_worker_count_and_idempotent(tmp_path):
    raw = link_tree(tmp_path / "raw", {"drone": 6, "car": 5, "speech": 6})
    cfg = load_config(overrides=SMALL_BUILD)
    one = build_shards(raw, tmp_path / "w1", cfg, workers=1, progress=False).manifest
    two = build_shards(raw, tmp_path / "w2", cfg, workers=2, progress=False).manifest
    assert [s["shards"] for s in one["splits"].values()] == [s["shards"] for s in two["splits"].values()]
    for name in ("manifest.json", "skipped.jsonl", *(f"{split}-recordings.jsonl" for split in SPLITS)):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    again = build_shards(raw, tmp_path / "w1", cfg, workers=2, progress=False)
    assert again.up_to_date
    changed = load_config(overrides=[*SMALL_BUILD, "features.n_mels=32"])
    with pytest.raises(BuildError, match="different build"):
        build_shards(raw, tmp_path / "w1", changed, workers=1, progress=False)
    rebuilt = build_shards(raw, tmp_path / "w1", changed, workers=1, force=True, progress=False)
    assert rebuilt.manifest["features"]["n_mels"] == 32
    assert not list((tmp_path / "w1").glob(".*"))  # no marker or temp files left behind


def test_helper_processes_share_the_work_and_the_output_stays_in_order(tmp_path, monkeypatch):
    """With one file per task and tasks slow enough for the helpers to join in, the tasks are done by
    several processes and finish out of order, yet the shards are byte for byte the 1-worker build's."""
    raw = link_tree(tmp_path / "raw", {"drone": 6, "car": 5, "speech": 6})
    cfg = load_config(overrides=SMALL_BUILD)
    done_by = tmp_path / "done_by.txt"
    process_files = build_module.process_files

    def slow_process_files(sources, cfg):
        time.sleep(0.02)
        with open(done_by, "a") as log:  # appends of one short line each: no interleaving
            log.write(f"{os.getpid()}\n")
        return process_files(sources, cfg)

    monkeypatch.setattr(build_module, "FILES_PER_TASK", 1)
    monkeypatch.setattr(build_module, "process_files", slow_process_files)  # forked helpers inherit it
    shards = {}
    for workers in (1, 3):
        done_by.write_text("")
        manifest = build_shards(raw, tmp_path / f"w{workers}", cfg, workers=workers, progress=False).manifest
        shards[workers] = [s["shards"] for s in manifest["splits"].values()]
        pids = done_by.read_text().split()
        assert len(pids) == 17 and len(set(pids)) == workers
    assert shards[1] == shards[3]


def test_interrupted_build_is_redone_and_clean_removes_outputs(tmp_path):
    raw = link_tree(tmp_path / "raw", {"drone": 3, "car": 3, "speech": 3})
    out = tmp_path / "out"
    out.mkdir()
    (out / ".audioshard-build").write_text("{}")  # what a killed build leaves: marker, partial tars, no manifest
    (out / "train-000000.tar").write_bytes(b"partial")
    build_shards(raw, out, load_config(), workers=1, progress=False)
    assert (out / "manifest.json").exists() and tarfile.is_tarfile(out / "train-000000.tar")
    (out / "notes.txt").write_text("mine")
    clean(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(BuildError, match="does not look like an audioshard build"):
        clean(out)


def test_refuses_foreign_non_empty_folder(tmp_path):
    raw = link_tree(tmp_path / "raw", {"drone": 3, "car": 3, "speech": 3})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.pdf").write_text("precious")
    with pytest.raises(BuildError, match="not empty"):
        build_shards(raw, tmp_path / "out", load_config(), workers=1, progress=False)
    assert (tmp_path / "out" / "thesis.pdf").read_text() == "precious"


def write_tone(path, rate=16000, seconds=3.0, channels=1, subtype="PCM_16", amp=0.3, freq=300.0):
    t = np.arange(int(rate * seconds)) / rate
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    sf.write(path, np.stack([x] * channels, 1) if channels > 1 else x, rate, subtype=subtype)


def test_bad_inputs_are_reported_and_skipped(tmp_path):
    raw = tmp_path / "raw"
    for label in ("hum", "buzz", "lonely", "empty"):
        (raw / label).mkdir(parents=True)
    for i in range(5):
        write_tone(raw / "hum" / f"ok{i}.wav", freq=100 + 10 * i)
    write_tone(raw / "buzz" / "8bit.wav", subtype="PCM_U8", freq=900)
    write_tone(raw / "buzz" / "24bit.wav", subtype="PCM_24", freq=950)
    write_tone(raw / "buzz" / "float.wav", subtype="FLOAT", freq=1000)
    write_tone(raw / "buzz" / "stereo48k.flac", rate=48000, channels=2, freq=1100)
    write_tone(raw / "buzz" / "short.wav", seconds=0.3, freq=1200)
    write_tone(raw / "buzz" / "sønderjysk-ä.wav", freq=1300)  # non-ASCII name
    write_tone(raw / "buzz" / "silent.wav", amp=0.0)
    write_tone(raw / "buzz" / "header-only.wav", rate=22050, seconds=0.0)  # a valid header, no frames, other rate
    (raw / "buzz" / "gone.wav").symlink_to(tmp_path / "deleted.wav")
    (raw / "buzz" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    (raw / "buzz" / "zero.wav").write_bytes(b"")
    (raw / "buzz" / "text.wav").write_text("not audio at all\n" * 50)
    (raw / "buzz" / ".hidden.wav").write_bytes(b"x")
    (raw / "buzz" / "readme.txt").write_text("notes")
    (raw / "buzz" / "cover.jpg").write_bytes(b"\xff\xd8")
    write_tone(raw / "lonely" / "only.wav", freq=2000)
    (raw / "empty" / "notes.md").write_text("no audio here")

    manifest = build_shards(raw, tmp_path / "out", load_config(), workers=2, progress=False).manifest
    reasons = {s["path"]: s["reason"] for s in load_manifest(tmp_path / "out").skipped}
    assert set(reasons) == {"buzz/silent.wav", "buzz/corrupt.wav", "buzz/zero.wav", "buzz/text.wav",
                            "buzz/header-only.wav"}
    assert "silent" in reasons["buzz/silent.wav"] and "empty file" in reasons["buzz/zero.wav"]
    assert "corrupt.wav" in reasons["buzz/corrupt.wav"] and "no audio samples" in reasons["buzz/header-only.wav"]
    assert manifest["ignored"] == {"hidden files": 1, "non-audio files (.txt)": 1, "non-audio files (.jpg)": 1,
                                   "non-audio files (.md)": 1, "broken symlinks": 1}
    assert manifest["classes"] == ["buzz", "hum", "lonely"]
    assert any("empty" in w and "left out" in w for w in manifest["warnings"])
    assert any("'lonely'" in w and "only 1 recording" in w for w in manifest["warnings"])
    placed = set(split_of(tmp_path / "out"))
    assert {"buzz/8bit.wav", "buzz/24bit.wav", "buzz/float.wav", "buzz/stereo48k.flac", "buzz/short.wav",
            "buzz/sønderjysk-ä.wav", "lonely/only.wav"} <= placed
    assert len(placed) + len(reasons) == 5 + 11 + 1


def test_an_unexpected_decoder_error_skips_that_file_only(tmp_path, monkeypatch):
    """A bug in a decoder on one odd file (not an AudioError) is reported and skipped, never fatal."""
    raw = link_tree(tmp_path / "raw", {"drone": 3, "car": 3, "speech": 3})
    real_load = build_module.load

    def load(path, sample_rate):  # stands in for a library bug on one file
        if "car" in str(path) and not hasattr(load, "failed"):
            load.failed = path
            raise IndexError("list index out of range")
        return real_load(path, sample_rate)

    monkeypatch.setattr(build_module, "load", load)
    build_shards(raw, tmp_path / "out", load_config(), workers=1, progress=False)
    [skipped] = load_manifest(tmp_path / "out").skipped
    assert "could not be decoded (IndexError: list index out of range)" in skipped["reason"]
    assert len(split_of(tmp_path / "out")) == 8


def test_discovery_walks_nested_folders_and_links_like_pathlib(tmp_path):
    """The fast directory walk keeps rglob's meaning: nested files in sorted path order, symlinked
    files in, dangling links and symlinked folders out (no loops), hidden parts and other suffixes
    counted, a symlinked class folder read."""
    raw, elsewhere = tmp_path / "raw", tmp_path / "elsewhere"
    for rel in ("a/x.wav", "a/sub/y.WAV", "a/sub-z.wav", "a/sub/0.flac", "a/.h/z.wav", "a/noext", "a/dot.",
                "b/deep/er/q.mp3", "top.wav", "sources.csv"):
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(b"x")
    (elsewhere / "c").mkdir(parents=True)
    (elsewhere / "c" / "far.ogg").write_bytes(b"x")
    (raw / "a" / "link.wav").symlink_to(raw / "a" / "x.wav")
    (raw / "a" / "dangling.wav").symlink_to(tmp_path / "missing.wav")
    (raw / "b" / "loop").symlink_to(raw, target_is_directory=True)
    (raw / "c").symlink_to(elsewhere / "c", target_is_directory=True)

    found = discover(raw, load_config())
    assert [s.rel for s in found.sources] == ["a/link.wav", "a/sub/0.flac", "a/sub/y.WAV", "a/sub-z.wav", "a/x.wav",
                                              "b/deep/er/q.mp3", "c/far.ogg"]
    assert {s.label for s in found.sources} == {"a", "b", "c"}
    assert all(os.path.isabs(s.path) and os.path.isfile(s.path) for s in found.sources)
    assert found.ignored == {"hidden files": 1, "non-audio files (no extension)": 2, "files outside class folders": 1,
                             "broken symlinks": 1}
    assert found.warnings == []


def test_an_unreadable_folder_is_named_not_silently_missing(tmp_path, monkeypatch):
    (tmp_path / "raw" / "a" / "locked").mkdir(parents=True)
    (tmp_path / "raw" / "a" / "x.wav").write_bytes(b"x")
    (tmp_path / "raw" / "a" / "locked" / "y.wav").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):  # a folder without read permission (chmod cannot deny root, who may run the tests)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = discover(tmp_path / "raw", load_config())
    assert [s.rel for s in found.sources] == ["a/x.wav"]
    assert len(found.warnings) == 1 and "locked could not be read (Permission denied)" in found.warnings[0]


def test_nothing_usable_is_fatal_with_a_clear_message(tmp_path):
    (tmp_path / "raw" / "a").mkdir(parents=True)
    (tmp_path / "raw" / "a" / "bad.wav").write_bytes(b"nope")
    with pytest.raises(BuildError, match="nothing usable"):
        build_shards(tmp_path / "raw", tmp_path / "out", load_config(), workers=1, progress=False)
    with pytest.raises(BuildError, match="no class subfolders"):
        build_shards(tmp_path / "raw" / "a", tmp_path / "out2", load_config(), workers=1, progress=False)


def test_csv_input_with_groups_and_fixed_splits(tmp_path):
    speech = sorted((DCS / "speech").glob("*.wav"))
    drone = sorted((DCS / "drone").glob("*.wav"))[:12]
    rows = ["path,label,group,split"]
    rows += [f"{p},speech,{p.stem.split('_')[0]}," for p in speech[::10]]  # grouped by speaker
    rows += [f"{p},drone,,{'test' if i < 2 else ''}" for i, p in enumerate(drone)]
    rows += ["missing.wav,drone,,", ",drone,,", f"{drone[0]},drone,,holdout"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    # the rows name the shared recordings, outside the CSV's folder: this CSV is ours, so opt in
    build_shards(tmp_path / "list.csv", tmp_path / "out", load_config(overrides=["shards.csv_allow_outside=true"]),
                 workers=2, progress=False)
    where = split_of(tmp_path / "out")
    speakers = {}
    for path in speech[::10]:
        speakers.setdefault(path.stem.split("_")[0], set()).add(where[str(path)])
    assert len(speakers) == 6 and all(len(s) == 1 for s in speakers.values()), speakers  # one speaker, one split
    assert {s for splits in speakers.values() for s in splits} == set(SPLITS)
    assert where[str(drone[0])] == "test" and where[str(drone[1])] == "test"
    reasons = " ".join(s["reason"] for s in load_manifest(tmp_path / "out").skipped)
    assert "file not found" in reasons and "empty path or label" in reasons and "'holdout'" in reasons
    assert "line " in reasons


def test_split_is_grouped_stratified_and_seeded():
    sources = [Source(f"/{c}/{i}", f"{c}/{i}", c, f"{c}/{i}") for c in "ab" for i in range(20)]
    first, _ = split_sources(sources, 0.15, 0.15, seed=1)
    assert first == split_sources(sources, 0.15, 0.15, seed=1)[0]
    assert first != split_sources(sources, 0.15, 0.15, seed=2)[0]
    for c in "ab":
        counts = {s: sum(1 for k, v in first.items() if k.startswith(c) and v == s) for s in SPLITS}
        assert counts == {"train": 14, "val": 3, "test": 3}


def test_manifest_records_what_is_needed(real_build):
    data = json.loads((real_build / "manifest.json").read_text())
    assert data["format_version"] == 3 and data["features"]["n_mels"] == 64
    assert data["normalization"]["std"] > 0 and data["features"]["sample_rate"] == 16000
    assert "sample_rate" not in data["config"]["audio"]  # recorded once, in `features`


def test_parts_and_merge_equal_a_one_shot_build(tmp_path):
    raw = link_tree(tmp_path / "raw", {"drone": 6, "car": 5, "speech": 6})
    cfg = load_config(overrides=SMALL_BUILD)
    whole = build_shards(raw, tmp_path / "whole", cfg, workers=1, progress=False).manifest
    build_shards(raw, tmp_path / "parts", cfg, workers=1, progress=False, part=(1, 2))
    with pytest.raises(BuildError, match=r"parts \[0\] of 2 are missing"):
        merge_parts(tmp_path / "parts")
    build_shards(raw, tmp_path / "parts", cfg, workers=1, progress=False, part=(0, 2))
    merged = merge_parts(tmp_path / "parts")
    assert chunk_table(tmp_path / "parts") == chunk_table(tmp_path / "whole")
    assert merged["normalization"]["mean"] == pytest.approx(whole["normalization"]["mean"], rel=1e-9)
    assert merged["normalization"]["std"] == pytest.approx(whole["normalization"]["std"], rel=1e-9)
    for split in SPLITS:
        assert merged["splits"][split]["class_counts"] == whole["splits"][split]["class_counts"]
        assert merged["splits"][split]["recordings_file"]["rows"] == whole["splits"][split]["recordings_file"]["rows"]
    assert split_of(tmp_path / "parts") == split_of(tmp_path / "whole")
    clean(tmp_path / "parts")
    assert not (tmp_path / "parts").exists()


def test_parts_built_from_copies_made_at_other_times_merge_into_the_one_shot_build(tmp_path):
    """Each machine of a job array has its own copy of the input (a download, `aws s3 sync`), written at its
    own time: the parts are one job all the same, and together they hold the one-shot build's chunks, splits
    and statistics (each part keeps its own shard files)."""
    source = link_tree(tmp_path / "raw", {"drone": 6, "car": 5, "speech": 6})
    copies = [tmp_path / "machine0", tmp_path / "machine1"]
    for index, copy in enumerate(copies):
        shutil.copytree(source, copy)  # real files (the links followed)
        for path in copy.rglob("*.wav"):
            os.utime(path, ns=(10**18 + index * 10**15, 10**18 + index * 10**15))  # another day on each machine
    cfg = load_config(overrides=SMALL_BUILD)
    whole = build_shards(copies[0], tmp_path / "whole", cfg, workers=1, progress=False).manifest
    for index, copy in enumerate(copies):
        build_shards(copy, tmp_path / "parts", cfg, workers=1, progress=False, part=(index, 2))
    merged = merge_parts(tmp_path / "parts")
    assert chunk_table(tmp_path / "parts") == chunk_table(tmp_path / "whole")
    assert split_of(tmp_path / "parts") == split_of(tmp_path / "whole")
    assert merged["normalization"]["mean"] == pytest.approx(whole["normalization"]["mean"], rel=1e-9)
    for split in SPLITS:
        assert merged["splits"][split]["class_counts"] == whole["splits"][split]["class_counts"]
    # A copy that differs in content (another size) is another job: refused at the merge, not mixed in.
    (copies[1] / "car").joinpath(sorted(p.name for p in (copies[1] / "car").iterdir())[0]).write_bytes(b"RIFF")
    shutil.rmtree(tmp_path / "parts" / "part-1-of-2")
    build_shards(copies[1], tmp_path / "parts", cfg, workers=1, progress=False, part=(1, 2))
    with pytest.raises(BuildError, match="job|different"):
        merge_parts(tmp_path / "parts")


def test_segments_of_one_fetched_video_share_a_split(tmp_path):
    raw = link_tree(tmp_path / "raw", {"drone": 8, "car": 8})
    drones = sorted((raw / "drone").iterdir())
    rows = ["path,label,url,link,extractor,id"]
    rows += [f"drone/{p.name},drone,u,l,youtube,VIDEO1" for p in drones[:5]]  # five segments of one video
    (raw / "sources.csv").write_text("\n".join(rows) + "\n")
    build_shards(raw, tmp_path / "out", load_config(), workers=1, progress=False)
    where = split_of(tmp_path / "out")
    assert len({where[f"drone/{p.name}"] for p in drones[:5]}) == 1


def test_silent_chunks_are_left_out_and_counted_unless_the_recording_has_nothing_else(tmp_path):
    """A real recording padded with digital silence (as many data sets pad clips to a fixed length):
    its silent chunks carry the label but none of the sound, so the build leaves them out and counts them."""
    speech = sorted((DCS / "drone").glob("*.wav"))[0]
    samples, rate = sf.read(speech, dtype="float32")
    raw = tmp_path / "raw"
    for name in ("drone", "car"):
        (raw / name).mkdir(parents=True)
        for i in range(3):
            sf.write(raw / name / f"clip{i}.wav", samples[: 2 * rate], rate)
    sf.write(raw / "drone" / "padded.wav", np.concatenate([samples[: 2 * rate], np.zeros(5 * rate, "float32")]), rate)
    # its only sound sits in a tail too short for a chunk: the one (silent) chunk is all it has, so it stays
    sf.write(raw / "car" / "tail.wav", np.concatenate([np.zeros(2 * rate, "float32"), samples[: rate // 2]]), rate)
    overrides = ["split.val_fraction=0", "split.test_fraction=0", "audio.hop_seconds=0"]  # back to back: 2-s steps
    build_shards(raw, tmp_path / "b", load_config(overrides=overrides), progress=False)
    manifest = load_manifest(tmp_path / "b")
    train = manifest.split("train")
    assert train.silent_chunks == 3  # padded.wav: 2 s of sound, then chunks at 2, 4 and a 1-s tail at 6 s: zeros
    starts = {(manifest.sources("train")[int(s)], float(t)) for b in read_all(manifest, "train")
              for s, t in zip(b.source, b.start, strict=True)}
    assert {t for rel, t in starts if rel.endswith("padded.wav")} == {0.0}
    assert {t for rel, t in starts if rel.endswith("tail.wav")} == {0.0}
    assert train.samples == 6 + 1 + 1
    build_shards(raw, tmp_path / "all", load_config(overrides=[*overrides, "audio.skip_silent=false"]), progress=False)
    kept = load_manifest(tmp_path / "all").split("train")
    assert kept.samples == 6 + 4 + 1 and kept.silent_chunks == 0
