"""AudioSet segment lists: parsing (ontology names, --classes, bad rows, bounds) without a network, then
the real yt-dlp path through the CLI against the local HTTP server of test_acquire.py: each YouTube id is
served as /audioset/<id>.wav, and `audioset.VIDEO_URL` (the module's one seam) points there instead of
youtube.com, so yt-dlp's generic extractor downloads and cuts the clips as it would any site's.
"""

from __future__ import annotations

import csv
import functools
import json
import re
import threading
from pathlib import Path

import pytest
import soundfile as sf
from test_acquire import SR, MediaHandler, QuietServer, snapshot, tone

import audioshard.acquire.audioset as audioset
from audioshard.acquire.audioset import parse_segment_list, wanted_classes
from audioshard.acquire.common import AcquireError, read_sources
from audioshard.cli import main
from audioshard.manifest import load_manifest

# Real AudioSet ids and MIDs; the ontology entries carry AudioSet's other keys, which are ignored.
ONTOLOGY = [
    {"id": "/m/09x0r", "name": "Speech", "description": "...", "child_ids": ["/m/05zppz"], "restrictions": []},
    {"id": "/m/05zppz", "name": "Male speech, man speaking", "child_ids": []},
    {"id": "/m/0k4j", "name": "Car", "child_ids": []},
    {"id": "/m/04rlf", "name": "Music", "child_ids": []},
    {"id": "/m/0bt9lr", "name": "Dog", "child_ids": []},
]
HEADER = ["# Segments csv created Sun Mar  5 10:54:31 2017",
          "# num_ytids=4, num_segs=5, num_unique_labels=5, num_positive_labels=9",
          "# YTID, start_seconds, end_seconds, positive_labels"]
SEGMENTS = [
    '--PJHxphWEs, 1.000, 3.000, "/m/09x0r,/m/05zppz,/m/04rlf"',  # speech + music: kept, music dropped
    '0FMdORf5iGs, 0.000, 2.000, "/m/0k4j,/m/09x0r"',            # line 5
    '0FMdORf5iGs, 2.000, 4.000, "/m/0k4j"',                      # line 6: same video, second clip
    'Zz9lbkOTZmI, 0.000, 2.000, "/m/04rlf,/m/0bt9lr"',           # line 7: none of the classes
    'missingVid1, 0.000, 2.000, "/m/09x0r"',                      # line 8: not on the server (404)
]
CLASSES = ["Speech", "car", "Male speech, man speaking"]  # names as in the ontology, any case


def write_list(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([*HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def write_ontology(path: Path) -> Path:
    path.write_text(json.dumps(ONTOLOGY, indent=1), encoding="utf-8")
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The MediaHandler of test_acquire.py serving 4-s tone files named by YouTube id; yields (base, requests)."""
    root = tmp_path_factory.mktemp("youtube")
    (root / "audioset").mkdir()
    for i, ytid in enumerate(("--PJHxphWEs", "0FMdORf5iGs", "Zz9lbkOTZmI")):
        sf.write(root / "audioset" / f"{ytid}.wav", tone([300.0 + 100 * i] * 4, seed=i), SR)
    httpd = QuietServer(("127.0.0.1", 0), functools.partial(MediaHandler, directory=str(root)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", httpd.requests
    httpd.shutdown()


@pytest.fixture
def local_youtube(server, monkeypatch):
    base, requests_log = server
    monkeypatch.setattr(audioset, "VIDEO_URL", base + "/audioset/{}.wav")
    return requests_log


# --- parsing -------------------------------------------------------------------------------------


def test_list_names_from_ontology_classes_filter_and_duplicates(tmp_path):
    ontology = audioset.load_ontology(write_ontology(tmp_path / "ontology.json"))
    names = {mid: audioset.class_name(name) for mid, name in ontology.items()}
    assert names["/m/05zppz"] == "Male_speech_man_speaking" and names["/m/09x0r"] == "Speech"
    wanted = wanted_classes(CLASSES, ontology, "ontology.json")
    assert wanted == {"Speech", "Car", "Male_speech_man_speaking"}
    assert wanted_classes(["/m/0k4j", "male_speech_man_speaking"], ontology) == {"Car", "Male_speech_man_speaking"}

    rows = [*SEGMENTS, '0FMdORf5iGs, 0.000, 2.000, "/m/04rlf"']  # a repeat of line 5 with another label
    listed = parse_segment_list(write_list(tmp_path / "list.csv", rows), names, wanted)
    assert [(s.ytid, s.start, s.end, s.labels, s.line) for s in listed.segments] == [
        ("--PJHxphWEs", 1.0, 3.0, ("Male_speech_man_speaking", "Speech"), 4),  # Music left out
        ("0FMdORf5iGs", 0.0, 2.0, ("Car", "Speech"), 5),  # sorted; the repeat merged into it
        ("0FMdORf5iGs", 2.0, 4.0, ("Car",), 6),
        ("missingVid1", 0.0, 2.0, ("Speech",), 8),
    ]
    assert listed.segments[0].every == ("Male_speech_man_speaking", "Music", "Speech")
    assert listed.segments[1].every == ("Car", "Music", "Speech")  # the repeat's Music is provenance, not a label
    assert listed.unwanted == 1  # Zz9lbkOTZmI (the repeat of line 5 is no segment of its own)

    bare = parse_segment_list(tmp_path / "list.csv")  # no ontology: the MIDs, made safe, are the classes
    assert bare.segments[0].labels == ("m_04rlf", "m_05zppz", "m_09x0r") and bare.unwanted == 0
    assert len(bare.segments) == 5 and bare.seen["m_0bt9lr"] == "/m/0bt9lr"


def test_bad_rows_are_reported_with_their_line_numbers(tmp_path):
    names = {mid: audioset.class_name(e) for mid, e in audioset.load_ontology(write_ontology(
        tmp_path / "ontology.json")).items()}
    bad = write_list(tmp_path / "bad.csv", [
        '--PJHxphWEs, 1.000, 3.000, "/m/09x0r"',    # line 4: fine
        "0FMdORf5iGs, 0.000, 2.000, /m/0k4j,/m/09x0r",  # line 5: labels not quoted -> 5 fields
        'short, 0.000, 2.000, "/m/0k4j"',            # line 6: not a YouTube id
        '0FMdORf5iGs, abc, 2.000, "/m/0k4j"',        # line 7: bad start
        '0FMdORf5iGs, 5.000, 2.000, "/m/0k4j"',      # line 8: end before start
        '0FMdORf5iGs, 0.000, 2.000, "/m/zzzz"',      # line 9: not in the ontology
        '0FMdORf5iGs, 0.000, 2.000, "Speech"',       # line 10: a name, not a MID
        '0FMdORf5iGs, 0.000, 2.000, ""',             # line 11: no labels
    ])
    with pytest.raises(AcquireError) as caught:
        parse_segment_list(bad, names)
    message = str(caught.value)
    assert message.startswith(f"{bad}: 7 bad rows, nothing fetched: ") and "\n" not in message
    for line, text in [(5, "5 fields, expected 4"), (6, "'short' is not an 11-character YouTube id"),
                       (7, "start 'abc'"), (8, "not after start"), (9, "/m/zzzz is not in the ontology"),
                       (10, "'Speech' is not an ontology id"), (11, "no labels")]:
        assert re.search(rf"line {line}: [^;]*{re.escape(text)}", message), (line, message)
    assert "line 4" not in message


def test_hostile_lists_are_bounded(tmp_path, monkeypatch):
    rows = [f'{i:011d}, 0.000, 1.000, "/m/09x0r"' for i in range(5)]
    monkeypatch.setattr(audioset, "MAX_LIST_ROWS", 4)
    with pytest.raises(AcquireError, match="more than 4 segments"):
        parse_segment_list(write_list(tmp_path / "many.csv", rows))
    monkeypatch.setattr(audioset, "MAX_LINE_CHARS", 100)
    long_row = '00000000000, 0.000, 1.000, "' + ",".join(["/m/09x0r"] * 20) + '"'  # 200 characters, one line
    with pytest.raises(AcquireError, match=r"long.csv line 5: longer than 100 characters"):
        parse_segment_list(write_list(tmp_path / "long.csv", [rows[0], long_row]))
    monkeypatch.setattr(audioset, "MAX_LIST_BYTES", 100)
    with pytest.raises(AcquireError, match="over 100 bytes"):
        parse_segment_list(tmp_path / "many.csv")
    (tmp_path / "nul.csv").write_bytes(b'00000000000, 0.000, 1.000, "/m/09\x00x0r"\n')
    monkeypatch.setattr(audioset, "MAX_LIST_BYTES", 1 << 20)
    with pytest.raises(AcquireError, match=r"1 bad row, nothing fetched: line 1: label "):
        parse_segment_list(tmp_path / "nul.csv")
    (tmp_path / "ontology.json").write_text('[{"id": "/m/09x0r"}, {"id": "/m/0k4j", "name": "???"}, 3]')
    with pytest.raises(AcquireError) as caught:
        audioset.load_ontology(tmp_path / "ontology.json")
    message = str(caught.value)
    assert "3 bad entries" in message and "entry 0: needs a string" in message and "entry 2: needs" in message
    assert "entry 1: label '' cannot name a class folder" in message


def test_unknown_classes_are_errors_listing_close_names(tmp_path):
    ontology = audioset.load_ontology(write_ontology(tmp_path / "ontology.json"))
    with pytest.raises(AcquireError, match=r"--classes 'Speach' is not a class of ontology.json: did you mean "
                                           r"'Speech'\?"):
        wanted_classes(["Car", "Speach"], ontology, "ontology.json")
    with pytest.raises(AcquireError, match="'Zebra' is not a class .*no close match"):
        wanted_classes(["Zebra"], ontology)
    listed = write_list(tmp_path / "list.csv", SEGMENTS)
    with pytest.raises(AcquireError, match=r"'m_0k4' is in no segment of .*list.csv: did you mean .*'/m/0k4j'"):
        audioset.fetch_audioset(listed, tmp_path / "raw", classes=["/m/0k4"])
    with pytest.raises(AcquireError, match="none of its 4 segments has any of --classes Dog"):
        audioset.fetch_audioset(write_list(tmp_path / "dogless.csv", SEGMENTS[:3] + SEGMENTS[4:]), tmp_path / "raw",
                                ontology=tmp_path / "ontology.json", classes=["Dog"])
    assert not (tmp_path / "raw").exists()  # refused before anything was fetched


# --- yt-dlp, for real, against the local server ------------------------------------------------


def test_cli_fetch_audioset_then_rerun(local_youtube, tmp_path, capsys):
    requests_log = local_youtube
    raw = tmp_path / "raw"
    args = ["fetch", "youtube", "--audioset", str(write_list(tmp_path / "list.csv", SEGMENTS)),
            "--ontology", str(write_ontology(tmp_path / "ontology.json")), "--out", str(raw), "--retries", "0",
            "--classes", *CLASSES]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fetched 3, already there 0, skipped 1, failed 0" in out and "(audioset: 3)" in out
    assert "missingVid1.wav: removed or not found" in out
    assert "note: 1 segment had none of the --classes (Car, Male_speech_man_speaking, Speech): not fetched" in out
    assert f"next: audioshard build {raw / 'audioset.csv'} --out shards/" in out
    assert not any("Zz9lbkOTZmI" in r for r in requests_log)  # the segment without a wanted class was never asked for

    assert read_csv(raw / "audioset.csv") == [  # list order; the leading "--" of the id only leaves the file name
        {"path": "audioset/PJHxphWEs_1-3.wav", "label": "Male_speech_man_speaking;Speech", "group": "--PJHxphWEs"},
        {"path": "audioset/0FMdORf5iGs_0-2.wav", "label": "Car;Speech", "group": "0FMdORf5iGs"},
        {"path": "audioset/0FMdORf5iGs_2-4.wav", "label": "Car", "group": "0FMdORf5iGs"},
    ]
    for row in read_csv(raw / "audioset.csv"):  # paths relative to the CSV's folder, clips cut to 2 s
        assert sf.info(str(raw / row["path"])).duration == pytest.approx(2.0, abs=0.05)
    sources = {r["path"]: r for r in read_sources(raw)}
    assert set(sources) == {r["path"] for r in read_csv(raw / "audioset.csv")}
    first = sources["audioset/PJHxphWEs_1-3.wav"]
    assert first["label"] == "Male_speech_man_speaking;Music;Speech" and first["id"] == "--PJHxphWEs"
    assert (first["start"], first["end"]) == ("1", "3") and sources["audioset/0FMdORf5iGs_0-2.wav"]["start"] == ""

    # The CSV is a build's input as it is: a multi-label build, one class per name, a clip's group its video.
    assert main(["build", str(raw / "audioset.csv"), "--out", str(tmp_path / "shards"), "--quiet"]) == 0
    capsys.readouterr()
    built = load_manifest(tmp_path / "shards")
    assert built.multilabel and built.classes == ["Car", "Male_speech_man_speaking", "Speech"]
    rows = {row["path"]: row["label"] for s in built.split_names for row in built.recording_rows(s)}
    assert rows == {r["path"]: r["label"] for r in read_csv(raw / "audioset.csv")}

    # RAW itself is not a class-per-folder tree of these clips: its audioset/ folder is no class "audioset".
    assert main(["build", str(raw), "--out", str(tmp_path / "wrong"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert f"build from that CSV (audioshard build {raw / 'audioset.csv'}" in err and "Traceback" not in err
    assert not (tmp_path / "wrong" / "manifest.json").exists()

    # Re-run: nothing new is asked for, the files and sources.csv are untouched, the CSV is the same.
    before, csv_before, asked = snapshot(raw), (raw / "sources.csv").read_bytes(), len(requests_log)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fetched 0, already there 3, skipped 1, failed 0" in out
    assert snapshot(raw) == before and (raw / "sources.csv").read_bytes() == csv_before
    assert [r for r in requests_log[asked:] if "missingVid1" not in r] == []

    # Other --classes: still nothing fetched again; the CSV is rewritten with the new labels.
    assert main([*args[:-len(CLASSES)], "Car"]) == 0
    out = capsys.readouterr().out
    assert "fetched 0, already there 2, skipped 0" in out and "3 segments had none of the --classes (Car)" in out
    assert read_csv(raw / "audioset.csv") == [
        {"path": "audioset/0FMdORf5iGs_0-2.wav", "label": "Car", "group": "0FMdORf5iGs"},
        {"path": "audioset/0FMdORf5iGs_2-4.wav", "label": "Car", "group": "0FMdORf5iGs"},
    ]
    assert snapshot(raw).keys() == before.keys() and len(read_sources(raw)) == 3


def test_cli_audioset_exit_codes_and_refusals(local_youtube, tmp_path, capsys):
    raw = tmp_path / "raw"
    only_missing = write_list(tmp_path / "missing.csv", SEGMENTS[4:])
    assert main(["fetch", "youtube", "--audioset", str(only_missing), "--out", str(raw), "--retries", "0"]) == 1
    out = capsys.readouterr().out
    assert "fetched 0, already there 0, skipped 1, failed 0" in out and "nothing could be fetched" in out
    assert read_csv(raw / "audioset.csv") == []

    listed = str(write_list(tmp_path / "list.csv", SEGMENTS))
    for extra, text in [(["--label", "drone"], "drop --label"), (["--max-items", "3"], "drop --max-items"),
                        (["--ontology", str(tmp_path / "nothing.json")], "no such ontology file"),
                        (["--classes", "Speech"], "'Speech' is in no segment")]:
        assert main(["fetch", "youtube", "--audioset", listed, "--out", str(raw), *extra]) == 2
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
    assert main(["fetch", "youtube", "--classes", "Speech", "--label", "x", "--out", str(raw), "https://e.org/a"]) == 2
    assert "go with --audioset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fetch", "youtube", "--help"])
    help_text = capsys.readouterr().out
    assert "--audioset" in help_text and "--ontology" in help_text and "audioset.csv" in help_text


def test_a_listed_clip_folder_beside_class_folders_is_left_out_and_said_so(tmp_path):
    """RAW/drone/, RAW/car/ and an AudioSet fetch (RAW/audioset/ + RAW/audioset.csv) in one RAW: a folder build
    takes the two class folders and says why audioset/ is not a third class."""
    from audioshard.config import load_config
    from audioshard.inputs import discover

    for rel in ("drone/a.wav", "car/b.wav", "audioset/x_0-10.wav", "other/c.wav"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "audioset.csv").write_text("path,label,group\naudioset/x_0-10.wav,Car;Speech,x\n")
    found = discover(tmp_path, load_config())
    assert sorted(s.label for s in found.sources) == ["car", "drone", "other"]
    assert any("audioset is left out" in w and "audioset.csv" in w for w in found.warnings)
