"""Raw audio by URL: CSV rows over a real HTTP server on 127.0.0.1 (tests/http_server.py) and a real moto S3
server (tests/s3_server.py). A URL input gives the shards of the same file on disk; a URL that 404s, redirects
to another server, is over the size cap or vanishes before its download is a counted skip named by its URL.
A one-process build to `s3://` uploads the files of the same build into a folder, and nothing on a re-run."""

import csv
import re
import shutil

import pytest
from conftest import DCS, SMALL_BUILD, pick
from http_server import ShardServer
from s3_server import S3Server

from audioshard.build import BuildError, build_shards
from audioshard.cli import main
from audioshard.config import load_config
from audioshard.manifest import load_manifest
from audioshard.names import SPLITS
from audioshard.sources import MAX_AUDIO_BYTES

CFG = load_config(overrides=[*SMALL_BUILD, "shards.http_timeout=2", "shards.http_retries=1"])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """11 real recordings copied into a folder served over HTTP, each with a fixed split (so that a build named
    by URLs and one named by paths split alike)."""
    root = tmp_path_factory.mktemp("served")
    rows = []
    for label, count in {"drone": 4, "car": 3, "speech": 4}.items():
        for i, path in enumerate(pick(DCS / label, count)):
            shutil.copy(path, root / path.name)
            rows.append((path.name, label, ("train", "val", "test", "train")[i % 4]))
    with ShardServer(root) as server:
        server.rows, server.root = rows, root
        yield server


@pytest.fixture()
def http(served):
    served.faults.clear()
    served.hits.clear()
    served.heads.clear()
    return served


def write_csv(path, rows):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


def shard_bytes(build):
    manifest = load_manifest(build)
    return [(build / s.file).read_bytes() for split in SPLITS for s in manifest.shards(split)]


def test_http_rows_give_the_shards_of_the_same_files_on_disk(http, tmp_path):
    by_url = write_csv(tmp_path / "urls.csv", [(http.url + name, label, split) for name, label, split in http.rows])
    by_path = write_csv(http.root / "local.csv", http.rows)
    build_shards(by_url, tmp_path / "from_urls", CFG, workers=2, progress=False)
    build_shards(by_path, tmp_path / "from_disk", CFG, workers=1, progress=False)
    assert shard_bytes(tmp_path / "from_urls") == shard_bytes(tmp_path / "from_disk")  # byte for byte
    remote, local = load_manifest(tmp_path / "from_urls"), load_manifest(tmp_path / "from_disk")
    for split in SPLITS:  # the recording's name in the manifest is its URL
        assert list(remote.sources(split)) == [http.url + name for name in local.sources(split)]
    assert remote.skipped_count == 0
    names = [f"/{name}" for name, _, _ in http.rows]
    assert [http.heads[n] for n in names] == [1] * 11 and [http.hits[n] for n in names] == [1] * 11  # one read each


def test_unusable_urls_are_counted_skips_named_by_url_and_the_rest_builds(http, tmp_path):
    first = http.rows[0][0]
    with open(http.root / "huge.wav", "wb") as stream:  # sparse: over the cap without taking the disk
        stream.truncate(MAX_AUDIO_BYTES + 1)
    shutil.copy(http.root / first, http.root / "vanishing.wav")
    other_server = http.url.replace("127.0.0.1", "localhost")
    http.faults["/moved.wav"] = [f"redirect:{other_server}{first}"]
    http.faults["/same-server.wav"] = [f"redirect:/{first}"] * 2  # HEAD and GET, both followed
    http.faults["/vanishing.wav"] = ["ok", "404"]  # listed by the HEAD, gone at the download
    http.faults["/flaky.wav"] = ["500", "redirect:/" + first, "redirect:/" + first]  # retried after a 500, then fine
    bad = {"gone.wav": r"HTTP 404", "huge.wav": rf"{MAX_AUDIO_BYTES + 1:,} bytes, over the {MAX_AUDIO_BYTES:,}",
           "moved.wav": rf"redirects to {other_server}{first}, another server", "vanishing.wav": r"HTTP 404"}
    rows = [*((http.url + name, label, split) for name, label, split in http.rows),
            *((http.url + name, "drone", "train") for name in [*bad, "same-server.wav", "flaky.wav"]),
            ("ftp://example.org/a.wav", "drone", "train")]
    build_shards(write_csv(tmp_path / "urls.csv", rows), tmp_path / "out", CFG, workers=1, progress=False)
    manifest = load_manifest(tmp_path / "out")
    skipped = {row["path"]: row["reason"] for row in manifest.skipped}
    assert manifest.skipped_count == len(skipped) == 5, skipped
    for name, reason in bad.items():
        assert skipped[http.url + name].startswith(("urls.csv line", http.url + name))
        assert http.url + name in skipped[http.url + name]
        assert re.search(reason, skipped[http.url + name]), skipped[http.url + name]
    assert "ftp:// URLs are not read" in skipped["ftp://example.org/a.wav"]
    assert http.hits["/huge.wav"] == 0 and http.heads["/flaky.wav"] == 2  # never downloaded; HEAD retried after a 500
    assert {http.url + "same-server.wav", http.url + "flaky.wav"} <= set(manifest.sources("train"))


def test_csv_of_s3_urls_to_an_s3_prefix_and_a_missing_key(tmp_path, monkeypatch):
    files = pick(DCS / "drone", 3) + pick(DCS / "car", 3)
    local = tmp_path / "local"
    for path in files:
        (local / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, local / path.parent.name / path.name)
    with S3Server() as s3:
        for key, value in s3.environment().items():
            monkeypatch.setenv(key, value)
        url = s3.upload(local, "audio", "raw")
        rows = [(f"{url}{p.parent.name}/{p.name}", p.parent.name, split)
                for p, split in zip(files, ["train", "val", "test"] * 2, strict=True)]
        rows.append((f"{url}car/missing.wav", "car", "train"))
        table = write_csv(tmp_path / "s3.csv", rows)
        first = build_shards(table, "s3://audio/shards/", CFG, workers=1, progress=False)
        again = build_shards(table, "s3://audio/shards/", CFG, workers=1, progress=False)
        puts = s3.requests["PUT"]
        s3.client().put_object(Bucket="audio", Key="notes/readme.txt", Body=b"not a build")
        with pytest.raises(BuildError, match=r"s3://audio/notes/ is not empty and holds no audioshard build.*--force"):
            build_shards(table, "s3://audio/notes/", CFG, workers=1, progress=False)
        manifest = load_manifest("s3://audio/shards/")
        recordings, skipped = sum(len(manifest.sources(split)) for split in SPLITS), list(manifest.skipped)
        build_shards(table, tmp_path / "out", CFG, workers=1, progress=False)  # the same build, into a folder
        kept = {name: s3.client().get_object(Bucket="audio", Key="shards/" + name)["Body"].read()
                for name in [*first.published.uploaded]}
    assert puts == len(first.published.uploaded) and again.up_to_date and again.published is None  # no PUT again
    assert first.published.uploaded[-1] == "manifest.json" and not first.published.unchanged
    for name, body in kept.items():
        assert body == (tmp_path / "out" / name).read_bytes(), name
    assert recordings == 6
    assert [row["path"] for row in skipped] == [f"{url}car/missing.wav"] and "S3 404" in skipped[0]["reason"]


def test_gs_urls_without_gcsfs_are_a_clear_error_not_a_traceback(tmp_path, capsys):
    write_csv(tmp_path / "gs.csv", [("gs://bucket/raw/drone/a.wav", "drone", "train")])
    for source in (str(tmp_path / "gs.csv"), "gs://bucket/raw/"):
        assert main(["build", source, "--out", str(tmp_path / "out")]) == 2  # the command line's exit for user errors
        err = capsys.readouterr().err
        assert err.startswith("audioshard build: error: gs:// inputs need gcsfs") and "pip install gcsfs" in err
        assert not (tmp_path / "out").exists()  # refused before anything was written
