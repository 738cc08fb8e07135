"""report.html: written by a real training run, opened in a real headless browser (Chromium)."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from conftest import TINY_TRAIN, run_measured
from PIL import Image

from audioshard.report import write_report


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.fail("no Chromium: `make browser` installs it (the report is tested in a real browser)")


def open_in_browser(page, tmp_path):
    """(body attributes after load, console and error lines, screenshot) of a local page."""
    args = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    body = dict(re.findall(r'data-(\w+)="(\d+)"', re.search(r"<body[^>]*>", dom.stdout).group(0)))
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    shot = tmp_path / "shot.png"
    subprocess.run([*args, "--window-size=1200,900", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    return body, console, Image.open(shot).convert("RGB")


def test_the_console_check_sees_a_broken_page(tmp_path):
    """The browser check below could fail: a page with a script error and a broken image is caught."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img src="data:image/png;base64,AAAA"><script>notDefined();</script>'
                    '<script>window.onload = () => { document.body.dataset.images = 1; '
                    'document.body.dataset.decoded = document.images[0].naturalWidth > 0 ? 1 : 0; };</script>'
                    '</body></html>')
    body, console, _ = open_in_browser(page, tmp_path)
    assert console and body == {"images": "1", "decoded": "0"}


def test_training_writes_a_self_contained_report_that_a_browser_renders(tiny_run, tmp_path):
    run = tiny_run[0]  # a real TINY_TRAIN run
    page = run / "report.html"
    text = page.read_text()
    for heading in ("Data", "Settings that matter", "Training", "val", "test", "Most wrong recordings"):
        assert f"<h2>{heading}</h2>" in text
    assert "drone" in text and "Skipped inputs" in text
    assert not re.search(r'(src|href)="(?!data:)', text)  # everything inline: no file or network reference
    body, console, shot = open_in_browser(page, tmp_path)
    assert not console, console
    assert int(body["images"]) >= 4 and body["decoded"] == body["images"]  # curves, 2 matrices, thumbnails
    assert shot.size == (1200, 900)
    header, page_bg = shot.getpixel((5, 5)), shot.getpixel((5, 400))
    assert header[2] > 100 > header[0] and min(page_bg) > 240  # the blue header band above a white page
    before = page.stat().st_mtime_ns
    assert write_report(run) == page and page.stat().st_mtime_ns >= before  # `audioshard report` rewrites it


def test_a_300_class_report_stays_small_and_cheap(tmp_path):
    """Hundreds of classes: the confusion matrix becomes a table of the most confused pairs, and the page
    is written in bounded memory (a full 300x300 annotated matrix once took 3.5 GB)."""
    rng = np.random.default_rng(0)
    for c in range(300):
        folder = tmp_path / "raw" / f"class{c:03d}"
        folder.mkdir(parents=True)
        tone = np.sin(2 * np.pi * (100 + 20 * c) * np.arange(8000) / 8000)
        for i in range(3):
            sf.write(folder / f"{i}.wav", (0.3 * tone + 0.05 * rng.standard_normal(8000)).astype(np.float32), 8000)
    settings = ["audio.chunk_seconds=1.0", "audio.sample_rate=8000", "features.n_fft=256", "features.hop_length=128",
                "split.val_fraction=0.34", "split.test_fraction=0.34", "shards.block_size=16"]
    sets = [a for s in settings for a in ("--set", s)]
    assert run_measured("build", tmp_path / "raw", "--out", tmp_path / "shards", "--quiet", *sets)[0].returncode == 0
    trains = [*sets, *[a for s in [*TINY_TRAIN, "train.epochs=1", "train.batch_size=32"] for a in ("--set", s)]]
    proc = run_measured("train", "--shards", tmp_path / "shards", "--out", tmp_path / "run", "--quiet", *trains)[0]
    assert proc.returncode == 0, proc.stderr
    proc, peak_mb, seconds = run_measured("report", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "run" / "report.html").read_text()
    assert "300 classes: the most confused pairs" in text and text.count("<tr>") > 600  # per-class rows, 2 splits
    assert peak_mb < 1000, peak_mb
    print(f"300-class report: {seconds:.1f} s, peak {peak_mb:.0f} MB")
