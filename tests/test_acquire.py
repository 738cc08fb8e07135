"""Acquire: yt-dlp for real against a local HTTP server (its generic extractor downloads direct media
links and podcast RSS feeds), gdown at its narrowest seam (download_folder / download faked), and
the whole path RAW -> build with provenance in the manifest. Offline: everything is on 127.0.0.1.
"""

from __future__ import annotations

import csv
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import gdown
import numpy as np
import pytest
import requests
import soundfile as sf
from gdown.download import GoogleDriveFileToDownload

import audioshard.acquire.common as common
import audioshard.acquire.youtube as youtube
from audioshard.acquire.common import AcquireError, FetchSummary, Outcome, read_sources, safe_name
from audioshard.acquire.drive import fetch_drive, parse_folder_id
from audioshard.acquire.youtube import Link, classify_error, collect_links, fetch_youtube, parse_links, parse_time
from audioshard.build import build_shards
from audioshard.cli import main
from audioshard.config import load_config
from audioshard.manifest import load_manifest
from audioshard.names import SPLITS

SR = 16000
FOLDER_ID = "1AbCdEfGhIjKlMnOpQrStUvWxYz0123"


def tone(freqs: list[float], seconds_each: float = 1.0, seed: int = 0) -> np.ndarray:
    """Consecutive 1-s (by default) tones at `freqs` Hz plus a little noise: (N,) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds_each * SR)) / SR
    parts = [0.4 * np.sin(2 * np.pi * f * t) for f in freqs]
    samples = np.concatenate(parts)
    return (samples + 0.01 * rng.standard_normal(len(samples))).astype(np.float32)


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


class MediaHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (ffmpeg seeks with it, as on real CDNs), plus test routes:
    /flaky/NAME answers 503 to its first request, /down/NAME always 503. Requests are logged."""

    def log_message(self, *args):
        pass

    def send_head(self):
        self.server.requests.append(self.path)
        name = self.path.split("?")[0]
        if name.startswith("/down/") or (name.startswith("/flaky/") and self.server.requests.count(self.path) == 1):
            self.send_error(503, "Service Unavailable")
            return None
        if name.startswith("/flaky/"):
            self.path = self.path.replace("/flaky/", "/", 1)
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if not match or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first = int(match[1] or 0)
        last = min(int(match[2]), size - 1) if match[2] else size - 1
        stream = open(path, "rb")  # noqa: SIM115 - the base class copies and closes it
        stream.seek(first)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return stream


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients (the generic extractor, ffmpeg) hang up mid-body on purpose


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving generated audio; yields its base URL and request log."""
    root = tmp_path_factory.mktemp("media")
    for label, base_hz in (("drone", 180.0), ("car", 70.0), ("speech", 400.0)):
        (root / label).mkdir()
        for i in range(1, 5):
            sf.write(root / label / f"{label[0]}{i}.wav", tone([base_hz * (1 + 0.1 * i)] * 4, seed=i), SR)
    sf.write(root / "steps.wav", tone([300.0, 600.0, 900.0, 1200.0]), SR)  # one frequency per second
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(root / "car" / "c4.wav"), "-c:a", "libopus",
                    str(root / "car" / "c4.webm")], check=True, timeout=60)  # YouTube's usual bestaudio
    httpd = QuietServer(("127.0.0.1", 0), functools.partial(MediaHandler, directory=str(root)))
    httpd.requests = []
    base = f"http://127.0.0.1:{httpd.server_port}"
    items = "".join(f'<item><title>Talk {i}</title><guid>talk-{i}</guid><enclosure url="{base}/speech/s{i}.wav" '
                    f'type="audio/wav" length="1"/></item>' for i in range(1, 5))
    (root / "speech" / "feed.xml").write_text(f'<?xml version="1.0"?><rss version="2.0"><channel><title>Talks'
                                              f'</title><link>{base}/</link>{items}</channel></rss>')
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield base, httpd.requests
    httpd.shutdown()


def write_links(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(["url,label,start,end", *rows]) + "\n", encoding="utf-8")
    return path


def snapshot(raw: Path) -> dict[str, int]:
    return {p.relative_to(raw).as_posix(): p.stat().st_size for p in raw.rglob("*") if p.is_file()}


# --- link file, times, labels ------------------------------------------------------------------


def test_parse_time():
    assert parse_time("90") == 90 and parse_time("90.5") == 90.5 and parse_time("1:30") == 90
    assert parse_time("01:02:03.5") == 3723.5 and parse_time(" 0:00:07 ") == 7
    for bad in ("1:75", "-3", "abc", "1:2:3:4", "", "1::2", "1:60:00"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_link_file_parser_reports_every_bad_row_with_its_line_number(tmp_path):
    good = write_links(tmp_path / "good.csv", [
        "https://www.youtube.com/watch?v=abc,drone,0:10,0:40",
        "",
        "# a comment line",
        "https://example.org/car.wav,car,,",
        "https://example.org/x.wav,,5,",  # label from --label
    ])
    links = parse_links(good, default_label="speech")
    assert links == [Link("https://www.youtube.com/watch?v=abc", "drone", 10.0, 40.0, "good.csv line 2"),
                     Link("https://example.org/car.wav", "car", None, None, "good.csv line 5"),
                     Link("https://example.org/x.wav", "speech", 5.0, None, "good.csv line 6")]

    bad = write_links(tmp_path / "bad.csv", [
        "https://example.org/ok.wav,drone",      # line 2: fine
        "ftp://example.org/a.wav,drone",         # line 3: not http(s)
        "https://example.org/b.wav,drone,1:75",  # line 4: bad time
        "https://example.org/c.wav,drone,30,10", # line 5: end before start
        "https://example.org/d.wav,../etc",      # line 6: label escapes
        "https://example.org/e.wav,",            # line 7: no label, no --label
        ",drone",                                # line 8: no url
        "https://example.org/f.wav,car,1,2,3",   # line 9: too many fields
    ])
    with pytest.raises(AcquireError) as caught:
        parse_links(bad)
    message = str(caught.value)
    assert "7 bad rows" in message and "\n" not in message
    for line, text in [(3, "not an http(s) URL"), (4, "'1:75'"), (5, "not after start"), (6, "cannot name a class"),
                       (7, "empty label"), (8, "empty url"), (9, "5 fields")]:
        assert re.search(rf"line {line}: [^;]*{re.escape(text)}", message), (line, message)
    assert "line 2" not in message

    (tmp_path / "header.csv").write_text("link,label\nhttps://example.org/a.wav,drone\n")
    with pytest.raises(AcquireError, match="line 1: the header must name the columns url,label"):
        parse_links(tmp_path / "header.csv")
    with pytest.raises(AcquireError, match="need --label"):
        collect_links(["https://example.org/a.wav"])
    with pytest.raises(AcquireError, match="nothing to fetch"):
        collect_links()
    twice = collect_links(["https://example.org/a.wav", "https://example.org/a.wav"], "drone")
    assert len(twice) == 1


def test_error_classification_and_safe_names():
    from yt_dlp.utils import DownloadError

    cases = {
        "ERROR: [youtube] abc: Private video. Sign in if you've been granted access to this video": "private video",
        "ERROR: [youtube] abc: Video unavailable. This video has been removed by the uploader": "removed",
        "ERROR: [youtube] abc: Sign in to confirm your age. This video may be inappropriate for some users.":
            "age-restricted",
        "ERROR: [youtube] abc: Video unavailable. The uploader has not made this video available in your country":
            "geo-blocked",
        "ERROR: [youtube] abc: Video unavailable. This video contains content from X, who has blocked it on "
        "copyright grounds": "copyright",
        "ERROR: [generic] x: Unable to download webpage: HTTP Error 404: Not Found (caused by <HTTPError 404>)":
            "removed or not found",
    }
    for message, reason in cases.items():
        kind, text = classify_error(DownloadError(message))
        assert kind == "skipped" and reason in text, (message, text)
        assert "caused by" not in text
    assert classify_error(DownloadError("ERROR: Unable to download webpage: HTTP Error 503: Service Unavailable"))[0] \
        == "transient"
    assert classify_error(DownloadError("ERROR: [generic] x: The read operation timed out"))[0] == "transient"
    assert classify_error(DownloadError("ERROR: Postprocessing: audio conversion failed"))[0] == "failed"
    with pytest.raises(KeyError):  # not a download error: a bug, never hidden as a "failed" item
        classify_error(KeyError("id"))
    assert safe_name("Ünïcode / name: ?*.wav") == "Unicode_name_.wav" and safe_name("...") == "item"
    assert safe_name(".hidden") == "hidden"


def test_summary_and_exit_code():
    summary = FetchSummary(Path("raw"), [Outcome("skipped", "u1", "private video"), Outcome("failed", "u2", "boom")])
    assert summary.exit_code == 1 and "nothing could be fetched" in summary.format()
    summary.outcomes.append(Outcome("already", "u3"))
    assert summary.exit_code == 0  # a re-run where everything new is unavailable still has its data
    summary.outcomes.append(Outcome("fetched", "u4", path="drone/u4.wav"))
    text = summary.format()
    assert text.splitlines()[0] == "fetched 1, already there 1, skipped 1, failed 1 into raw/ (drone: 1)"
    assert "  skipped  u1: private video" in text and "  failed   u2: boom" in text


# --- yt-dlp, for real, against the local server ------------------------------------------------


def test_fetch_links_then_rerun_then_build_with_provenance(server, tmp_path):
    base, requests_log = server
    raw = tmp_path / "raw"
    links = write_links(tmp_path / "links.csv", [
        f"{base}/drone/d1.wav,drone", f"{base}/drone/d2.wav,drone", f"{base}/drone/d3.wav,drone,0:01,0:03",
        f"{base}/car/c1.wav,car", f"{base}/car/c2.wav,car", f"{base}/car/c4.webm,car",
        f"{base}/speech/feed.xml,speech",  # a podcast feed: a playlist of 4, of which --max-items takes 3
        f"{base}/drone/missing.wav,drone",
    ])
    lines: list[str] = []
    summary = fetch_youtube(collect_links(links_file=links), raw, max_items=3, retries=0, timeout=10, log=lines.append)
    assert (summary.count("fetched"), summary.count("skipped"), summary.count("failed")) == (9, 1, 0), summary.format()
    assert summary.exit_code == 0 and summary.notes == []  # ffmpeg is there; yt-dlp's per-item chatter is not
    skipped = next(o for o in summary.outcomes if o.status == "skipped")
    assert skipped.item.endswith("/drone/missing.wav") and "not found" in skipped.reason and "404" in skipped.reason
    assert any(line.startswith("skipped") and "missing.wav" in line for line in lines)
    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*.wav")) == [
        "car/c1.wav", "car/c2.wav", "car/c4.wav",  # the .webm (opus) was extracted to WAV
        "drone/d1.wav", "drone/d2.wav", "drone/d3_1-3.wav",  # d3 cut to 1-3 s
        "speech/talk-1.wav", "speech/talk-2.wav", "speech/talk-3.wav"]  # named by the feed items' guid
    assert not (raw / ".audioshard-fetch").exists()
    assert sf.info(str(raw / "drone" / "d3_1-3.wav")).duration == pytest.approx(2.0, abs=0.05)
    assert sf.info(str(raw / "car" / "c4.wav")).duration == pytest.approx(4.0, abs=0.1)

    rows = {r["path"]: r for r in read_sources(raw)}
    assert set(rows) == {p.relative_to(raw).as_posix() for p in raw.rglob("*.wav")}
    assert rows["drone/d3_1-3.wav"]["start"] == "1" and rows["drone/d3_1-3.wav"]["end"] == "3"
    assert rows["drone/d1.wav"]["url"] == f"{base}/drone/d1.wav" and rows["drone/d1.wav"]["extractor"] == "generic"
    feed_row = rows["speech/talk-1.wav"]
    assert feed_row["title"] == "Talk 1" and feed_row["link"] == f"{base}/speech/feed.xml"
    assert feed_row["url"] == f"{base}/speech/s1.wav" and feed_row["tool"].startswith("yt-dlp ")
    assert all(r["fetched_at"].endswith("Z") for r in rows.values())

    # Re-run: the archive (sources.csv) means nothing is downloaded again; the 404 is reported again.
    before, csv_before = snapshot(raw), (raw / "sources.csv").read_bytes()
    again = fetch_youtube(collect_links(links_file=links), raw, max_items=3, retries=0, timeout=10)
    assert (again.count("fetched"), again.count("already"), again.count("skipped")) == (0, 9, 1), again.format()
    assert again.exit_code == 0 and snapshot(raw) == before and (raw / "sources.csv").read_bytes() == csv_before
    # ... and a longer --max-items fetches only the feed item that is new.
    more = fetch_youtube(collect_links([f"{base}/speech/feed.xml"], "speech"), raw, max_items=4, retries=0, timeout=10)
    assert (more.count("fetched"), more.count("already")) == (1, 3)
    assert [o.path for o in more.fetched] == ["speech/talk-4.wav"]

    result = build_shards(raw, tmp_path / "shards", load_config(), workers=1, progress=False)
    manifest = result.manifest
    assert manifest["classes"] == ["car", "drone", "speech"] and not load_manifest(result.out_dir).skipped
    assert sum(sum(s["recordings"].values()) for s in manifest["splits"].values()) == 10
    provenance = {row["path"]: row for row in load_manifest(result.out_dir).provenance}
    assert set(provenance) == {p.relative_to(raw).as_posix() for p in raw.rglob("*.wav")}
    assert provenance["speech/talk-4.wav"]["title"] == "Talk 4" and provenance["drone/d3_1-3.wav"]["end"] == "3"
    assert manifest["ignored"] == {}  # sources.csv and the staging folder are not inputs


def test_segments_are_cut_where_asked(server, tmp_path):
    base, _ = server
    raw = tmp_path / "raw"
    links = write_links(tmp_path / "links.csv", [
        f"{base}/steps.wav,steps,1,2.5",          # 600 Hz then 900 Hz
        f"{base}/steps.wav,steps,00:00:03,",      # to the end: 1200 Hz
        f"{base}/steps.wav,steps,10,12",          # beyond the end of a 4-s file
    ])
    summary = fetch_youtube(collect_links(links_file=links), raw, retries=0, timeout=10)
    assert (summary.count("fetched"), summary.count("failed")) == (2, 1), summary.format()
    failed = next(o for o in summary.outcomes if o.status == "failed")
    assert "no audio samples" in failed.reason
    cut, rate = sf.read(str(raw / "steps" / "steps_1-2.5.wav"))
    assert rate == SR and len(cut) / rate == pytest.approx(1.5, abs=0.03)
    assert dominant_hz(cut[: int(0.4 * rate)], rate) == pytest.approx(600, abs=10)
    assert dominant_hz(cut[-int(0.4 * rate):], rate) == pytest.approx(900, abs=10)
    tail, rate = sf.read(str(raw / "steps" / "steps_3-end.wav"))
    assert len(tail) / rate == pytest.approx(1.0, abs=0.03) and dominant_hz(tail, rate) == pytest.approx(1200, abs=10)
    assert sorted(p.name for p in (raw / "steps").iterdir()) == ["steps_1-2.5.wav", "steps_3-end.wav"]


def test_transient_errors_are_retried_with_backoff(server, tmp_path):
    base, requests_log = server
    summary = fetch_youtube([Link(f"{base}/flaky/drone/d4.wav", "drone"), Link(f"{base}/down/d1.wav", "drone")],
                            tmp_path / "raw", retries=2, backoff=0.01, timeout=10)
    assert summary.count("fetched") == 1 and summary.count("failed") == 1, summary.format()
    assert requests_log.count("/flaky/drone/d4.wav") >= 2  # the first answer was a 503
    failed = next(o for o in summary.outcomes if o.status == "failed")
    assert "503" in failed.reason and "gave up after 3 attempts" in failed.reason
    assert requests_log.count("/down/d1.wav") == 3


def test_without_ffmpeg_segments_are_refused_and_containers_kept(server, tmp_path, monkeypatch):
    base, requests_log = server
    monkeypatch.setattr(youtube, "find_ffmpeg", lambda: None)
    monkeypatch.setattr(common, "find_ffmpeg", lambda: None)
    seen = len(requests_log)
    links = write_links(tmp_path / "links.csv", [f"{base}/car/c1.wav,car", f"{base}/steps.wav,steps,1,2"])
    with pytest.raises(AcquireError, match=r"needs ffmpeg.*links.csv line 3"):
        fetch_youtube(collect_links(links_file=links), tmp_path / "raw")
    assert len(requests_log) == seen and not (tmp_path / "raw").exists()  # refused before any download
    summary = fetch_youtube([Link(f"{base}/car/c4.webm", "car")], tmp_path / "raw", retries=0, timeout=10)
    assert [o.path for o in summary.fetched] == ["car/c4.webm"]
    assert any("ffmpeg is not installed" in n and ".webm" in n and "audioshard build" in n for n in summary.notes)


def test_cli_fetch_youtube_summary_and_exit_codes(server, tmp_path, capsys):
    base, _ = server
    raw = tmp_path / "raw"
    code = main(["fetch", "youtube", "--label", "drone", "--out", str(raw), "--retries", "0",
                 f"{base}/nothing-here.wav", f"{base}/neither.wav"])
    out = capsys.readouterr().out
    assert code == 1 and "fetched 0, already there 0, skipped 2, failed 0" in out
    assert "nothing could be fetched" in out and "neither.wav: removed or not found" in out
    code = main(["fetch", "youtube", "--label", "drone", "--out", str(raw), "--retries", "0", "--audio-format", "flac",
                 f"{base}/drone/d1.wav", f"{base}/neither.wav"])
    out = capsys.readouterr().out
    assert code == 0 and "fetched 1, already there 0, skipped 1, failed 0" in out and (raw / "drone/d1.flac").exists()
    assert "next: audioshard build" in out

    assert main(["fetch", "youtube", "--out", str(raw), f"{base}/drone/d1.wav"]) == 2  # no --label
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "need --label" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as caught:
        main(["fetch", "youtube", "--help"])
    assert caught.value.code == 0
    help_text = capsys.readouterr().out
    assert "--links" in help_text and "--max-items" in help_text and "links.csv" in help_text


# --- gdown, faked at its download calls ---------------------------------------------------------


def gdown_wrapped(inner: str, file_id: str) -> str:
    """How gdown >= 5 words a FileURLRetrievalError (download.py)."""
    return (f"Failed to retrieve file url:\n\n\t{inner}\n\nYou may still be able to access the file from the "
            f"browser:\n\n\thttps://drive.google.com/uc?id={file_id}\n\nbut Gdown can't. Please check connections "
            "and permissions.")


QUOTA = ("Too many users have viewed or downloaded this file recently. Please try accessing the file again later. "
         "If the file you are trying to access is particularly large or is shared with many people, it may take up "
         "to 24 hours to be able to view or download the file.")
NO_ACCESS = ("Cannot retrieve the public link of the file. You may need to change the permission to 'Anyone with "
             "the link', or have had many accesses.")


class FakeDrive:
    """Stands in for gdown.download_folder(skip_download=True) and gdown.download(id=..., output=...)."""

    def __init__(self, files: dict[str, tuple[str, object]]):
        self.files = files  # id -> (path in folder, WAV bytes | exception | list of them, one per call)
        self.downloads: list[str] = []
        self.listing_error: Exception | None = None

    def download_folder(self, url=None, id=None, output=None, quiet=False, skip_download=False, **kwargs):
        assert skip_download and id == FOLDER_ID and url is None
        if self.listing_error:
            raise self.listing_error
        return [GoogleDriveFileToDownload(id=fid, path=path, local_path=os.path.join(output, path))
                for fid, (path, _) in self.files.items()]

    def download(self, url=None, output=None, quiet=False, id=None, **kwargs):
        self.downloads.append(id)
        content = self.files[id][1]
        if isinstance(content, list):
            content = content.pop(0) if len(content) > 1 else content[0]
        if isinstance(content, Exception):
            raise content
        Path(output).write_bytes(content)
        return output


def wav_bytes(tmp_path: Path, seed: int) -> bytes:
    path = tmp_path / f"src{seed}.wav"
    sf.write(path, tone([250.0 + 40 * seed] * 3, seed=seed), SR)
    return path.read_bytes()


@pytest.fixture
def drive(monkeypatch, tmp_path):
    fake = FakeDrive({
        "id-a": ("a.wav", wav_bytes(tmp_path, 1)),
        "id-b": ("speaker 2/b ü.wav", wav_bytes(tmp_path, 2)),
        "id-c": ("speaker 2/deep/c.wav", [requests.exceptions.ConnectionError("Connection reset by peer"),
                                          wav_bytes(tmp_path, 3)]),
        "id-q": ("busy.wav", gdown.exceptions.FileURLRetrievalError(gdown_wrapped(QUOTA, "id-q"))),
        "id-p": ("private.wav", gdown.exceptions.FileURLRetrievalError(gdown_wrapped(NO_ACCESS, "id-p"))),
        "id-t": ("notes.txt", b"not audio"),
    })
    monkeypatch.setattr(gdown, "download_folder", fake.download_folder)
    monkeypatch.setattr(gdown, "download", fake.download)
    return fake


def test_drive_folder_fetch_report_and_rerun(drive, tmp_path):
    raw = tmp_path / "raw"
    summary = fetch_drive([f"https://drive.google.com/drive/folders/{FOLDER_ID}?usp=sharing"], "speech", raw,
                          retries=2, backoff=0.01)
    assert (summary.count("fetched"), summary.count("skipped"), summary.count("failed")) == (3, 1, 1), summary.format()
    assert sorted(o.path for o in summary.fetched) == ["speech/a.wav", "speech/speaker_2/b_u.wav",
                                                      "speech/speaker_2/deep/c.wav"]
    assert drive.downloads.count("id-c") == 2  # the connection reset was retried
    assert "id-t" not in drive.downloads and summary.ignored == {"non-audio files (.txt)": 1}
    reasons = {o.item.rsplit(" ", 1)[1]: (o.status, o.reason) for o in summary.outcomes if o.reason}
    assert reasons["busy.wav"][0] == "failed" and "quota exceeded" in reasons["busy.wav"][1]
    assert reasons["private.wav"][0] == "skipped" and "Anyone with the link" in reasons["private.wav"][1]
    assert np.allclose(sf.read(str(raw / "speech/speaker_2/b_u.wav"))[0], tone([330.0] * 3, seed=2), atol=1e-4)
    rows = {r["path"]: r for r in read_sources(raw)}
    assert rows["speech/speaker_2/b_u.wav"]["url"] == "https://drive.google.com/file/d/id-b/view"
    assert rows["speech/speaker_2/b_u.wav"]["title"] == "speaker 2/b ü.wav"
    assert rows["speech/a.wav"]["link"] == f"https://drive.google.com/drive/folders/{FOLDER_ID}"
    text = summary.format()
    assert "fetched 3, already there 0, skipped 1, failed 1" in text and "ignored: 1 non-audio files (.txt)" in text

    drive.downloads.clear()
    again = fetch_drive([FOLDER_ID], "speech", raw, retries=0)
    assert (again.count("fetched"), again.count("already")) == (0, 3) and again.exit_code == 0
    assert sorted(drive.downloads) == ["id-p", "id-q"]  # only what is still missing is asked for


def test_drive_listing_problems_are_explained(drive, tmp_path, monkeypatch):
    drive.listing_error = gdown.exceptions.DownloadError(
        f"Failed to retrieve folder contents for folder ID: {FOLDER_ID} (status code 404). You may need to change "
        "the permission to 'Anyone with the link', or have had many accesses.")
    summary = fetch_drive([FOLDER_ID], "speech", tmp_path / "raw", retries=0)
    assert summary.exit_code == 1 and summary.outcomes[0].status == "skipped"
    assert "cannot list the folder: no access" in summary.outcomes[0].reason

    class FolderContentsMaximumLimitError(Exception):  # what gdown < 6 raises for folders of > 50 files
        pass

    monkeypatch.setattr(gdown.exceptions, "FolderContentsMaximumLimitError", FolderContentsMaximumLimitError,
                        raising=False)
    drive.listing_error = FolderContentsMaximumLimitError(
        f"The gdrive folder with url: https://drive.google.com/drive/folders/{FOLDER_ID}?hl=en has more than 50 "
        "files, gdrive can't download more than this limit.")
    summary = fetch_drive([FOLDER_ID], "speech", tmp_path / "raw", retries=3)
    reason = summary.outcomes[0].reason
    assert summary.exit_code == 1 and "at most 50 files" in reason and "pip install -U" in reason
    assert "subfolders" in reason

    drive.listing_error = None  # an old-style listing that stops at exactly 50 is flagged as probably cut short
    drive.files = {f"id-{i}": (f"doc{i}.txt", b"x") for i in range(50)}
    summary = fetch_drive([FOLDER_ID], "speech", tmp_path / "raw", retries=0)
    assert any("exactly 50 files" in note and "gdown>=6" in note for note in summary.notes)

    # gdown 5.0 had no skip_download: it would download everything while "listing"; refused up front
    monkeypatch.setattr(gdown, "download_folder", lambda url=None, id=None, output=None, quiet=False: [])
    with pytest.raises(AcquireError, match="upgrade it"):
        fetch_drive([FOLDER_ID], "speech", tmp_path / "raw")


def test_cli_fetch_drive_and_folder_ids(drive, tmp_path, capsys):
    raw = tmp_path / "raw"
    code = main(["fetch", "drive", "--label", "speech", "--out", str(raw), "--retries", "1",
                 f"https://drive.google.com/drive/u/0/folders/{FOLDER_ID}"])
    out = capsys.readouterr().out
    assert code == 0 and "fetched 3, already there 0, skipped 1, failed 1" in out and "quota exceeded" in out
    assert parse_folder_id(f"https://drive.google.com/open?id={FOLDER_ID}") == FOLDER_ID
    assert parse_folder_id(f" {FOLDER_ID} ") == FOLDER_ID
    assert main(["fetch", "drive", "--label", "speech", "--out", str(raw), "https://example.org/folders/x"]) == 2
    assert "not a Google Drive folder URL" in capsys.readouterr().err


def test_build_ignores_acquire_files_and_copies_only_used_provenance(tmp_path):
    raw = tmp_path / "raw"
    for label in ("a", "b"):
        (raw / label).mkdir(parents=True)
        for i in range(3):
            sf.write(raw / label / f"{i}.wav", tone([200.0 + 50 * i] * 2, seed=i), SR)
    (raw / ".audioshard-fetch").mkdir()
    with open(raw / "sources.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=common.SOURCE_COLUMNS)
        writer.writeheader()
        writer.writerow({"path": "a/0.wav", "label": "a", "url": "https://example.org/0", "extractor": "generic"})
        writer.writerow({"path": "a/deleted.wav", "label": "a", "url": "https://example.org/gone"})
    manifest = build_shards(raw, tmp_path / "shards", load_config(), workers=1, progress=False).manifest
    assert [row["url"] for row in load_manifest(tmp_path / "shards").provenance] == ["https://example.org/0"]
    built = load_manifest(tmp_path / "shards")
    recordings = {row["path"]: row for split in SPLITS for row in built.recording_rows(split)}
    assert recordings["a/0.wav"]["provenance"]["url"] == "https://example.org/0"  # beside the recording it describes
    assert "provenance" not in recordings["b/0.wav"]
    assert manifest["ignored"] == {}
    shutil.rmtree(tmp_path / "shards")
    (raw / "sources.csv").unlink()
    build_shards(raw, tmp_path / "shards", load_config(), workers=1, progress=False)
    assert load_manifest(tmp_path / "shards").provenance == []



@pytest.mark.parametrize("source, args, missing", [("youtube", ["--label", "x", "https://example.com/v"], "yt-dlp"),
                                                    ("drive", ["--label", "x", "FOLDER"], "gdown")])
def test_fetch_without_its_optional_downloader_says_what_to_install(tmp_path, source, args, missing):
    """A core install has no yt-dlp or gdown (extra `acquire`): the import fails as it really does
    (ModuleNotFoundError) and the command says what to install, without a traceback."""
    module = missing.replace("-", "_")
    code = (f"import sys; sys.modules[{module!r}] = None; from audioshard.cli import main; "
            f"sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "fetch", source, *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"needs {missing}" in proc.stderr and "pip install -e '.[acquire]'" in proc.stderr
    assert "Traceback" not in proc.stderr
