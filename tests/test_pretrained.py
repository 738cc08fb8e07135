"""Starting from PANNs weights (model.init_weights): checkpoints written here in PANNs' layout with random
weights (names and shapes from audioset_tagging_cnn pytorch/models.py and torchlibrosa, written out below
independently of audioshard's models), the features preset, and a short real training from one."""

import json

import librosa
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_BUILD, link_tree

from audioshard.build import build_shards
from audioshard.checkpoint import read_checkpoint
from audioshard.cli import _config, build_parser
from audioshard.config import ConfigError, load_config
from audioshard.manifest import load_manifest
from audioshard.models import build_model, model_args
from audioshard.names import FEATURE_PRESETS
from audioshard.params import FeatureParams
from audioshard.pretrained import PretrainedError, load_init_weights, match_weights, read_weights
from audioshard.train import train

# PANNs' layouts: (block widths, kernel, convs per block); Cnn14 = ConvBlock x 6, Cnn6 = ConvBlock5x5 x 4.
LAYOUTS = {"panns_cnn14": ((64, 128, 256, 512, 1024, 2048), 3, 2), "panns_cnn6": ((64, 128, 256, 512), 5, 1)}
FRONT_END = ("spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight",
             "logmel_extractor.melW")
PANNS32K = FeatureParams(sample_rate=32000, chunk_seconds=0.5, n_mels=64, n_fft=1024, hop_length=320, f_min=50.0,
                         f_max=14000.0, top_db=0.0)


def panns_shapes(name: str, n_fft: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a PANNs checkpoint's "model" and its shape (527 AudioSet classes)."""
    widths, kernel, convs = LAYOUTS[name]
    shapes = {FRONT_END[0]: (n_fft // 2 + 1, 1, n_fft), FRONT_END[1]: (n_fft // 2 + 1, 1, n_fft),
              FRONT_END[2]: (n_fft // 2 + 1, 64)}

    def batchnorm(prefix: str, n: int) -> None:
        shapes.update({f"{prefix}.{k}": (n,) for k in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{prefix}.num_batches_tracked"] = ()

    batchnorm("bn0", 64)
    cin = 1
    for i, width in enumerate(widths, 1):
        for j in range(1, convs + 1):
            shapes[f"conv_block{i}.conv{j}.weight"] = (width, cin if j == 1 else width, kernel, kernel)
            batchnorm(f"conv_block{i}.bn{j}", width)
        cin = width
    shapes.update({"fc1.weight": (widths[-1], widths[-1]), "fc1.bias": (widths[-1],),
                   "fc_audioset.weight": (527, widths[-1]), "fc_audioset.bias": (527,)})
    return shapes


def random_panns_state(name: str, params: FeatureParams, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in PANNs' layout; the mel filterbank is librosa's, as PANNs' LogmelFilterBank holds it."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    # Scaled like trained weights, so that every layer passes on what it is given (a test comparing outputs
    # must see outputs that depend on the input).
    for key, shape in panns_shapes(name, params.n_fft).items():
        draw = torch.randn(shape, generator=gen)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(12345)
        elif key.startswith("bn0.running"):  # bn0 sees dB: mean -60..-20, variance 10..60 dB²
            state[key] = draw.abs() * 25 + 10 if key.endswith("var") else draw * 10 - 40
        elif key.endswith(("running_var", "running_mean")):
            state[key] = draw.abs() * 0.5 + 0.5 if key.endswith("var") else draw * 0.1
        elif draw.ndim > 1:  # conv and linear weights: He initialisation
            state[key] = draw * (2 / draw[0].numel()) ** 0.5
        else:  # BatchNorm scales (the only 1-d weights) near 1; shifts and biases near 0
            state[key] = draw * 0.1 + (1.0 if key.endswith("weight") else 0.0)
    state[FRONT_END[2]] = torch.from_numpy(librosa.filters.mel(
        sr=params.sample_rate, n_fft=params.n_fft, n_mels=params.n_mels, fmin=params.f_min, fmax=params.f_max).T)
    return state


@pytest.fixture(scope="module")
def cnn6_file(tmp_path_factory):
    """A Cnn6 32 kHz checkpoint as PANNs save it: {"iteration", "model", "sampler"}, with NumPy values."""
    state = random_panns_state("panns_cnn6", PANNS32K)
    path = tmp_path_factory.mktemp("panns") / "Cnn6_mAP=0.343.pth"
    torch.save({"iteration": np.int64(540000), "model": state, "sampler": {"indexes": np.arange(5, dtype=np.int64)}},
               path)
    return path, state


def fresh(name: str = "panns_cnn6", classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_args(name, classes, 64, 0.2))


@pytest.mark.parametrize("name", ["panns_cnn14", "panns_cnn6"])
def test_every_backbone_tensor_has_a_panns_name_and_shape(name):
    with torch.device("meta"):  # CNN14's 80 M parameters: shapes only, no memory
        model = fresh(name)
        theirs = {k: torch.empty(s) for k, s in panns_shapes(name, 512).items()}
        assert model(torch.empty(2, 1, 64, 201)).shape == (2, 3)  # 2 s at the 16 kHz preset's 10-ms hop
    loaded, ignored = match_weights(model.state_dict(), theirs, "ckpt.pth", name)
    assert set(loaded) == {k for k in model.state_dict() if not k.startswith("head.")}
    assert ignored == sorted([*FRONT_END, "fc_audioset.bias", "fc_audioset.weight"])
    backbone = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("head."))
    assert backbone == {"panns_cnn14": 79_673_792, "panns_cnn6": 4_567_104}[name]  # + fc_audioset: 80.8 M, 4.8 M


def test_loading_copies_every_backbone_tensor_and_reports_what_was_ignored(cnn6_file):
    path, state = cnn6_file
    model = fresh()
    head_before = model.head.weight.clone()
    report = load_init_weights(model, str(path), "panns_cnn6", PANNS32K, mean=-50.0, std=20.0)
    own = model.state_dict()
    assert report.loaded == sorted(k for k in own if not k.startswith("head."))
    assert report.fresh == ["head.bias", "head.weight"] and torch.equal(model.head.weight, head_before)
    assert report.ignored == sorted([*FRONT_END, "fc_audioset.bias", "fc_audioset.weight"])
    for key in report.loaded:
        if key not in ("bn0.running_mean", "bn0.running_var"):
            assert torch.equal(own[key], state[key]), key
    # bn0's statistics move to the normalised input (dB - mean) / std
    assert torch.allclose(own["bn0.running_mean"], (state["bn0.running_mean"] + 50) / 20)
    assert torch.allclose(own["bn0.running_var"] + 1e-5, (state["bn0.running_var"] + 1e-5) / 400)
    summary = report.summary(str(path))
    assert f"initialised {len(report.loaded)} of {len(own)} tensors" in summary
    assert "fc_audioset.*" in summary and "logmel_extractor.*" in summary and "spectrogram_extractor.stft" in summary
    bare = path.with_name("bare.pt")  # a bare state dict loads the same
    torch.save(state, bare)
    assert read_weights(bare).keys() == state.keys()


def test_normalised_input_gives_what_panns_give_on_decibels(cnn6_file):
    """The model fed audioshard's normalised batches computes what PANNs compute on the same dB."""
    path, _ = cnn6_file
    on_db, on_normalised = fresh().eval(), fresh().eval()
    load_init_weights(on_db, str(path), "panns_cnn6", PANNS32K, mean=0.0, std=1.0)  # bn0 as PANNs have it
    load_init_weights(on_normalised, str(path), "panns_cnn6", PANNS32K, mean=-45.0, std=18.0)
    on_normalised.head.load_state_dict(on_db.head.state_dict())
    db = torch.rand(4, 1, 64, 51) * -100
    with torch.no_grad():
        expected, got = on_db(db), on_normalised((db + 45.0) / 18.0)
        assert (on_db(db.flip(0)) - expected).abs().max() > 0.1  # the output depends on the input
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()


def panns_forward(state: dict[str, torch.Tensor], head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """PANNs' Cnn6.forward in eval mode, written out from pytorch/models.py; x: (B, 1, time, mel) dB."""
    def bn(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], training=False)

    x = bn(x.transpose(1, 3), "bn0").transpose(1, 3)
    for i in range(1, 5):  # ConvBlock5x5: relu(bn1(conv1(x))), 2x2 average pooling
        x = F.avg_pool2d(F.relu(bn(F.conv2d(x, state[f"conv_block{i}.conv1.weight"], padding=2),
                                   f"conv_block{i}.bn1")), (2, 2))
    x = torch.mean(x, dim=3)
    x = torch.max(x, dim=2)[0] + torch.mean(x, dim=2)
    return head(F.relu(F.linear(x, state["fc1.weight"], state["fc1.bias"])))


def test_forward_is_panns_forward(cnn6_file):
    path, state = cnn6_file
    model = fresh().eval()
    load_init_weights(model, str(path), "panns_cnn6", PANNS32K, mean=0.0, std=1.0)  # bn0 on dB, as in PANNs
    db = torch.rand(3, 1, 64, 51) * -100  # (B, 1, mel, time): audioshard's layout
    with torch.no_grad():
        assert torch.allclose(model(db), panns_forward(state, model.head, db.transpose(2, 3)), rtol=1e-4, atol=1e-5)


def test_shape_mismatch_missing_tensor_and_wrong_model_name_the_tensor_and_the_fix(cnn6_file, tmp_path):
    path, state = cnn6_file
    bad = dict(state, **{"conv_block2.conv1.weight": torch.zeros(128, 64, 3, 3)})
    torch.save({"model": bad}, tmp_path / "shape.pth")
    with pytest.raises(PretrainedError, match=r"shape\.pth: tensor conv_block2\.conv1\.weight has shape "
                                              r"\(128, 64, 3, 3\), panns_cnn6 has \(128, 64, 5, 5\)"):
        load_init_weights(fresh(), str(tmp_path / "shape.pth"), "panns_cnn6", PANNS32K, -50.0, 20.0)
    torch.save({"model": {k: v for k, v in state.items() if k != "fc1.bias"}}, tmp_path / "missing.pth")
    with pytest.raises(PretrainedError, match=r"missing\.pth has no tensor fc1\.bias \(\(512,\) in panns_cnn6\)"):
        load_init_weights(fresh(), str(tmp_path / "missing.pth"), "panns_cnn6", PANNS32K, -50.0, 20.0)
    with torch.device("meta"):
        cnn14 = {k: torch.empty(s) for k, s in panns_shapes("panns_cnn14", 512).items()}
        own = fresh("panns_cnn6").state_dict()
    with pytest.raises(PretrainedError, match="model.name must be panns_cnn14 for this checkpoint"):
        match_weights(own, cnn14, "Cnn14_16k_mAP=0.438.pth", "panns_cnn6")


def test_shards_with_other_features_are_refused_with_the_preset_to_build_with(cnn6_file):
    path, _ = cnn6_file
    default = FeatureParams.from_config(load_config(overrides=["audio.chunk_seconds=0.5", "audio.hop_seconds=0"]))
    with pytest.raises(PretrainedError, match=r"another mel filterbank .* --preset panns32k"):
        load_init_weights(fresh(), str(path), "panns_cnn6", default, -50.0, 20.0)
    panns16k = FeatureParams(16000, 0.5, 64, 512, 160, 50.0, 8000.0, 0.0)
    with pytest.raises(PretrainedError, match=r"n_fft 1024 and 64 mel bands; these shards have n_fft 512"):
        load_init_weights(fresh(), str(path), "panns_cnn6", panns16k, -50.0, 20.0)
    clipped = FeatureParams(32000, 0.5, 64, 1024, 320, 50.0, 14000.0, 80.0)
    with pytest.raises(PretrainedError, match="no top_db clipping; these shards have hop_length 320 and top_db 80"):
        load_init_weights(fresh(), str(path), "panns_cnn6", clipped, -50.0, 20.0)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if it were ever unpickled


def test_a_checkpoint_with_python_objects_is_refused_unopened(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {"fc1.bias": torch.zeros(2)}, "hook": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(PretrainedError, match=r"refused .*evil\.pth: it holds Python objects"):
        read_weights(tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(PretrainedError, match="is not a file .* never downloads"):
        read_weights(tmp_path / "Cnn14_16k_mAP=0.438.pth")


def test_settings_and_preset():
    cfg = _config(build_parser().parse_args(["config", "--preset", "panns16k", "--set", "features.hop_length=320"]))
    assert (cfg.audio.sample_rate, cfg.features.n_fft, cfg.features.f_min, cfg.features.f_max) == (16000, 512, 50, 8000)
    assert cfg.features.top_db == 0.0 and cfg.features.hop_length == 320  # --set wins over the preset
    assert load_config(overrides=["model.name=panns_cnn14", "model.init_weights=w.pth"]).model.init_weights == "w.pth"
    for overrides, message in [(["model.init_weights=w.pth"], "set model.name to panns_cnn14 or panns_cnn6"),
                               (["model.name=panns_cnn6", "model.init_weights=w.pth", "model.init_checkpoint=c.pt"],
                                "both set"),
                               (["model.name=panns_cnn6", "model.init_weights=w.pth", "model.input_norm=chunk"],
                                'input_norm must be "none"')]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=overrides)


def test_short_training_from_panns_weights_keeps_the_frozen_backbone(cnn6_file, tmp_path, capsys):
    path, state = cnn6_file
    raw = link_tree(tmp_path / "raw", {"drone": 5, "speech": 5})
    shards = tmp_path / "shards"
    build_shards(raw, shards, load_config(overrides=[*FEATURE_PRESETS["panns32k"], *SMALL_BUILD,
                                                     "audio.chunk_seconds=0.5", "audio.hop_seconds=0.5"]),
                 workers=2, progress=False)
    manifest = load_manifest(shards)
    assert manifest.features == PANNS32K  # the preset's values are the build's record
    cfg = load_config(overrides=["model.name=panns_cnn6", f"model.init_weights={path}", "model.freeze_backbone=true",
                                 "train.epochs=1", "train.batch_size=16", "train.num_workers=0",
                                 "train.sanity_steps=0", "train.warmup_epochs=0", "augment.enabled=false"])
    train(str(shards), tmp_path / "run", cfg, progress=False)
    assert f"initialised 31 of 33 tensors from {path}; new: head.bias, head.weight" in capsys.readouterr().out
    card = read_checkpoint(tmp_path / "run" / "best_model.pt")
    assert card.model_args["name"] == "panns_cnn6" and card.features == PANNS32K
    for key in ("conv_block1.conv1.weight", "conv_block4.bn1.running_var", "fc1.weight"):
        assert torch.equal(card.weights[key], state[key]), key  # frozen: as loaded, BatchNorm statistics too
    mean, std = manifest.mean, manifest.std
    assert torch.allclose(card.weights["bn0.running_mean"], (state["bn0.running_mean"] - mean) / std)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
