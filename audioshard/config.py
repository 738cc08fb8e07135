"""Typed configuration: dataclasses that mirror `config.toml`, one source of truth.

Every setting has a default here; `config.toml` at the repository root lists the same keys with
comments (a test keeps the two in step). Any command takes `--config FILE` and repeated
`--set section.key=value`; an unknown key or a wrong type is a `ConfigError` naming the key and
the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from audioshard.errors import AudioshardError
from audioshard.names import BAND_NORM_MODELS, MODEL_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


class ConfigError(AudioshardError, ValueError):
    """A setting is unknown, of the wrong type, or out of range."""


@dataclass
class AudioConfig:
    sample_rate: int = 16000
    chunk_seconds: float = 2.0
    hop_seconds: float = 1.0
    min_fraction: float = 0.5
    short_clip: str = "pad"
    skip_silent: bool = True
    silence_peak: float = 1e-4
    extensions: list[str] = field(
        default_factory=lambda: [".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".opus", ".webm", ".mp4", ".aiff",
                                 ".aif", ".wma", ".mka"]
    )


@dataclass
class FeaturesConfig:
    n_mels: int = 64
    n_fft: int = 1024
    hop_length: int = 512
    f_min: float = 0.0
    f_max: float = 0.0
    top_db: float = 80.0


@dataclass
class SplitConfig:
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    group_regex: str = ""


@dataclass
class ShardsConfig:
    block_size: int = 64
    chunks_per_shard: int = 1024
    workers: int = 0
    http_timeout: float = 30.0
    http_retries: int = 4
    cache_dir: str = ""
    cache_limit: str = ""
    verify_local: bool = True
    remember_verified: bool = True
    strict: bool = False
    csv_allow_outside: bool = False


@dataclass
class TrainConfig:
    epochs: int = 0
    samples_budget: int = 360_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.3
    mixup_domain: str = "log"
    class_weights: bool = True
    balanced: bool = False
    num_workers: int = 2
    shuffle_blocks: int = 16
    pin_memory: bool = True
    prefetch_factor: int = 2
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    sanity_steps: int = 30
    select_metric: str = "last"
    ema_epochs: float = 0.0
    save_every_steps: int = 0
    tensorboard: bool = False


@dataclass
class AugmentConfig:
    enabled: bool = True
    noise_std: float = 0.1
    time_masks: int = 2
    time_mask_width: int = 8
    freq_masks: int = 1
    freq_mask_width: int = 8
    freq_warp: float = 0.1
    time_stretch: float = 0.2
    background_prob: float = 0.5
    background_snr: float = 10.0
    time_shift: float = 0.5
    gain_db: float = 6.0
    eq_db: float = 0.0


@dataclass
class ModelConfig:
    name: str = "cnn6"
    width: int = 64
    members: int = 1
    dropout: float = 0.2
    input_norm: str = "none"
    init_checkpoint: str = ""
    init_weights: str = ""
    freeze_backbone: bool = False


@dataclass
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def fetcher(self):
        """How to read build files (timeouts, retries, cache) as set in [shards]."""
        from audioshard.remote import Fetcher

        return Fetcher(timeout=self.shards.http_timeout, retries=self.shards.http_retries,
                       cache_dir=self.shards.cache_dir, cache_limit=parse_size(self.shards.cache_limit),
                       verify_local=self.shards.verify_local, remember_verified=self.shards.remember_verified)


MAX_MEMBERS = 16  # model.members: each member is a whole network; checkpoints asking more are refused too
MAX_WIDTH = 256  # model.width: cnn6 at 256 has ~75 M parameters (300 MB); checkpoints asking more are refused too


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
              "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in "20GB", "512MiB", "1.5 TB" or "1000000" ("" or "0": no limit, 0)."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "0")
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise ConfigError(f"shards.cache_limit = {text!r:.60} is not a size; write e.g. \"20GB\", \"512MiB\" or "
                          "a number of bytes (\"\" for no limit)")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


# Allowed values for the string settings that pick one behaviour among several.
CHOICES: dict[str, tuple[str, ...]] = {
    "audio.short_clip": ("pad", "repeat", "drop"),
    "train.optimizer": ("adam", "adamw"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.schedule": ("constant", "cosine"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "train.select_metric": ("last", "clip_macro_f1", "macro_f1", "accuracy", "loss", "mAP"),
    "model.name": MODEL_NAMES,
    "model.input_norm": ("none", "chunk", "band", "bn"),
    "train.mixup_domain": ("log", "power"),
}

POSITIVE = {
    "audio.sample_rate", "audio.chunk_seconds", "features.n_mels", "features.n_fft", "features.hop_length",
    "shards.block_size", "shards.chunks_per_shard", "train.samples_budget", "train.batch_size", "train.lr",
    "train.shuffle_blocks", "train.prefetch_factor", "model.width", "model.members",
}
FRACTIONS = {"audio.min_fraction", "split.val_fraction", "split.test_fraction", "model.dropout",
             "train.label_smoothing", "augment.background_prob", "augment.time_shift"}
NON_NEGATIVE = {"audio.hop_seconds", "audio.silence_peak", "features.f_min", "features.f_max", "features.top_db",
                "shards.workers", "shards.http_timeout", "shards.http_retries",
                "train.epochs", "train.weight_decay", "train.mixup_alpha", "train.ema_epochs", "train.warmup_epochs",
                "train.num_workers", "train.sanity_steps", "train.save_every_steps", "augment.noise_std",
                "augment.time_masks", "augment.time_mask_width", "augment.freq_masks", "augment.freq_mask_width",
                "augment.gain_db", "augment.eq_db"}
WARPS = {"augment.freq_warp", "augment.time_stretch"}

# The largest value of every number setting: far beyond any real use, small enough that nothing sized from
# them (buffers, loops, sleeps, threads) can take the machine's memory or hang a command. A test checks that
# every number setting is here.
MAXIMUM: dict[str, float] = {
    "audio.sample_rate": 768_000, "audio.chunk_seconds": 3600.0, "audio.hop_seconds": 3600.0,
    "audio.min_fraction": 1.0, "audio.silence_peak": 1.0,
    "features.n_mels": 1024, "features.n_fft": 65_536, "features.hop_length": 65_536, "features.f_min": 384_000.0,
    "features.f_max": 384_000.0, "features.top_db": 200.0,
    "split.seed": 2**32 - 1, "split.val_fraction": 1.0, "split.test_fraction": 1.0,
    "shards.chunks_per_shard": 1_000_000, "shards.workers": 1024,  # shards.block_size: build's block_problem
    "shards.http_timeout": 3600.0, "shards.http_retries": 20,
    "train.epochs": 100_000, "train.samples_budget": 10**12, "train.batch_size": 1_000_000,
    "train.lr": math.inf,  # finite (checked when read): a run that diverges stops at its first NaN or infinite loss
    "train.weight_decay": 10.0, "train.warmup_epochs": 100_000, "train.label_smoothing": 1.0,
    "train.mixup_alpha": 100.0, "train.num_workers": 256, "train.shuffle_blocks": 65_536,
    "train.prefetch_factor": 64, "train.seed": 2**32 - 1, "train.sanity_steps": 100_000, "train.ema_epochs": 100_000,
    "train.save_every_steps": 10**9,
    "augment.noise_std": 10.0, "augment.time_masks": 100, "augment.time_mask_width": 8192, "augment.freq_masks": 100,
    "augment.freq_mask_width": 1024, "augment.freq_warp": 1.0, "augment.time_stretch": 1.0,
    "augment.background_prob": 1.0, "augment.background_snr": 100.0, "augment.time_shift": 1.0,
    "augment.gain_db": 60.0, "augment.eq_db": 60.0,
    "model.dropout": 1.0,  # model.width: MAX_WIDTH, with its own message
    "model.members": MAX_MEMBERS,
}
# Lower bounds beyond the sign checks above (shards.http_timeout = 0 would make every read fail at once).
MINIMUM: dict[str, float] = {"audio.sample_rate": 1000, "split.seed": 0, "train.seed": 0,
                             "augment.background_snr": -100.0, "shards.http_timeout": 0.1}
MAX_OVERLAP = 100  # audio.hop_seconds >= chunk_seconds / MAX_OVERLAP: a second of audio gives at most ~100 chunks
MAX_REGEX = 500  # characters of split.group_regex


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of `default` (ints are accepted where floats are expected)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML (file or --set) has nan and inf; no setting means either
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{key}: expected a list of strings (e.g. [\".wav\", \".flac\"]), got {value!r:.80}")
    raise ConfigError(f"{key}: expected {_type_name(type(default))}, got {value!r:.80} ({_type_name(type(value))})")


def _set(cfg: Config, key: str, value: Any) -> None:
    section_name, _, name = key.partition(".")
    sections = {f.name for f in fields(cfg)}
    if section_name not in sections or not name:
        raise ConfigError(f"unknown config section in {key!r}; valid sections: {', '.join(sorted(sections))}")
    section = getattr(cfg, section_name)
    names = {f.name for f in fields(section)}
    if name not in names:
        raise ConfigError(f"unknown config key {key!r}; valid keys in [{section_name}]: {', '.join(sorted(names))}")
    setattr(section, name, _coerce(key, value, getattr(section, name)))


def validate(cfg: Config) -> Config:
    """Range and choice checks, so a bad value fails before any long work starts."""
    for section in fields(cfg):
        for f in fields(getattr(cfg, section.name)):
            key = f"{section.name}.{f.name}"
            value = getattr(getattr(cfg, section.name), f.name)
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"{key} = {value!r} is not valid; choose one of: {', '.join(CHOICES[key])}")
            if key in POSITIVE and not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value!r}")
            if key in NON_NEGATIVE and value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value!r}")
            if key in FRACTIONS and not 0 <= value <= 1:
                raise ConfigError(f"{key} must be between 0 and 1, got {value!r}")
            if key in WARPS and not 0 <= value < 1:
                raise ConfigError(f"{key} must be >= 0 and below 1 (factors are drawn from [1 - it, 1 + it]), "
                                  f"got {value!r}")
            if key in MAXIMUM and not MINIMUM.get(key, -math.inf) <= value <= MAXIMUM[key]:
                low = MINIMUM.get(key, "above 0" if key in POSITIVE else 0)
                raise ConfigError(f"{key} = {value!r} is out of range; valid: {low} to {MAXIMUM[key]:g}")
    _check_sizes(cfg)
    if cfg.split.val_fraction + cfg.split.test_fraction >= 1:
        raise ConfigError("split.val_fraction + split.test_fraction must be < 1 (something must be left to train on)")
    if cfg.features.f_max and cfg.features.f_max > cfg.audio.sample_rate / 2:
        raise ConfigError(f"features.f_max = {cfg.features.f_max} is above the Nyquist frequency "
                          f"{cfg.audio.sample_rate / 2} of audio.sample_rate; use 0 for sample_rate/2")
    _check_init(cfg.model)
    if cfg.audio.hop_seconds > cfg.audio.chunk_seconds:
        raise ConfigError(f"audio.hop_seconds = {cfg.audio.hop_seconds} is longer than audio.chunk_seconds = "
                          f"{cfg.audio.chunk_seconds}: the audio between chunks would be lost; use at most "
                          "chunk_seconds (or 0 for chunk_seconds: no overlap)")
    parse_size(cfg.shards.cache_limit)  # a bad size fails now, not at the first download
    if cfg.model.width > MAX_WIDTH:
        raise ConfigError(f"model.width = {cfg.model.width} is above {MAX_WIDTH} (the largest checkpoint audioshard "
                          "reads back); use at most that")
    return cfg


def _check_sizes(cfg: Config) -> None:
    """The settings that together size chunks, features and waits: each within what a build, a reader and a
    checkpoint accept, and the group regex one that compiles."""
    import re

    from audioshard.params import MAX_FRAMES, FeatureParams, feature_params_problem

    audio, features = cfg.audio, cfg.features
    shortest = audio.chunk_seconds / MAX_OVERLAP
    if audio.hop_seconds and audio.hop_seconds < shortest:
        raise ConfigError(f"audio.hop_seconds = {audio.hop_seconds!r} is below chunk_seconds / {MAX_OVERLAP} = "
                          f"{shortest:g} (every second of audio would become more than {MAX_OVERLAP} chunks); valid: "
                          f"0 (chunk_seconds, no overlap) or {shortest:g} to {audio.chunk_seconds:g}")
    params = FeatureParams.from_config(cfg)
    if features.n_fft > params.chunk_samples:
        raise ConfigError(f"features.n_fft = {features.n_fft} is longer than one chunk ({params.chunk_samples} "
                          "samples: audio.chunk_seconds * audio.sample_rate); valid: 1 to that")
    if params.frames > MAX_FRAMES:
        raise ConfigError(f"features.hop_length = {features.hop_length} gives {params.frames} frames per chunk, above "
                          f"{MAX_FRAMES}; valid: at least {params.chunk_samples // (MAX_FRAMES - 1) + 1} at this "
                          "chunk length and sample rate")
    if not features.f_min < params.f_max:
        raise ConfigError(f"features.f_min = {features.f_min} must be below f_max ({params.f_max:g} Hz)")
    if problem := feature_params_problem(params):  # the one check a manifest and a checkpoint go through too
        raise ConfigError(f"[audio] and [features]: {problem}")
    if len(cfg.split.group_regex) > MAX_REGEX:
        raise ConfigError(f"split.group_regex is {len(cfg.split.group_regex)} characters; at most {MAX_REGEX}")
    try:
        re.compile(cfg.split.group_regex)
    except (re.error, RecursionError, OverflowError) as exn:
        raise ConfigError(f"split.group_regex = {cfg.split.group_regex!r:.80} is not a valid regular expression "
                          f"({exn}); e.g. \"/([a-z]+)_\" for one group per speaker") from None
    if len(audio.extensions) > 1000 or not all(0 < len(e) <= 32 for e in audio.extensions):
        raise ConfigError("audio.extensions: expected at most 1000 extensions of 1 to 32 characters each, "
                          "e.g. [\".wav\", \".flac\"]")


def _check_init(model: ModelConfig) -> None:
    """model.init_checkpoint / init_weights / freeze_backbone agree with each other and model.name."""
    if model.freeze_backbone and not (model.init_checkpoint or model.init_weights):
        raise ConfigError("model.freeze_backbone = true needs model.init_checkpoint or model.init_weights (trained "
                          "weights to keep the backbone of); a frozen random backbone learns almost nothing")
    if model.init_weights and model.init_checkpoint:
        raise ConfigError("model.init_weights and model.init_checkpoint are both set; start from one of them")
    if model.init_weights and not model.name.startswith("panns_"):
        raise ConfigError(f"model.init_weights loads PANNs weights: set model.name to panns_cnn14 or panns_cnn6 "
                          f"(got {model.name!r})")
    if model.members > 1 and (model.init_weights or model.init_checkpoint):
        raise ConfigError(f"model.members = {model.members} trains its members from their own random starts; "
                          "model.init_weights / init_checkpoint start one network from given weights: set "
                          "model.members = 1 to fine-tune")
    if model.input_norm == "bn" and model.name not in BAND_NORM_MODELS:
        raise ConfigError(f"model.input_norm = \"bn\" is a layer of {', '.join(BAND_NORM_MODELS)} (got model.name = "
                          f"{model.name!r}; the PANNs models have their own bn0)")
    if model.init_weights and model.input_norm != "none":
        raise ConfigError("model.init_weights: PANNs' first layer learned absolute dB levels per mel band; "
                          f"model.input_norm must be \"none\" (got {model.input_norm!r})")


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (key, value); the value is read as TOML, else taken as a plain string."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"--set expects section.key=value, got {text!r} (e.g. --set train.lr=3e-4)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:  # arrays nested thousands deep
        raise ConfigError(f"--set {key.strip()}: the value nests too deep; settings are numbers, strings, "
                          "booleans or lists of strings") from None
    return key.strip(), value


def from_dict(data: dict[str, Any], cfg: Config | None = None) -> Config:
    """Overlay a nested dict (as read from TOML or a checkpoint) onto `cfg` (defaults if None)."""
    cfg = cfg or Config()
    for section_name, section in data.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{section_name!r} must be a [section] table, got {section!r}")
        for name, value in section.items():
            _set(cfg, f"{section_name}.{name}", value)
    return cfg


MAX_CONFIG_BYTES = 1 << 20


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file (if any), then `--set` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path, "rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 10} KiB; a settings file is a few KB "
                              "(see config.toml)")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exn:
            raise ConfigError(f"{path}: not valid TOML: {exn}") from exn
        except RecursionError:
            raise ConfigError(f"{path}: not valid TOML: a value nests too deep") from None
        from_dict(data, cfg)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    return validate(cfg)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML (what a run saves next to its checkpoints)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)
