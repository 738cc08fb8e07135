"""A build from a bucket to a bucket on a real Dask LocalCluster (2 worker processes) and a real moto S3 server on
127.0.0.1: raw audio under s3://audio/raw/ -> `audioshard build s3://audio/raw/ --out s3://audio/shards/ --parts 2
--scheduler local` -> `audioshard verify` and `audioshard train` reading the bucket. The objects are byte for byte
the files of a local build of local copies of the same audio, and hold the chunks of a one-shot build. A re-run
uploads nothing; an upload cut short sends only what is missing, the manifest last. Every command runs in a
process of its own (as in test_cluster.py: no cluster helper process outlives a test inside pytest)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import DCS, SMALL_BUILD, TINY_TRAIN, chunk_table, pick
from s3_server import S3Server

from audioshard.build import build_shards, merge_parts
from audioshard.config import load_config
from audioshard.upload import named_files

OUT = "s3://audio/shards/"
SETTINGS = [a for s in SMALL_BUILD for a in ("--set", s)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """11 real recordings (4 drone, 3 car, 4 speech at 8 kHz) in a local class folder and under s3://audio/raw/."""
    raw = tmp_path_factory.mktemp("raw")
    for label, count in {"drone": 4, "car": 3, "speech": 4}.items():
        (raw / label).mkdir()
        for path in pick(DCS / label, count):
            shutil.copy(path, raw / label / path.name)
    with S3Server() as s3:
        s3.raw, s3.raw_url = raw, s3.upload(raw, "audio", "raw")
        yield s3


def cli(s3, *args):
    done = subprocess.run([sys.executable, "-m", "audioshard", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **s3.environment()}, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


def objects(s3, prefix="shards/") -> dict[str, dict]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket="audio", Prefix=prefix)
    return {item["Key"].removeprefix(prefix): item for page in pages for item in page.get("Contents", [])}


def download(s3, folder):
    for name in objects(s3):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        s3.client().download_file("audio", "shards/" + name, str(folder / name))
    return folder


@pytest.fixture(scope="module")
def built(store):
    store.put_keys.clear()
    done = cli(store, "build", store.raw_url, "--out", OUT, "--parts", 2, "--scheduler", "local", *SETTINGS)
    return done, list(store.put_keys)


def test_bucket_to_bucket_on_a_dask_cluster_equals_a_local_build_then_verifies_and_trains(store, built, tmp_path):
    done, puts = built
    assert "part 1/2 done" in done.stdout and "part 2/2 done" in done.stdout
    got = download(store, tmp_path / "got")
    manifest = json.loads((got / "manifest.json").read_text())
    names = [name for name, _, _ in named_files(manifest)]
    assert sorted(objects(store)) == sorted([*names, "manifest.json"])  # the build's files, nothing else
    assert puts[-1] == "/audio/shards/manifest.json" and len(puts) == len(names) + 1  # the manifest last

    cfg = load_config(overrides=SMALL_BUILD)  # the same build from local copies, in two parts here
    for index in range(2):
        build_shards(store.raw, tmp_path / "local", cfg, workers=1, progress=False, part=(index, 2))
    local = json.loads(json.dumps(merge_parts(tmp_path / "local")))
    for name in names:
        assert (got / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert manifest["input"] == store.raw_url and local["input"] == str(store.raw)
    differ = {"input", "fingerprint"}  # where the audio was read from, and its identity there
    assert {k: v for k, v in manifest.items() if k not in differ} == {k: v for k, v in local.items() if k not in differ}
    build_shards(store.raw, tmp_path / "one_shot", cfg, workers=1, progress=False)
    assert chunk_table(got) == chunk_table(tmp_path / "one_shot")

    verified = cli(store, "verify", OUT).stdout  # exit status 0, and the report says what was checked
    assert f"{sum(name.endswith('.tar') for name in names)} shards and 4 list files checked" in verified
    assert "all sizes, sha256 checksums, blocks and counts match" in verified
    tiny = [a for s in [*TINY_TRAIN, "train.epochs=1"] for a in ("--set", s)]
    cli(store, "train", "--shards", OUT, "--out", tmp_path / "run", "--quiet", *tiny)
    assert (tmp_path / "run" / "best_model.pt").stat().st_size > 1000


def test_a_rerun_uploads_nothing_and_a_cut_upload_sends_only_what_is_missing(store, built):
    before = {name: item["ETag"] for name, item in objects(store).items()}
    store.requests.clear()
    store.put_keys.clear()
    again = cli(store, "build", store.raw_url, "--out", OUT, "--parts", 2, *SETTINGS)  # local processes this time
    assert "already holds this build; nothing built or uploaded" in again.stdout
    assert store.requests["PUT"] == 0 and store.requests["DELETE"] == 0

    shard = next(name for name in before if name.endswith(".tar"))
    for name in (shard, "manifest.json"):  # an upload cut short: these never arrived
        store.client().delete_object(Bucket="audio", Key="shards/" + name)
    store.requests.clear()
    cut = cli(store, "build", store.raw_url, "--out", OUT, "--parts", 2, *SETTINGS)
    assert store.put_keys == [f"/audio/shards/{shard}", "/audio/shards/manifest.json"]  # the manifest last
    assert "uploaded 2 files" in cut.stdout and f"{len(before) - 2} already there unchanged" in cut.stdout
    assert {name: item["ETag"] for name, item in objects(store).items()} == before
