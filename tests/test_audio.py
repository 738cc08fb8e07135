import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from conftest import DCS

from audioshard.audio import AudioError, ChunkRules, chunk_starts, cut_chunks, decode, load, peak_amplitude
from audioshard.config import Config, load_config
from audioshard.features import FeatureParams, log_mel


def tone(rate: int, seconds: float, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "FLOAT"])
def test_wav_sample_formats_decode_to_float32(tmp_path, subtype):
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, tone(16000, 0.5), 16000, subtype=subtype)
    samples, rate = decode(path)
    assert rate == 16000 and samples.dtype == np.float32 and len(samples) == 8000
    assert 0.45 < np.abs(samples).max() < 0.55  # scaled to [-1, 1] whatever the storage format


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_16_bit_fast_path_equals_libsndfile_float_decoding(tmp_path, ext):
    """16-bit files are read as int16 and scaled in numpy: bit-identical to libsndfile's float32."""
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-1, 1, (4000, 2)).astype(np.float32)
    stereo[0] = [-1.0, 1.0]  # full scale both ways (-32768 and clipped +32767)
    path = tmp_path / f"pcm16.{ext}"
    sf.write(path, stereo, 22050, subtype="PCM_16")
    expected = sf.read(str(path), dtype="float32")[0].mean(axis=1)
    samples, rate = decode(path)
    assert rate == 22050 and samples.dtype == np.float32
    assert np.array_equal(samples, expected)


@pytest.mark.parametrize("case", ["real", "truncated", "wavex", "odd-chunks"])
def test_plain_wav_reader_gives_libsndfile_samples(tmp_path, case):
    """16-bit WAVs are read with the standard library's `wave`; every variant must give libsndfile's
    samples, and what `wave` cannot read (WAVE_FORMAT_EXTENSIBLE) goes to libsndfile."""
    rng = np.random.default_rng(1)
    path = tmp_path / f"{case}.wav"
    if case == "real":
        path = sorted((DCS / "speech").glob("*.wav"))[0]
    elif case == "wavex":
        sf.write(path, rng.uniform(-1, 1, (3000, 3)).astype(np.float32), 16000, format="WAVEX", subtype="PCM_16")
        assert path.read_bytes()[20:22] == b"\xfe\xff"  # WAVE_FORMAT_EXTENSIBLE
    else:
        sf.write(path, rng.uniform(-1, 1, (3000, 2)).astype(np.float32), 16000, subtype="PCM_16")
        data = path.read_bytes()
        if case == "truncated":  # a download cut off mid-frame: the header promises more than is there
            data = data[:-4001]
        else:  # a LIST chunk after the audio, as many editors write
            data = data + b"LIST" + (6).to_bytes(4, "little") + b"INFOab"
            data = data[:4] + (len(data) - 8).to_bytes(4, "little") + data[8:]
        path.write_bytes(data)
    expected, expected_rate = sf.read(str(path), dtype="float32", always_2d=True)
    samples, rate = decode(path)
    assert rate == expected_rate and samples.dtype == np.float32
    assert np.array_equal(samples, expected.mean(axis=1) if expected.shape[1] > 1 else expected[:, 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_samples_are_refused(tmp_path, bad):
    x = tone(16000, 0.5)
    x[1234] = bad
    path = tmp_path / "bad.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"bad\.wav: contains NaN or infinite"):
        load(path, 16000)
    assert peak_amplitude(np.array([0.1, -0.7, 0.3], np.float32)) == pytest.approx(0.7)
    assert peak_amplitude(np.zeros(0, np.float32)) == 0.0


def test_stereo_48k_is_mixed_to_mono_and_resampled(tmp_path):
    path = tmp_path / "stereo.flac"
    stereo = tone(48000, 1.0, channels=2)
    stereo[:, 1] *= 0  # mono mix is the mean of the channels
    sf.write(path, stereo, 48000)
    out = load(path, 16000)
    assert out.ndim == 1 and len(out) == 16000
    assert 0.2 < np.abs(out).max() < 0.3


def test_real_8k_speech_is_resampled_to_16k():
    path = sorted((DCS / "speech").glob("*.wav"))[0]
    assert sf.info(str(path)).samplerate == 8000
    out = load(path, 16000)
    assert abs(len(out) - 2 * sf.info(str(path)).frames) <= 2


def test_ogg_and_mp3_decode_with_soundfile(tmp_path):
    for ext, fmt in ((".ogg", "OGG"), (".mp3", "MP3")):
        path = tmp_path / f"t{ext}"
        sf.write(path, tone(16000, 1.0), 16000, format=fmt)
        assert abs(len(load(path, 16000)) - 16000) < 2000


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"RIFF....WAVEfmt garbage" * 10, "corrupt"),
                                             (b"just some text\n" * 100, "corrupt")])
def test_bad_files_raise_audio_error_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match="bad.wav"):
        decode(path)


def test_m4a_goes_through_ffmpeg(tmp_path):
    assert shutil.which("ffmpeg"), "ffmpeg is installed by `make test` (system-deps)"
    wav, m4a = tmp_path / "a.wav", tmp_path / "a.m4a"
    sf.write(wav, tone(22050, 1.5), 22050)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    out = load(m4a, 16000)
    assert abs(len(out) / 16000 - 1.5) < 0.1 and np.abs(out).max() > 0.3


def test_non_soundfile_format_without_ffmpeg_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "clip.webm"
    path.write_bytes(b"\x1aE\xdf\xa3" + b"\0" * 100)
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg on PATH
    with pytest.raises(AudioError, match="need ffmpeg, which is not installed"):
        decode(path)


def test_chunk_policies():
    # 5 s at 1 kHz, 2 s chunks: two full chunks; the 1 s tail is kept at min_fraction 0.5, dropped at 0.6.
    assert chunk_starts(5000, 2000, 2000, 0.5, "pad") == [0, 2000, 4000]
    assert chunk_starts(5000, 2000, 2000, 0.6, "pad") == [0, 2000]
    # overlap: the chunk at 3000 already reaches the end, so no padded tail repeats its last second
    assert chunk_starts(5000, 2000, 1000, 0.5, "pad") == [0, 1000, 2000, 3000]
    assert chunk_starts(6500, 2000, 1000, 0.5, "pad") == [0, 1000, 2000, 3000, 4000]  # 0.5 s unheard: too little
    assert chunk_starts(8600, 3000, 2000, 0.5, "pad") == [0, 2000, 4000, 6000]  # 1.6 s of new audio at the end
    assert chunk_starts(500, 2000, 2000, 0.5, "pad") == [0]
    assert chunk_starts(500, 2000, 2000, 0.5, "drop") == []
    assert chunk_starts(0, 2000, 2000, 0.5, "pad") == []


def test_cut_chunks_pads_and_repeats():
    clip = np.arange(1, 501, dtype=np.float32)  # 0.5 s at 1 kHz
    padded, starts = cut_chunks(clip, ChunkRules(1000, 2.0, short_clip="pad"))
    assert padded.shape == (1, 2000) and padded[0, 499] == 500 and padded[0, 500:].max() == 0 and starts[0] == 0
    repeated, _ = cut_chunks(clip, ChunkRules(1000, 2.0, short_clip="repeat"))
    assert repeated[0, 500] == 1 and repeated[0, 1999] == 500


def test_log_mel_shape_dtype_and_silence_floor():
    params = FeatureParams.from_config(Config())
    chunks = np.zeros((3, params.chunk_samples), dtype=np.float32)
    chunks[1] = tone(16000, 2.0)
    mel = log_mel(chunks, params)
    assert mel.shape == (3, 64, 63) and mel.dtype == np.float16
    assert mel[0].max() == pytest.approx(-100.0)  # digital silence
    assert mel[1].max() - mel[1].min() <= 80.0 + 0.1  # top_db per chunk


def test_log_mel_equals_torchaudio_melspectrogram_in_db():
    """The fast path (re² + im², in-place dB) computes what torchaudio's own transforms give."""
    import torch
    import torchaudio

    params = FeatureParams.from_config(Config())
    chunks = np.random.default_rng(1).normal(0, 0.1, (4, params.chunk_samples)).astype(np.float32)
    chunks[2] = tone(16000, 2.0, freq=1000.0)
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=params.sample_rate, n_fft=params.n_fft, hop_length=params.hop_length, f_min=params.f_min,
        f_max=params.f_max, n_mels=params.n_mels, power=2.0, norm="slaney", mel_scale="slaney")
    reference = transform(torch.from_numpy(chunks))
    db = 10 * torch.log10(reference.clamp(min=1e-10))
    db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - params.top_db).numpy()
    mel = log_mel(chunks, params)
    assert mel.shape == db.shape
    assert np.abs(mel.astype(np.float32) - db).max() < 0.05  # float16 storage: ~0.03 dB at -100 dB


def test_log_mel_of_a_chunk_does_not_depend_on_its_batch_mates():
    """A build featurises the chunks of several files together; each chunk's bytes must be what it
    gets alone, or output would depend on how files were grouped (e.g. in part builds)."""
    rng = np.random.default_rng(3)
    for overrides in ([], ["audio.sample_rate=8000", "features.n_fft=256", "features.hop_length=128"]):
        params = FeatureParams.from_config(load_config(overrides=overrides))
        chunks = (rng.normal(0, 1, (21, params.chunk_samples)) * rng.uniform(1e-3, 1, (21, 1))).astype(np.float32)
        alone = np.concatenate([log_mel(chunks[i:i + 1], params) for i in range(len(chunks))])
        for cuts in ([7], [1, 2, 3, 11, 20], [16], []):
            together = np.concatenate([log_mel(part, params) for part in np.split(chunks, cuts)])
            assert np.array_equal(together.view(np.uint16), alone.view(np.uint16)), cuts
