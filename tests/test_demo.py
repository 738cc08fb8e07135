"""Tests for the synthetic demo data set (`audioshard.demo`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioshard.demo import DEMO_CLASSES, make_demo_data

SECONDS = 90.0


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("demo")
    counts = make_demo_data(out, seconds_per_class=SECONDS, seed=0)
    return out, counts


def _files(root: Path, name: str) -> list[Path]:
    return sorted((root / name).glob("*.wav"))


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.wav"))}


def _mono(path: Path) -> tuple[np.ndarray, int]:
    data, sr = sf.read(path, always_2d=True)
    return data.mean(axis=1), sr


def _spectral_centroid(x: np.ndarray, sr: int) -> float:
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1.0 / sr)
    return float((power * freqs).sum() / power.sum())


def test_class_folders_and_counts(demo_dir: tuple[Path, dict[str, int]]) -> None:
    root, counts = demo_dir
    assert tuple(counts) == DEMO_CLASSES
    assert sorted(p.name for p in root.iterdir()) == sorted(DEMO_CLASSES)
    for name in DEMO_CLASSES:
        files = _files(root, name)
        assert len(files) == counts[name] >= 5
        assert [p.name for p in files] == [f"{name}_{i:03d}.wav" for i in range(len(files))]


def test_files_readable_nonsilent_and_in_duration_range(demo_dir: tuple[Path, dict[str, int]]) -> None:
    root, _ = demo_dir
    for name in DEMO_CLASSES:
        total = 0.0
        for path in _files(root, name):
            info = sf.info(path)
            assert info.format == "WAV"
            assert info.subtype == "PCM_16"
            assert 1.0 <= info.duration <= 8.0, (path.name, info.duration)
            data, _ = sf.read(path, always_2d=True)
            assert np.isfinite(data).all()
            assert np.abs(data).max() > 0.05, path.name
            assert data.std() > 0.005, path.name
            total += info.duration
        assert SECONDS - 8.0 <= total <= SECONDS + 0.01, (name, total)


def test_mixed_sample_rates_and_channels(demo_dir: tuple[Path, dict[str, int]]) -> None:
    root, _ = demo_dir
    for name in DEMO_CLASSES:
        infos = [sf.info(p) for p in _files(root, name)]
        rates = [i.samplerate for i in infos]
        assert set(rates) == {8000, 16000, 22050}, name
        assert rates.count(16000) > len(rates) / 3, name  # mostly 16 kHz
        channels = [i.channels for i in infos]
        assert set(channels) == {1, 2}, name
        assert channels.count(2) < len(channels) / 2, name  # only a few stereo


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _digests_for(tmp_path / "a", seed=7)
    b = _digests_for(tmp_path / "b", seed=7)
    c = _digests_for(tmp_path / "c", seed=8)
    assert a == b
    assert a != c
    common = set(a) & set(c)
    assert common and all(a[k] != c[k] for k in common)


def _digests_for(out: Path, seed: int) -> dict[str, str]:
    make_demo_data(out, seconds_per_class=15.0, seed=seed)
    return _digests(out)


def test_rerun_replaces_own_files_only(tmp_path: Path) -> None:
    make_demo_data(tmp_path, seconds_per_class=40.0, seed=1)
    keep = tmp_path / "voice" / "notes.txt"
    keep.write_text("not a demo file")
    counts = make_demo_data(tmp_path, seconds_per_class=5.0, seed=1)
    for name in DEMO_CLASSES:
        assert len(_files(tmp_path, name)) == counts[name]
        total = sum(sf.info(p).duration for p in _files(tmp_path, name))
        assert 4.0 <= total <= 5.01
    assert keep.read_text() == "not a demo file"


def test_rejects_too_little_audio(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seconds_per_class"):
        make_demo_data(tmp_path, seconds_per_class=0.5)


def test_classes_differ_in_spectral_centroid(demo_dir: tuple[Path, dict[str, int]]) -> None:
    """Engine rumble is darkest, the formant voice in between, the harmonic drone buzz brightest."""
    root, _ = demo_dir
    mean_log_centroid = {
        name: np.mean([np.log(_spectral_centroid(*_mono(p))) for p in _files(root, name)]) for name in DEMO_CLASSES
    }
    centroid = {name: float(np.exp(v)) for name, v in mean_log_centroid.items()}
    assert centroid["engine"] < 0.5 * centroid["voice"], centroid
    assert centroid["voice"] < 0.9 * centroid["drone"], centroid


def test_voice_has_syllabic_envelope(demo_dir: tuple[Path, dict[str, int]]) -> None:
    """Frame energy of the voice class fluctuates far more (syllables and pauses) than drone or engine."""
    root, _ = demo_dir

    def envelope_variation(path: Path) -> float:
        x, sr = _mono(path)
        hop = int(0.05 * sr)
        energy = (x[: x.size // hop * hop].reshape(-1, hop) ** 2).mean(axis=1)
        return float(energy.std() / energy.mean())

    variation = {name: np.mean([envelope_variation(p) for p in _files(root, name)]) for name in DEMO_CLASSES}
    assert variation["voice"] > 2.0 * max(variation["drone"], variation["engine"]), variation
