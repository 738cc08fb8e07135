"""Hostile names, values and files, round 3 (issue 39, items 5, 9, 10, 13, 14, 15, 16), on real parts: real
recordings and builds, a real training run, real matplotlib, a real `serve` with real slow sockets, the CLI
run as a user runs it."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import DCS, SMALL_BUILD, TINY_TRAIN, copy_build, pick

import audioshard
from audioshard.build import build_shards
from audioshard.config import MAXIMUM, Config, ConfigError, load_config
from audioshard.manifest import load_manifest
from audioshard.serve import serving
from audioshard.shardfile import ShardDataError
from audioshard.termsafe import printable
from audioshard.train import train

# Class names that matplotlib would read as (bad) math text, and one that drives the terminal.
MATH = "dr$\\oops{$one"
ESCAPE = "car\x1b]0;pwned\x07\x1b[2J"


def cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "audioshard", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """A real build whose class names hold `$...$` and terminal escapes, and a real (tiny) training run on it."""
    root = tmp_path_factory.mktemp("odd")
    for label, source, count in ((MATH, "drone", 16), (ESCAPE, "car", 12), ("speech", "speech", 16)):
        (root / "raw" / label).mkdir(parents=True)
        for path in pick(DCS / source, count):
            (root / "raw" / label / path.name).symlink_to(path)
    build = root / "shards"
    build_shards(root / "raw", build, load_config(overrides=SMALL_BUILD), workers=2, progress=False)
    run = root / "run"
    metrics = train(str(build), run, load_config(overrides=TINY_TRAIN), progress=False)
    return build, run, metrics


# --- 5: math text in names -------------------------------------------------------------------------------


def test_math_text_class_names_end_a_run_with_every_result_and_picture(odd_run):
    build, run, metrics = odd_run
    assert sorted(metrics["classes"]) == sorted([MATH, ESCAPE, "speech"])
    for name in ("metrics.json", "test_report.txt", "test_predictions.npz", "val_confusion_matrix.png",
                 "test_confusion_matrix.png", "training_curves.png", "report.html"):
        assert (run / name).stat().st_size > 0, name  # before: a traceback after the last epoch, none of these
    assert json.loads((run / "metrics.json").read_text())["test"]["clip"]["n"] > 0


def test_show_and_predict_plot_draw_math_text_names(odd_run, tmp_path):
    build, run, _ = odd_run
    proc = cli("show", build, "--split", "val", "--index", "0", "--out", tmp_path / "chunk.png")
    no_traceback(proc)
    assert proc.returncode == 0 and (tmp_path / "chunk.png").stat().st_size > 0
    odd = tmp_path / "a$\\bad{$ b.wav"
    shutil.copy(pick(DCS / "drone", 1)[0], odd)
    proc = cli("predict", "--checkpoint", run / "best_model.pt", odd, "--plot", tmp_path / "timeline.png")
    no_traceback(proc)
    assert proc.returncode == 0 and (tmp_path / "timeline.png").stat().st_size > 0


def test_a_plot_that_cannot_be_drawn_is_reported_and_costs_no_results(odd_run, tmp_path):
    """A matplotlibrc asking for LaTeX on a machine without it makes every figure fail at savefig (a real
    failure, no mock): evaluate still writes its numbers, says which picture is missing, and exits 0."""
    assert shutil.which("latex") is None, "this test needs a machine without LaTeX"
    build, run, _ = odd_run
    (tmp_path / "rc").mkdir()
    (tmp_path / "rc" / "matplotlibrc").write_text("text.usetex: True\n")
    out = tmp_path / "eval"
    proc = cli("evaluate", "--checkpoint", run / "best_model.pt", "--shards", build, "--split", "test", "--out", out,
               env={"MATPLOTLIBRC": str(tmp_path / "rc")})
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test_confusion_matrix.png not drawn" in proc.stderr
    assert not (out / "test_confusion_matrix.png").exists()
    assert json.loads((out / "metrics.json").read_text())["chunk"]["n"] > 0 and (out / "test_report.txt").exists()


# --- 10: control characters reach the terminal escaped -----------------------------------------------------


def test_printable_escapes_what_a_terminal_would_act_on():
    assert printable("a\x1b[2Jb\x07\r\x9b\u202e") == "a\\x1b[2Jb\\x07\\r\\x9b\\u202e"
    assert printable("one\ntwo") == "one\\ntwo" and printable("one\ntwo", lines=True) == "one\ntwo"
    assert printable("drône $x$ 日本") == "drône $x$ 日本"  # printable text is left alone


def test_cli_output_and_errors_show_control_characters_escaped(odd_run, tmp_path):
    build, run, _ = odd_run
    odd = tmp_path / "rec\x1b[31m.wav"
    shutil.copy(pick(DCS / "car", 1)[0], odd)
    proc = cli("predict", "--checkpoint", run / "best_model.pt", odd, "--per-chunk")
    assert proc.returncode == 0 and "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "rec\\x1b[31m.wav" in proc.stdout and "car\\x1b]" in proc.stdout.splitlines()[0]
    for args in (("info", build), ("show", build, "--split", "val", "--out", tmp_path / "c.png")):
        proc = cli(*args)
        assert proc.returncode == 0 and "\x1b" not in proc.stdout, args
    assert "car\\x1b]0;pwned" in cli("info", build).stdout
    proc = cli("info", tmp_path / "no\x1b[2Jsuch")  # an error message quoting the name
    assert proc.returncode == 2 and "\x1b" not in proc.stderr and "no\\x1b[2Jsuch" in proc.stderr
    proc = cli("predict", "--checkpoint", run / "best_model.pt", tmp_path / "gone\x1b[2J.wav")  # skipped-file line
    assert proc.returncode == 1 and "\x1b" not in proc.stderr and "gone\\x1b[2J.wav" in proc.stderr


# --- 13: report against another build, edited metrics and predictions ---------------------------------------


def test_report_refuses_another_builds_classes(odd_run, real_build):
    _, run, _ = odd_run
    proc = cli("report", run, "--shards", real_build)
    no_traceback(proc)
    assert proc.returncode == 2 and "give --shards the build this run was trained on" in proc.stderr


def _edit_npz(path: Path, **changes) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    np.savez(path, **arrays)


@pytest.mark.parametrize("edit, message", [
    (lambda run: (run / "metrics.json").write_text('{"test": "x"}'), "must hold clip accuracy"),
    (lambda run: (run / "metrics.json").write_text("[" * 100_000), "cannot read it"),
    (lambda run: (run / "metrics.json").write_text(json.dumps({**json.loads((run / "metrics.json").read_text()),
                                                               "train_seconds": "long"})), "'train_seconds'"),
    (lambda run: _edit_npz(run / "test_predictions.npz", y=np.full(3, 70_000)), "differ in length"),
    (lambda run: _edit_npz(run / "test_predictions.npz",
                           y=np.full(len(np.load(run / "test_predictions.npz")["y"]), 7)), "labels outside 0..2"),
    (lambda run: _edit_npz(run / "test_predictions.npz", logits=np.zeros((2, 2, 2))), "logits is a 3-d"),
    (lambda run: np.savez(run / "test_predictions.npz", logits=np.array([object()], dtype=object)), "cannot read it"),
    (lambda run: (run / "test_predictions.npz").write_bytes(b"PK\x03\x04 not a zip"), "cannot read it"),
])
def test_report_refuses_edited_metrics_and_predictions(odd_run, tmp_path, edit, message):
    _, run, _ = odd_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    edit(copy)
    proc = cli("report", copy)
    no_traceback(proc)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]


# --- 9: serve: a deadline per request, only what the manifest names ------------------------------------------


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exn:
        return exn.code


def test_serve_gives_only_what_the_manifest_names(real_build, tmp_path):
    build = copy_build(real_build, tmp_path)
    (build / "notes.txt").write_text("private")
    shutil.copy(build / "val-000000.tar", build / "extra-000000.tar")
    (build / "train-recordings.jsonl.bak").write_text("{}")
    manifest = load_manifest(build)
    named = ["manifest.json"] + [s.file for split in manifest.split_names for s in manifest.shards(split)]
    named += [manifest.split(split).recordings_file.file for split in manifest.split_names]
    named.append(manifest.data["skipped_file"]["file"])
    with serving(build) as url:
        assert all(_status(url + name) == 200 for name in named)
        for name in ("notes.txt", "extra-000000.tar", "train-recordings.jsonl.bak", ".audioshard-build"):
            assert _status(url + name) == 404, name  # before: every one of these was served


def test_serve_closes_a_trickling_client_at_its_deadline(real_build):
    """Clients sending a byte of their request every 0.3 s (each read well within the 1-s timeout) held a slot
    for as long as they liked; now the whole request gets 1 s, and the slots come back."""
    with serving(real_build, timeout=1.0, max_connections=2) as url:
        host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
        slow = [socket.create_connection((host, port)) for _ in range(2)]
        started, closed = time.monotonic(), [None, None]
        request = b"GET /manifest.json HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        for i in range(len(request)):
            for k, sock in enumerate(slow):
                if closed[k] is None:
                    try:
                        sock.sendall(request[i:i + 1])
                    except OSError:
                        closed[k] = time.monotonic() - started
            if all(c is not None for c in closed) or time.monotonic() - started > 8:
                break
            time.sleep(0.3)
        assert all(c is not None and c < 4.0 for c in closed), closed  # before: never closed
        assert _status(url + "manifest.json") == 200  # the slots are free again
        for sock in slow:
            sock.close()


# --- 14: unblock on decoded arrays ---------------------------------------------------------------------------


def test_unblock_refuses_decoded_labels_that_a_cast_would_wrap(real_build):
    shard = real_build / "val-000000.tar"
    decoded = [{**s, "label.npy": s["label.npy"].astype(np.int64)}
               for s in wds.WebDataset(str(shard), shardshuffle=False).decode()]
    assert len(list(audioshard.unblock(decoded))) == load_manifest(real_build).shards("val")[0].samples  # usable
    forged = [{**decoded[0], "label.npy": np.full_like(decoded[0]["label.npy"], 70_000)}]
    with pytest.raises(ShardDataError, match="do not fit int16"):
        list(audioshard.unblock(forged))  # before: label 4464, silently
    forged = [{**decoded[0], "source.npy": np.full(len(decoded[0]["source.npy"]), 2**40)}]
    with pytest.raises(ShardDataError, match="do not fit int32"):
        list(audioshard.unblock(forged))
    with tarfile.open(shard) as tar:  # raw bytes from the tar go through the same checks as before
        assert tar.getmembers() and io.BytesIO(tar.extractfile(tar.getmembers()[0]).read()).read(6)


# --- 15: config values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("audio.hop_seconds=1e-9", "audio.hop_seconds = 1e-09 is below chunk_seconds / 100"),
    ("split.group_regex=([", "split.group_regex = '([' is not a valid regular expression"),
    ("audio.extensions=[['.wav']]", "audio.extensions: expected a list of strings"),
    ("audio.extensions=" + "[" * 5000 + "]" * 5000, "the value nests too deep"),
    ("shards.http_timeout=1e308", "shards.http_timeout = 1e+308 is out of range; valid: 0.1 to 3600"),
    ("shards.http_timeout=0", "shards.http_timeout = 0.0 is out of range; valid: 0.1 to 3600"),
    ("features.n_fft=1000000000", "features.n_fft = 1000000000 is out of range; valid: above 0 to 65536"),
    ("features.hop_length=1", "features.hop_length = 1 gives 32001 frames per chunk"),
    ("audio.sample_rate=100", "audio.sample_rate = 100 is out of range; valid: 1000 to 768000"),
    ("train.seed=-1", "train.seed = -1 is out of range"),
    ("shards.http_retries=1000", "shards.http_retries = 1000 is out of range; valid: 0 to 20"),
])
def test_config_values_out_of_range_are_config_errors_at_the_cli(override, message):
    proc = cli("config", "--set", override, timeout=60)
    no_traceback(proc)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-500:]


def test_every_number_setting_has_a_range_and_the_defaults_are_inside():
    numbers = [f"{s}.{k}" for s, values in Config().to_dict().items() for k, v in values.items()
               if type(v) in (int, float)]
    # model.width: MAX_WIDTH; shards.block_size: build's block_problem (each with its own message)
    assert numbers and set(numbers) - set(MAXIMUM) == {"model.width", "shards.block_size"}
    load_config()  # the defaults pass
    with pytest.raises(ConfigError, match="not valid TOML: a value nests too deep"):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"deep-{os.getpid()}.toml"
        path.write_text("[audio]\nextensions = " + "[" * 100_000 + "]" * 100_000 + "\n")
        try:
            load_config(path)
        finally:
            path.unlink()


def test_show_index_out_of_range_is_a_clear_error(real_build, tmp_path):
    for index in ("-1", "100000000"):
        proc = cli("show", real_build, "--index", index, "--out", tmp_path / "c.png")
        no_traceback(proc)
        assert proc.returncode == 2 and f"--index {index} is out of range" in proc.stderr


# --- 16: a CSV naming files outside its folder --------------------------------------------------------------


def test_csv_rows_outside_its_folder_are_refused_without_telling_what_exists(tmp_path):
    folder = tmp_path / "csvdir"
    (folder / "audio").mkdir(parents=True)
    rows = ["path,label"]
    for label in ("drone", "car"):
        for path in pick(DCS / label, 8):
            shutil.copy(path, folder / "audio" / path.name)
            rows.append(f"audio/{path.name},{label}")
    elsewhere = pick(DCS / "speech", 1)[0]
    (folder / "audio" / "link.wav").symlink_to(elsewhere)
    hostile = [str(elsewhere), "/etc/passwd", "/no/such/file.wav", "../../etc/hostname", "audio/link.wav",
               "audio/../../outside.wav"]
    rows += [f"{path},drone" for path in hostile]
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    proc = cli("build", folder / "list.csv", "--out", out, "--quiet", *[a for s in SMALL_BUILD for a in ("--set", s)])
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-1000:]
    manifest = load_manifest(out)
    used = {s for split in manifest.split_names for s in manifest.sources(split)}
    assert used == {f"audio/{p.name}" for label in ("drone", "car") for p in pick(DCS / label, 8)}
    reasons = {s["path"]: s["reason"] for s in manifest.skipped}
    assert set(reasons) == set(hostile)
    # one reason for each, whatever exists there: a line number, nothing else differs
    assert len({r.split(": ", 1)[1] for r in reasons.values()}) == 1
    assert "outside the CSV's folder" in reasons["/etc/passwd"] and "not found" not in " ".join(reasons.values())
    assert any("6 rows of list.csv name files outside its folder" in w for w in manifest.warnings)
    assert "6 rows of list.csv name files outside its folder" in proc.stdout  # `build` prints the warnings

    proc = cli("build", folder / "list.csv", "--out", tmp_path / "mine", "--quiet", "--set",
               "shards.csv_allow_outside=true", *[a for s in SMALL_BUILD for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-1000:]
    mine = load_manifest(tmp_path / "mine")
    used = {s for split in mine.split_names for s in mine.sources(split)}
    assert str(elsewhere) in used  # opted in: the user's own CSV works as before
    assert "the same file as line" in {s["path"]: s["reason"] for s in mine.skipped}["audio/link.wav"]  # its link
