"""Predict and export: the features are the shards' features, long files stream, exports match PyTorch."""

import csv
import io
import json
import shutil
import subprocess
import sys
import textwrap
import warnings

import matplotlib.image
import numpy as np
import onnxruntime
import pytest
import soundfile as sf
import torch
from conftest import DCS, GLIBC_MALLINFO2, TINY_TRAIN

from audioshard.audio import (
    AudioError,
    ChunkReader,
    ChunkRules,
    StreamingResampler,
    cut_chunks,
    load,
    resample,
    silent_chunks,
)
from audioshard.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from audioshard.cli import main
from audioshard.config import load_config
from audioshard.evaluate import predict_split
from audioshard.export import export_model, sidecar_path
from audioshard.features import FeatureParams, log_mel
from audioshard.manifest import load_manifest
from audioshard.predict import PredictError, Predictor, predict_files
from audioshard.stream import ShardStream
from audioshard.train import train

F16_STEP = 0.0625  # float16 spacing for |dB| in [64, 128): the most two float16 roundings can differ by


@pytest.fixture(scope="module")
def checkpoint(real_build, tmp_path_factory):
    run = tmp_path_factory.mktemp("predict_run")
    train(str(real_build), run, load_config(overrides=[*TINY_TRAIN, "train.epochs=5", "train.sanity_steps=0"]),
          progress=False)
    return run / "best_model.pt"


def assert_same_features(got: np.ndarray, want: np.ndarray) -> None:
    """Equal, or (when float32 sums differ in the last bit) at most one float16 step apart, rarely."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.float16
    diff = np.abs(got.astype(np.float32) - want.astype(np.float32))
    assert diff.max() <= F16_STEP and (diff == 0).mean() > 0.999, (diff.max(), (diff == 0).mean())


# --- streaming building blocks -----------------------------------------------------------------


@pytest.mark.parametrize("rates", [(44100, 16000), (8000, 16000), (48000, 16000), (22050, 16000), (11025, 16000)])
def test_streaming_resampler_equals_whole_file_resampling(rates):
    rng = np.random.default_rng(sum(rates))
    x = rng.standard_normal(200_003).astype(np.float32)
    resampler = StreamingResampler(*rates)
    parts, pos = [], 0
    while pos < len(x):  # ragged pieces, some shorter than the filter
        step = int(rng.integers(1, 30_000))
        parts.append(resampler.push(x[pos:pos + step]))
        pos += step
    got = np.concatenate([*parts, resampler.finish()])
    want = resample(x, *rates)
    assert len(got) == len(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("seconds,short_clip", [(0.3, "pad"), (0.3, "repeat"), (0.3, "drop"), (0.5, "pad"),
                                                 (1.2, "pad"), (1.3, "pad"), (3.0, "pad"), (3.37, "pad")])
@pytest.mark.parametrize("rate", [8000, 22050])
@pytest.mark.parametrize("hop", [0.0, 0.25, 0.2])
def test_chunk_reader_cuts_what_cut_chunks_cuts(tmp_path, seconds, short_clip, rate, hop):
    """Blocks of 2 chunks of 0.5 s at 8 kHz, back to back or overlapping: full chunks, the kept or dropped
    tail, short clips -- as at build time."""
    path = tmp_path / "clip.wav"
    rng = np.random.default_rng(rate)
    sf.write(path, (0.1 * rng.standard_normal((int(seconds * rate), 2))).astype(np.float32), rate, subtype="FLOAT")
    rules = ChunkRules(8000, 0.5, hop_seconds=hop, min_fraction=0.5, short_clip=short_clip)
    want, want_starts = cut_chunks(load(path, 8000), rules)
    reader = ChunkReader(path, rules, block_chunks=2)
    if len(want) == 0:
        with pytest.raises(AudioError, match="shorter than one chunk"):
            list(reader)
        return
    parts = list(reader)
    got = np.concatenate([c for c, _ in parts])
    starts = np.concatenate([s for _, s in parts]) / 8000
    np.testing.assert_array_equal(starts, want_starts)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)  # exact at 8 kHz; resampling sums differ in last bit
    assert reader.num_samples == len(load(path, 8000)) and reader.source_rate == rate


# --- prediction with a trained checkpoint ------------------------------------------------------


def test_predict_features_are_the_shards_features(checkpoint, real_build, real_raw):
    """The chunks predict computes for a file are the ones stored in the shards for it: same starts, same values."""
    manifest = load_manifest(real_build)
    stored: dict[int, list[tuple[float, np.ndarray]]] = {}
    for batch in ShardStream(manifest, "test", batch_size=64):
        for x, source, start in zip(batch.x.numpy()[:, 0], batch.source.tolist(), batch.start.tolist(), strict=True):
            stored.setdefault(source, []).append((start, x))
    predictor = Predictor(checkpoint, device="cpu", batch_size=2)  # several batches per file
    assert predictor.params == manifest.features
    sources = manifest.sources("test")
    assert {path.split("/")[0] for path in sources} == {"car", "drone", "speech"}  # 8 kHz speech: resampled
    for index, rel in enumerate(sources):
        parts = list(predictor.features(real_raw / rel))
        # the build left silent chunks (here: zero padding) out of the shards; predict sees them and flags them
        peak = predictor.rules.silence_peak
        heard = ~np.concatenate([silent_chunks(c, peak) for c, _ in predictor.chunks(real_raw / rel)])
        mel = np.concatenate([m for m, _ in parts])[heard]
        starts = np.concatenate([s for _, s in parts])[heard]
        want = sorted(stored[index], key=lambda item: item[0])
        np.testing.assert_allclose(starts, [s for s, _ in want], atol=1e-6)
        assert_same_features(mel, np.stack([x for _, x in want]))


def test_predict_agrees_with_evaluate_and_is_mostly_right(checkpoint, real_build, real_raw):
    manifest = load_manifest(real_build)
    sources = manifest.sources("test")
    summary = predict_files(checkpoint, [real_raw / rel for rel in sources], device="cpu", out=io.StringIO())
    assert not summary.failed and len(summary.predictions) == len(sources)
    # Recording-level logits equal the mean of evaluate's chunk logits on the shards.
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    split = predict_split(model, manifest, "test", torch.device("cpu"))
    for index, pred in enumerate(summary.predictions):
        mean = split["logits"][split["source"] == index].mean(axis=0)
        np.testing.assert_allclose(pred.chunk_logits[~pred.silent].mean(axis=0), mean, atol=1e-4)
        np.testing.assert_allclose(pred.probabilities.sum(), 1.0, atol=1e-6)
    right = [pred.label == rel.split("/")[0] for pred, rel in zip(summary.predictions, sources, strict=True)]
    assert sum(right) > len(right) / 2, right


def test_silent_chunks_do_not_vote_for_the_recording(checkpoint, tmp_path):
    samples, rate = sf.read(sorted((DCS / "drone").glob("*.wav"))[0], dtype="float32")
    sf.write(tmp_path / "padded.wav", np.concatenate([samples[: 2 * rate], np.zeros(4 * rate, "float32")]), rate)
    sf.write(tmp_path / "silence.wav", np.zeros(4 * rate, "float32"), rate)
    predictor = Predictor(checkpoint, device="cpu")
    padded = predictor.predict_file(tmp_path / "padded.wav")
    assert padded.starts.tolist() == [0, 1, 2, 3, 4]  # 2-s chunks every second, as the build cut them
    assert padded.silent.tolist() == [False, False, True, True, True]
    mean = padded.chunk_logits[:2].mean(axis=0)
    np.testing.assert_allclose(padded.probabilities, np.exp(mean) / np.exp(mean).sum(), rtol=1e-5)  # the 2 heard
    silence = predictor.predict_file(tmp_path / "silence.wav")  # nothing but silence: every chunk votes
    assert silence.silent.all() and np.isfinite(silence.probabilities).all()


def test_other_formats_rates_and_channels_match_the_build_path(checkpoint, tmp_path):
    """ffmpeg formats (streamed from ffmpeg's stdout) and a 44.1 kHz stereo FLAC give what `audio.load` gives."""
    params = FeatureParams.from_dict(load_checkpoint(checkpoint)["features"])
    rng = np.random.default_rng(1)
    t = np.arange(int(7.3 * 44100)) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.05 * rng.standard_normal(len(t))], axis=1)
    sf.write(tmp_path / "stereo.flac", stereo.astype(np.float32), 44100)
    source = sorted((DCS / "drone").glob("*.wav"))[0]
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(source), "-ar", "22050", "-c:a", "aac",
                    str(tmp_path / "drone.m4a")], check=True)
    predictor = Predictor(checkpoint, device="cpu", batch_size=3)
    for name in ("stereo.flac", "drone.m4a"):
        chunks, _ = cut_chunks(load(tmp_path / name, params.sample_rate), predictor.rules)
        got = np.concatenate([m for m, _ in predictor.features(tmp_path / name)])
        assert_same_features(got, log_mel(chunks, params))
        assert predictor.predict_file(tmp_path / name).source_rate in (44100, 22050)


def test_cli_formats_plots_and_failures(checkpoint, tmp_path, capsys):
    data = tmp_path / "in"
    (data / "sub").mkdir(parents=True)
    good = sorted((DCS / "speech").glob("*.wav"))[:2]
    for path in good:
        shutil.copy(path, data / "sub" / path.name)
    (data / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    (data / "notes.txt").write_text("not audio, not counted")
    sf.write(data / "header-only.wav", np.zeros(0, np.float32), 22050)  # valid header, no frames, another rate

    assert main(["predict", "--checkpoint", str(checkpoint), str(data), "--format", "csv", "--per-chunk",
                 "--plot", str(tmp_path / "plots")]) == 0
    out, err = capsys.readouterr()
    assert "header-only.wav: no audio samples" in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and set(rows[0]) == {"file", "start", "end", "class", "probability", "p_car", "p_drone", "p_speech"}
    assert {row["file"] for row in rows} == {str(data / "sub" / p.name) for p in good}
    assert all(abs(sum(float(row[f"p_{c}"]) for c in ("car", "drone", "speech")) - 1) < 1e-4 for row in rows)
    assert "skipped" in err and "broken.wav" in err and "corrupt or not audio" in err and "notes.txt" not in err
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 2 and matplotlib.image.imread(pngs[0]).ndim == 3

    assert main(["predict", "--checkpoint", str(checkpoint), *map(str, good), str(data / "broken.wav"),
                 "--format", "json", "--per-chunk"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["classes"] == ["car", "drone", "speech"] and len(doc["files"]) == 2
    assert doc["failed"][0]["file"] == str(data / "broken.wav") and doc["failed"][0]["reason"]
    first = doc["files"][0]
    assert first["class"] in doc["classes"] and len(first["timeline"]) == first["chunks"] > 0
    assert [c["start"] for c in first["timeline"]] == [1.0 * i for i in range(first["chunks"])]  # hop 1 s
    assert all(c["end"] == min(c["start"] + 2.0, first["seconds"]) for c in first["timeline"])

    assert main(["predict", "--checkpoint", str(checkpoint), str(good[0]), "--plot", str(tmp_path / "one.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["file", "class", "prob"] and len(table) == 2
    assert (tmp_path / "one.png").stat().st_size > 0

    assert main(["predict", "--checkpoint", str(checkpoint), str(data / "broken.wav")]) == 1  # none predicted
    assert "broken.wav" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "empty")]) == 2
    assert "no audio files" in capsys.readouterr().err
    with pytest.raises(PredictError, match="give a folder"):
        predict_files(checkpoint, good, plot=tmp_path / "x.png")


LONG_FILE_SCRIPT = GLIBC_MALLINFO2 + textwrap.dedent("""
    import io, json, re, sys
    import audioshard.predict as predict

    checkpoint, tiny, long = sys.argv[1:4]
    # Peak RSS of this process, MB. Not getrusage's ru_maxrss: Linux carries the parent's peak at fork time
    # (here pytest's, with torch loaded) over exec into it, which would hide everything below that.
    peak = lambda: int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
    def held():  # MB the heap holds for us, from one snapshot of the arenas
        info = libc.mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**20
    peaks, helds = [], []
    forward = predict.Predictor.logits
    def logits(self, mel):  # after each batch of 64 chunks (128 s of audio)
        out = forward(self, mel)
        peaks.append(peak())
        helds.append(held())
        return out
    predict.Predictor.logits = logits
    predict.predict_files(checkpoint, [tiny], fmt="csv", device="cpu", out=io.StringIO())  # imports, first use
    start, peaks[:], helds[:] = peak(), [], []
    out = io.StringIO()
    predict.predict_files(checkpoint, [long], fmt="csv", per_chunk=True, device="cpu", out=out)
    print(json.dumps({"start": start, "peaks": peaks, "helds": helds, "csv": out.getvalue()}))
""")


def test_half_an_hour_streams_in_bounded_memory(checkpoint, tmp_path):
    """30 min at 32 kHz: 57.6M samples, 230 MB as float32 (and 115 MB more resampled) -- never held at once."""
    rate = 32000
    piece = (0.1 * np.random.default_rng(0).standard_normal(60 * rate) * 32767).astype(np.int16)
    with sf.SoundFile(tmp_path / "long.wav", "w", samplerate=rate, channels=1, subtype="PCM_16") as out:
        for _ in range(30):
            out.write(piece)
    sf.write(tmp_path / "tiny.wav", piece[: 3 * rate], rate, subtype="PCM_16")
    proc = subprocess.run([sys.executable, "-c", LONG_FILE_SCRIPT, str(checkpoint), str(tmp_path / "tiny.wav"),
                           str(tmp_path / "long.wav")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    peaks, helds = result["peaks"], result["helds"]
    summary = {"start": round(result["start"]), "peaks": [round(p) for p in peaks], "helds": [round(h) for h in helds]}
    assert len(peaks) == len(helds) == 29, summary  # 1,799 chunks (2 s, every second) in batches of 64
    # All working memory (reading, resampling, a batch of 64 chunks through log-mel and the model) stays far
    # below the file's size ...
    assert peaks[-1] - result["start"] < 200, summary
    # ... and nothing accumulates from batch to batch: what the program holds on the heap is the same after the
    # second batch as after the last but two (the last two are shorter). Not peak RSS: how fast per-thread arenas
    # settle moves it by up to ~35 MB at batches that vary from run to run, while the bytes held did not move
    # by 0.1 MB in any run seen; a leak of a tenth of one batch's audio (0.8 MB) per batch adds 20 MB here.
    assert max(helds[1:-2]) - helds[1] < 4, summary
    rows = list(csv.DictReader(io.StringIO(result["csv"])))
    assert len(rows) == 1799
    np.testing.assert_allclose([float(r["start"]) for r in rows], np.arange(1799) * 1.0)
    assert float(rows[-1]["end"]) == 1800.0


# --- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_gives_pytorch_outputs(checkpoint, real_build, real_raw, tmp_path, fmt):
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    info = export_model(checkpoint, fmt, out)
    side = json.loads(sidecar_path(out).read_text())
    assert side == json.loads(json.dumps(info)) and side["classes"] == ["car", "drone", "speech"]
    assert side["features"] == load_manifest(real_build).features.to_dict()
    assert side["normalization"] == load_checkpoint(checkpoint)["normalization"]
    assert side["input"]["shape"] == ["batch", 1, 64, 63] and side["parity_max_abs_diff"] <= 1e-4

    # Real input, made only from what the sidecar says, at two batch sizes (the batch axis is dynamic).
    predictor = Predictor(checkpoint, device="cpu")
    mel = np.concatenate([m for m, _ in predictor.features(real_raw / load_manifest(real_build).sources("test")[0])])
    x = ((mel.astype(np.float32) - side["normalization"]["mean"]) / side["normalization"]["std"])[:, None]
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda batch: session.run(None, {"mel": batch})[0]  # noqa: E731
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": still what loads it
            loaded = torch.jit.load(str(out))
        run = lambda batch: loaded(torch.from_numpy(batch)).detach().numpy()  # noqa: E731
    for batch in (x, x[:1]):
        np.testing.assert_allclose(run(batch), predictor.logits(mel[: len(batch)]), rtol=1e-4, atol=1e-4)


def test_a_safetensors_export_predicts_the_checkpoints_classes_without_torch_load(checkpoint, real_build, real_raw,
                                                                                 tmp_path, monkeypatch, capsys):
    out = tmp_path / "shared" / "model.safetensors"
    info = export_model(checkpoint, "safetensors", out)
    assert info["parity_max_abs_diff"] == 0.0 and info["export"] == "safetensors"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors", "model.safetensors.json"]
    files = [real_raw / s for s in load_manifest(real_build).sources("test")[:6]]
    want = [Predictor(checkpoint, device="cpu").predict_file(f) for f in files]

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called on the safetensors path")

    monkeypatch.setattr(torch, "load", refuse)  # the one unpickling entry point: never reached from here on
    shared = Predictor(out, device="cpu")
    got = [shared.predict_file(f) for f in files]
    assert [p.label for p in got] == [p.label for p in want]
    np.testing.assert_allclose(np.stack([p.probabilities for p in got]), np.stack([p.probabilities for p in want]),
                               rtol=1e-5, atol=1e-6)
    assert main(["predict", "--checkpoint", str(out), "--format", "csv", *map(str, files)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["class"] for r in rows] == [p.label for p in want]


def test_a_tampered_safetensors_description_is_refused(checkpoint, tmp_path):
    out = tmp_path / "model.safetensors"
    export_model(checkpoint, "safetensors", out)
    side = sidecar_path(out)
    record = json.loads(side.read_text())
    record["model_args"]["width"] = 3000  # would ask for GBs
    side.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="model.safetensors.json.*width"):
        Predictor(out, device="cpu")
    side.unlink()
    with pytest.raises(CheckpointError, match="no such file"):
        Predictor(out, device="cpu")


@pytest.mark.parametrize("mode", ["chunk", "band"])
def test_input_norm_cancels_gain_or_colouring_and_exports(checkpoint, tmp_path, mode):
    """model.input_norm: "chunk" ignores a level offset, "band" a fixed offset per mel band; it lives in
    the model, so a checkpoint and its exports apply it with nothing else."""
    state, plain = load_checkpoint(checkpoint), load_checkpoint(checkpoint)
    state["model_args"]["input_norm"] = mode
    plain["model_args"]["input_norm"] = "none"
    model, control = model_from_checkpoint(state), model_from_checkpoint(plain)
    x = torch.randn(3, 1, 64, 63)
    offset = torch.full((1, 1, 64, 1), 2.5) if mode == "chunk" else torch.linspace(-3, 3, 64).view(1, 1, 64, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x + offset), model(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(control(x + offset), control(x), atol=1e-3)  # without it, the offset matters
    path = tmp_path / "norm.pt"
    save_checkpoint(path, state)
    fmt = "torchscript" if mode == "chunk" else "onnx"  # both export paths, one each
    info = export_model(path, fmt, tmp_path / f"norm.{fmt}")
    assert info["model_args"]["input_norm"] == mode and info["parity_max_abs_diff"] <= 1e-4


def test_export_cli(checkpoint, tmp_path, capsys):
    with pytest.warns(FutureWarning, match="deprecated"):  # torch's deprecation of TorchScript reaches the user
        assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript",
                     "--out", str(tmp_path / "m.pt")]) == 0
    assert "m.pt.json" in capsys.readouterr().out and (tmp_path / "m.pt.json").is_file()
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_an_unexpected_error_on_one_file_does_not_end_the_run(checkpoint, tmp_path, monkeypatch):
    good = sorted((DCS / "speech").glob("*.wav"))[:2]
    real = Predictor.predict_file

    def predict_file(self, path):  # stands in for a decoder bug on one odd file
        if path == good[0]:
            raise IndexError("list index out of range")
        return real(self, path)

    monkeypatch.setattr(Predictor, "predict_file", predict_file)
    err = io.StringIO()
    summary = predict_files(checkpoint, good, out=io.StringIO(), err=err)
    assert [str(p.path) for p in summary.predictions] == [str(good[1])]
    assert summary.failed == [{"file": str(good[0]),
                               "reason": "could not be decoded (IndexError: list index out of range)"}]
    assert "1 of 2 files predicted" in err.getvalue()


def test_predict_with_adapt_pools_the_recordings_and_needs_enough_of_them(checkpoint, tmp_path):
    speech = sorted((DCS / "speech").glob("*.wav"))[:12]  # ~4.4 s each: 2-3 chunks of 2 s
    drone = sorted((DCS / "drone").glob("*.wav"))[:6]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    out, err = io.StringIO(), io.StringIO()
    summary = predict_files(checkpoint, [*speech, *drone, bad], fmt="json", adapt=True, batch_size=16, out=out,
                            err=err)
    chunks = sum(len(p.starts) for p in summary.predictions)
    assert summary.adapted == chunks >= 20  # every chunk of every readable file, none of the broken one
    doc = json.loads(out.getvalue())
    assert doc["adapted_on_chunks"] == chunks and len(doc["files"]) == 18 and len(doc["failed"]) == 1
    assert f"adapted on {chunks} chunks" in err.getvalue()

    with pytest.raises(PredictError, match="--adapt needs at least 20 chunks"):
        predict_files(checkpoint, speech[:2], adapt=True, out=io.StringIO(), err=io.StringIO())
