"""Self-describing checkpoints, written atomically and read without unpickling.

A checkpoint holds the weights, the model's arguments, class names, feature parameters,
normalisation, the resolved config, the epoch and metrics: enough to predict with nothing else.
It is read with `torch.load(weights_only=True)`, which refuses pickled code (torch >= 2.6).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from audioshard.audio import ChunkRules
from audioshard.config import MAX_WIDTH  # one bound for settings and files alike
from audioshard.errors import AudioshardError
from audioshard.manifest import Manifest
from audioshard.models import MODELS, build_model
from audioshard.params import FeatureParams, feature_params_problem

CHECKPOINT_FORMAT = "audioshard-checkpoint"
CHECKPOINT_VERSION = 1
MAX_CLASSES = 100_000
MAX_CHECKPOINT_BYTES = 4 << 30  # last.pt at MAX_WIDTH with Adam's two moments and averaged weights: ~1.5 GB


class CheckpointError(AudioshardError, ValueError):
    """A checkpoint is unreadable, unsafe, or does not match the shards it is used with."""


TRAINING_STATE = ("optimizer", "scheduler", "history", "best_score", "best_epoch", "rng", "trained_weights",
                  "position")


@dataclass(frozen=True)
class Checkpoint:
    """What an audioshard checkpoint holds: the one description of its contents. `train` writes it
    (best_model.pt; last.pt adds `training`, what `--resume` needs); evaluate, predict and export
    read it through `read_checkpoint`, which checks the schema first.

    Attributes:
        weights: the model's state dict (the weight average, with train.ema_epochs).
        model_args: what `models.build_model` builds it from (name, num_classes, width, ...).
        classes: class names in output order.
        features: the build's feature parameters.
        mean, std: the train split's normalisation (dB).
        config: the run's resolved settings; its [audio] and [features] are the build's.
        epoch, metrics: the epoch saved (0-based) and its history record.
        training: optimizer, scheduler, history, selection state, RNG (last.pt only); `position` when
            saved in the middle of an epoch (train.save_every_steps): that epoch, the steps done, the
            epoch's running sums, the RNG states.
    """

    weights: dict[str, torch.Tensor]
    model_args: dict[str, Any]
    classes: list[str]
    features: FeatureParams
    mean: float
    std: float
    config: dict[str, Any]
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def rules(self) -> ChunkRules:
        """How the build cut recordings into chunks: predict and export cut new ones the same way."""
        return ChunkRules.from_audio(self.config.get("audio", {}), self.features.sample_rate,
                                     self.features.chunk_seconds)

    def model(self) -> torch.nn.Module:
        """The model, built from `model_args`, with the weights loaded, in eval mode."""
        return model_from_checkpoint(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.weights, "model_args": self.model_args, "classes": self.classes,
                "features": self.features.to_dict(), "normalization": {"mean": self.mean, "std": self.std},
                "config": self.config, "epoch": self.epoch, "metrics": self.metrics, **self.training}

    def without_training(self) -> Checkpoint:
        return dataclasses.replace(self, training={})

    @classmethod
    def from_dict(cls, state: dict[str, Any], where: str) -> Checkpoint:
        check_schema(state, where)
        norm = state["normalization"]
        return cls(weights=state["model"], model_args=dict(state["model_args"]), classes=list(state["classes"]),
                   features=FeatureParams.from_dict(state["features"]), mean=float(norm["mean"]),
                   std=float(norm["std"]), config=dict(state.get("config", {})), epoch=int(state.get("epoch", 0)),
                   metrics=dict(state.get("metrics", {})),
                   training={k: state[k] for k in TRAINING_STATE if k in state})


def read_checkpoint(path: str | Path) -> Checkpoint:
    """`load_checkpoint`, typed."""
    return Checkpoint.from_dict(load_checkpoint(path), str(path))


def save_checkpoint(path: str | Path, state: dict[str, Any] | Checkpoint) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    state = state.to_dict() if isinstance(state, Checkpoint) else state
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as stream:
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exn:
        Path(tmp).unlink(missing_ok=True)
        # Disk full, quota: say so, and that the previous file is still good. torch.save reports a failed
        # write as a RuntimeError ("PytorchStreamWriter failed writing file ..."), not an OSError.
        if isinstance(exn, (OSError, RuntimeError)):
            reason = getattr(exn, "strerror", None) or str(exn).splitlines()[0][:300]
            raise CheckpointError(f"writing {path} failed ({reason}); the previous {path.name} (if any) is intact. "
                                  "Free some space and continue with --resume") from exn
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict, read without unpickling, its sizes and schema checked before use."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:  # UnpicklingError for pickled code, RuntimeError for a truncated zip, ...
        raise CheckpointError(f"{path}: not a safe audioshard checkpoint ({type(exn).__name__}: "
                              f"{str(exn).splitlines()[0] if str(exn) else ''}); it may be corrupt, "
                              "or carry pickled code, which audioshard never loads") from exn
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an audioshard checkpoint")
    check_schema(state, str(path))
    return state


def _check_archive(path: Path) -> None:
    """torch.save writes a zip of stored (uncompressed) entries, so what torch.load allocates is at most
    the file's own size. Refuse a zip whose entries inflate beyond that (a 4.7 MB file made a 1 GiB
    tensor), and files over MAX_CHECKPOINT_BYTES, from the central directory, before reading any entry."""
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path}: {size} bytes; audioshard checkpoints are at most "
                              f"{MAX_CHECKPOINT_BYTES >> 20} MB (model.width <= {MAX_WIDTH})")
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip: torch.load refuses it, or reads the legacy format, which does not inflate
    if inflated > size:
        raise CheckpointError(f"{path}: its zip entries inflate to {inflated} bytes from a {size}-byte file; "
                              "torch.save never compresses, so this is not a checkpoint audioshard wrote")


def check_schema(state: dict[str, Any], where: str) -> None:
    """The keys every audioshard checkpoint has, with sane types and sizes, so that nothing is built
    from a forged `model_args` (width 3000 asked for 13.6 GB) and no later step meets a KeyError."""
    problem = _schema_problem(state)
    if problem:
        raise CheckpointError(f"{where}: not a usable audioshard checkpoint: {problem}")


def _schema_problem(state: dict[str, Any]) -> str:
    weights, classes, norm = state.get("model"), state.get("classes"), state.get("normalization")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        return "'model' is not a dict of tensors"
    problem = _model_args_problem(state.get("model_args"))
    if problem:
        return problem
    if not isinstance(classes, list) or len(classes) != state["model_args"]["num_classes"] or not all(
            isinstance(c, str) for c in classes):
        return "'classes' must be a list of num_classes names"
    if not isinstance(norm, dict) or not all(type(norm.get(k)) is float and math.isfinite(norm[k])
                                             for k in ("mean", "std")) or not norm["std"] > 0:
        return "'normalization' must hold a finite mean and a positive std"
    return _features_problem(state.get("features"))


def _model_args_problem(args: Any) -> str:
    if not isinstance(args, dict) or not isinstance(args.get("name"), str) or args["name"] not in MODELS:
        return f"model_args must name one of {', '.join(MODELS)} (got {args!r:.200})"
    unknown = set(args) - set(inspect.signature(MODELS[args["name"]]).parameters) - {"name"}
    if unknown:
        return f"model_args has keys {sorted(unknown)!r:.200} that {args['name']} does not take"
    for key, top in (("num_classes", MAX_CLASSES), ("width", MAX_WIDTH)):
        if type(args.get(key)) is not int or not 1 <= args[key] <= top:
            return f"model_args {key} = {args.get(key)!r:.50}, expected an integer in 1..{top}"
    dropout, norm = args.get("dropout", 0.0), args.get("input_norm", "none")
    if type(dropout) not in (int, float) or not 0 <= dropout <= 1 or norm not in ("none", "chunk", "band"):
        return f"model_args dropout {dropout!r:.50} (0..1) or input_norm {norm!r:.50} is not valid"
    return ""


def _features_problem(features: Any) -> str:
    try:
        params = FeatureParams.from_dict(features)
    except TypeError:
        return f"'features' must hold {', '.join(f.name for f in dataclasses.fields(FeatureParams))}"
    return feature_params_problem(params)


def model_from_checkpoint(state: dict[str, Any]) -> torch.nn.Module:
    model = build_model(state["model_args"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exn:  # missing, unexpected or wrongly shaped weights (torch names each)
        detail = " ".join(line.strip() for line in str(exn).splitlines()[:2])  # torch names the first tensor
        raise CheckpointError(f"the checkpoint's weights do not fit its model_args: {detail:.400}") from exn
    model.eval()
    return model


def check_compatible(card: Checkpoint, manifest: Manifest, where: str) -> None:
    """Classes and features of the checkpoint must be those of the shards."""
    if card.classes != manifest.classes:
        raise CheckpointError(f"{where} was trained on classes {card.classes}, but the shards at "
                              f"{manifest.root} have {manifest.classes}")
    if card.features != manifest.features:
        raise CheckpointError(f"{where} was trained on features {card.features.to_dict()}, but the shards at "
                              f"{manifest.root} have {manifest.features.to_dict()}")
