from pathlib import Path

import pytest

from audioshard.config import Config, ConfigError, dump_toml, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_root_config_toml_lists_every_default():
    assert load_config(ROOT / "config.toml") == Config()
    text = (ROOT / "config.toml").read_text()
    for section, values in Config().to_dict().items():
        assert f"[{section}]" in text
        for key in values:
            assert f"\n{key} = " in text, f"{section}.{key} missing from config.toml"


def test_set_overrides_with_types():
    cfg = load_config(overrides=["train.lr=3e-4", "train.epochs=7", "augment.enabled=false", "model.name=seed_cnn",
                                 "split.group_regex=/([a-z]+)_"])
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 7 and cfg.augment.enabled is False
    assert cfg.model.name == "seed_cnn" and cfg.split.group_regex == "/([a-z]+)_"
    assert load_config(overrides=["audio.chunk_seconds=1"]).audio.chunk_seconds == 1.0  # int accepted for float


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "valid keys in [train]: balanced, batch_size"),
    ("trian.lr=1", "valid sections: audio"),
    ("train.epochs=ten", "train.epochs: expected int"),
    ("train.epochs=2.5", "train.epochs: expected int"),
    ("augment.enabled=1", "augment.enabled: expected bool"),
    ("model.name=resnet", "choose one of: seed_cnn, cnn6, cnn10"),
    ("train.batch_size=0", "train.batch_size must be > 0"),
    ("shards.block_size=-4", "shards.block_size must be > 0"),
    ("split.val_fraction=0.6 split.test_fraction=0.5", "must be < 1"),
    ("train.lr", "expects section.key=value"),
    ("augment.freq_warp=1.0", "augment.freq_warp must be >= 0 and below 1"),
    ("augment.time_stretch=-0.1", "augment.time_stretch must be >= 0 and below 1"),
    ("model.width=512", "model.width = 512 is above 256"),  # checkpoints that wide are refused when read
    ("shards.cache_limit=lots", "is not a size"),
])
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=override.split())
    assert message in str(info.value)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 'x'\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_dump_toml_round_trips(tmp_path):
    cfg = load_config(overrides=["train.lr=0.0005", "split.group_regex=a\"b"])
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg
