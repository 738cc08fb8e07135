"""Self-describing checkpoints, written atomically and read without unpickling.

A checkpoint holds the weights, the model's arguments, class names, feature parameters,
normalisation, the resolved config, the epoch and metrics: enough to predict with nothing else.
It is read with `torch.load(weights_only=True)`, which refuses pickled code (torch >= 2.6), but keeps
shared references: every value is then walked within a budget (`tree_problem`) and each record checked
against its schema (`check_schema`: chunking rules, training state, mid-epoch position included) before
anything prints, serialises or uses it.
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
from audioshard.config import CHOICES, MAX_MEMBERS, MAX_OVERLAP, MAX_WIDTH  # one bound for settings and files alike
from audioshard.errors import AudioshardError
from audioshard.manifest import MAX_CLASSES, Manifest  # one bound for builds and checkpoints
from audioshard.models import MODELS, build_model
from audioshard.params import MAX_MELS, FeatureParams, feature_params_problem

CHECKPOINT_FORMAT = "audioshard-checkpoint"
CHECKPOINT_VERSION = 1
MAX_CHECKPOINT_BYTES = 4 << 30  # last.pt at MAX_WIDTH with Adam's two moments and averaged weights: ~1.5 GB

# What a checkpoint from a stranger may hold. The safe loader keeps shared references, so a 112 KB file can
# hold one list reached 2**40 times: every value is walked, a shared one each time it is reached, within these
# bounds, before anything prints, serialises or uses it. A real last.pt reaches a few hundred values.
MAX_VALUES = 1_000_000  # 100 000 class names or a history of 10 000 epochs fit
MAX_DEPTH = 8  # containers within containers; audioshard writes 4 (optimizer/state/0/exp_avg)
MAX_TEXT = 4096  # characters in one string (a path, a class name), bytes in one bytes value
MAX_TEXT_TOTAL = 16 << 20  # characters in all strings together
MAX_INT = 1 << 63
MAX_EPOCHS = 1_000_000
MAX_WORLD_SIZE = 65_536
# The chunking rules a checkpoint carries (its config's [audio]): what predict and export cut audio with,
# in the ranges config validation gives a build (a hop of one sample made a 3-s file 48 000 chunks, 3 GB).
MAX_CHUNK_SAMPLES = 1 << 26  # one chunk: 256 MB as float32 (an hour at 16 kHz)
# What every history record holds as a number: the curves and metrics.json read these after training.
HISTORY_NUMBERS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_clip_macro_f1",
                   "seconds")
POSITION_KEYS = ("epoch", "step", "sums", "rng", "world_size")


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
    thresholds: list[float] | None = None  # a multi-label model: each class's decision threshold, chosen on val

    @property
    def multilabel(self) -> bool:
        """One sigmoid per class (several sounds at once), not one softmax over them."""
        return self.thresholds is not None

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
                "config": self.config, "epoch": self.epoch, "metrics": self.metrics, **self.training,
                **({"thresholds": self.thresholds} if self.thresholds is not None else {})}

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
                   training={k: state[k] for k in TRAINING_STATE if k in state},
                   thresholds=[float(v) for v in state["thresholds"]] if "thresholds" in state else None)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """`load_checkpoint`, typed; a `.safetensors` export (with its JSON) is read by `weights.read_safetensors`,
    without torch.load."""
    if str(path).endswith(".safetensors"):
        from audioshard.weights import read_safetensors  # imports this module

        return read_safetensors(path)
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
    problem = tree_problem(state, tensor_bytes=2 * path.stat().st_size + (1 << 20))
    if problem:  # before anything else reads it: a message, a comparison or json.dumps could take hours
        raise CheckpointError(f"{path}: not a usable audioshard checkpoint: {problem}; audioshard never writes "
                              "this: use a best_model.pt or last.pt that `audioshard train` wrote")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an audioshard checkpoint")
    check_schema(state, str(path))
    return state


def _check_archive(path: Path) -> None:
    problem = archive_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def archive_problem(path: Path) -> str:
    """torch.save writes a zip of stored (uncompressed) entries, so what torch.load allocates is at most
    the file's own size. Refuse a zip whose entries inflate beyond that (a 4.7 MB file made a 1 GiB
    tensor), and files over MAX_CHECKPOINT_BYTES, from the central directory, before reading any entry.
    Every torch file audioshard reads goes through it ('' when the file may be loaded)."""
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        return (f"{size} bytes; audioshard checkpoints are at most {MAX_CHECKPOINT_BYTES >> 20} MB "
                f"(model.width <= {MAX_WIDTH})")
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return ""  # not a zip: torch.load refuses it, or reads the legacy format, which does not inflate
    if inflated > size:
        return (f"its zip entries inflate to {inflated} bytes from a {size}-byte file; torch.save never "
                "compresses, so torch did not write this file")
    return ""


def shown(value: Any) -> str:
    """A value read from a file, for a message: short scalars as they are, anything else by its type and size
    (never its repr, which for a shared or huge structure could take hours)."""
    if value is None or type(value) in (bool, float) or (type(value) is int and abs(value) < 10**18):
        return repr(value)
    if type(value) is str:
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    size = f" of {len(value)} items" if isinstance(value, (dict, list, tuple, set)) else ""
    return f"a {type(value).__name__}{size}"


def _where(path: list[Any]) -> str:
    return "/".join(repr(k[:40])[1:-1] if type(k) is str else str(k) if type(k) is int and abs(k) < 10**18
                    else f"<{type(k).__name__}>" for k in path) or "the top level"


_END = object()


def tree_problem(state: Any, tensor_bytes: int) -> str:
    """What is wrong with the structure of a loaded torch file ('' when nothing is): only dicts, lists,
    tuples, strings, numbers, None and dense CPU tensors, within MAX_VALUES values (a value reached twice
    counts twice), MAX_DEPTH levels, MAX_TEXT characters per string and MAX_TEXT_TOTAL in all, and
    `tensor_bytes` of tensors. Depth-first with one iterator per level: its memory is MAX_DEPTH frames."""
    values = text = tensors = 0
    path: list[Any] = []
    pending: list[Any] = [iter((("", state),))]
    while pending:
        item = next(pending[-1], _END)
        if item is _END:
            pending.pop()
            if path:
                path.pop()
            continue
        key, value = item
        values += 1
        container = isinstance(value, (dict, list, tuple))
        problem = ("" if type(key) in (str, int) else "a key that is not a string") or _leaf_problem(key)
        if not problem:
            if container:
                problem = f"values nested more than {MAX_DEPTH} deep" if len(pending) > MAX_DEPTH else ""
            else:
                problem = _leaf_problem(value)
                tensors += value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
        text += (len(key) if type(key) is str else 0) + (len(value) if type(value) is str else 0)
        if values > MAX_VALUES:
            problem = f"more than {MAX_VALUES} values (a value shared by reference counts each time it is reached)"
        elif text > MAX_TEXT_TOTAL:
            problem = f"more than {MAX_TEXT_TOTAL} characters of text (counted each time reached)"
        elif tensors > tensor_bytes:
            problem = f"tensors of more than {tensor_bytes} bytes (a shared tensor counts each time it is reached)"
        if problem:
            return f"it holds {problem} at {_where([*path, key][1:])}"
        if container:
            pending.append(iter(value.items()) if isinstance(value, dict) else enumerate(value))
            path.append(key)
    return ""


def _leaf_problem(value: Any) -> str:
    if type(value) in (str, bytes, bytearray):
        return f"a text of {len(value)} characters (at most {MAX_TEXT})" if len(value) > MAX_TEXT else ""
    if isinstance(value, torch.Tensor):
        dense = value.layout is torch.strided and value.device.type == "cpu" and not value.is_quantized
        return "" if dense else f"a {value.layout} tensor (audioshard writes dense ones)"
    if type(value) is int:
        return "" if -MAX_INT < value < MAX_INT else f"an integer of {value.bit_length()} bits"
    if value is None or type(value) in (bool, float):
        return ""
    return f"a {type(value).__name__}, which audioshard never writes"


def check_schema(state: dict[str, Any], where: str) -> None:
    """The keys every audioshard checkpoint has, with sane types and sizes, so that nothing is built
    from a forged `model_args` (width 3000 asked for 13.6 GB) and no later step meets a KeyError."""
    problem = _schema_problem(state)
    if problem:
        raise CheckpointError(f"{where}: not a usable audioshard checkpoint: {problem}")


def _schema_problem(state: dict[str, Any]) -> str:
    """One check per record of the checkpoint, in the order they depend on each other; `tree_problem` has
    already bounded every value, so these may look at anything."""
    problem = (_tensors_problem(state.get("model"), "'model'") or _model_args_problem(state.get("model_args"))
               or _classes_problem(state.get("classes"), state["model_args"]["num_classes"])
               or _normalization_problem(state.get("normalization")) or _features_problem(state.get("features")))
    if problem:
        return problem
    features = FeatureParams.from_dict(state["features"])
    if state["model_args"].get("n_mels", features.n_mels) != features.n_mels:
        return f"model_args n_mels = {state['model_args']['n_mels']}, but its features have {features.n_mels} mel bands"
    epoch = state.get("epoch", 0)
    if type(epoch) is not int or not -1 <= epoch < MAX_EPOCHS:
        return f"epoch = {shown(epoch)}, expected an integer in -1..{MAX_EPOCHS - 1}"
    return (_config_problem(state.get("config", {}), features) or _record_problem(state.get("metrics", {}), "metrics")
            or _training_problem(state, epoch) or _thresholds_problem(state, len(state["classes"])))


def _thresholds_problem(state: dict[str, Any], classes: int) -> str:
    """A multi-label model's thresholds: one probability in [0, 1] per class."""
    if "thresholds" not in state:
        return ""
    values = state["thresholds"]
    if not isinstance(values, list) or len(values) != classes or not all(
            type(v) in (int, float) and math.isfinite(v) and 0 <= v <= 1 for v in values):
        return f"'thresholds' must be {classes} numbers in 0..1, one per class"
    return ""


def _tensors_problem(weights: Any, name: str) -> str:
    if not isinstance(weights, dict) or not all(type(k) is str and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        return f"{name} is not a dict of tensors"
    return ""


def _classes_problem(classes: Any, num_classes: int) -> str:
    if not isinstance(classes, list) or len(classes) != num_classes or not all(type(c) is str for c in classes):
        return "'classes' must be a list of num_classes names"
    return ""


def _normalization_problem(norm: Any) -> str:
    if not isinstance(norm, dict) or not all(type(norm.get(k)) is float and math.isfinite(norm[k])
                                             for k in ("mean", "std")) or not norm["std"] > 0:
        return "'normalization' must hold a finite mean and a positive std"
    return ""


def _model_args_problem(args: Any) -> str:
    if not isinstance(args, dict) or type(args.get("name")) is not str or args["name"] not in MODELS:
        name = shown(args.get("name")) if isinstance(args, dict) else shown(args)
        return f"model_args must name one of {', '.join(MODELS)} (got {name})"
    takes = {"name", "members", *inspect.signature(MODELS[args["name"]]).parameters}  # members: models.Ensemble
    unknown = sorted(map(str, set(args) - takes))
    if unknown:
        keys = ", ".join(shown(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        return f"model_args has keys [{keys}] that {args['name']} does not take"
    for key, top in (("num_classes", MAX_CLASSES), ("width", MAX_WIDTH), ("members", MAX_MEMBERS)):
        if key == "members" and key not in args:  # one network: checkpoints before model.members
            continue
        if type(args.get(key)) is not int or not 1 <= args[key] <= top:
            return f"model_args {key} = {shown(args.get(key))}, expected an integer in 1..{top}"
    dropout, norm = args.get("dropout", 0.0), args.get("input_norm", "none")
    if type(dropout) not in (int, float) or not 0 <= dropout <= 1 or norm not in CHOICES["model.input_norm"]:
        return f"model_args dropout {shown(dropout)} (0..1) or input_norm {shown(norm)} is not valid"
    if (norm == "bn") != ("n_mels" in args):
        return f"model_args n_mels goes with input_norm \"bn\" and only with it (input_norm {shown(norm)})"
    if "n_mels" in args and (type(args["n_mels"]) is not int or not 1 <= args["n_mels"] <= MAX_MELS):
        return f"model_args n_mels = {shown(args['n_mels'])}, expected an integer in 1..{MAX_MELS}"
    return ""


def _features_problem(features: Any) -> str:
    names = [f.name for f in dataclasses.fields(FeatureParams)]
    if not isinstance(features, dict) or not set(names) - {"dtype"} <= set(features) <= set(names):
        return f"'features' must hold {', '.join(names)}"
    odd = [k for k, v in features.items() if type(v) not in (int, float, str)]
    if odd:
        return f"features {odd[0]} is {shown(features[odd[0]])}, expected a number"
    return feature_params_problem(FeatureParams.from_dict(features))


def _is_scalar(value: Any) -> bool:
    return value is None or type(value) in (bool, int, float, str)


def _record_problem(record: Any, name: str) -> str:
    """A flat record (metrics, a history line): names to numbers, strings, booleans or None."""
    if not isinstance(record, dict) or not all(type(k) is str and _is_scalar(v) for k, v in record.items()):
        return f"'{name}' must be a table of names to numbers or strings"
    return ""


def _config_problem(config: Any, features: FeatureParams) -> str:
    """The saved settings: [section] tables of scalars and string lists; the [audio] chunking rules in range."""
    if not isinstance(config, dict) or not all(type(k) is str and isinstance(v, dict) for k, v in config.items()):
        return "'config' must be a table of [section] tables"
    for section, values in config.items():
        for key, value in values.items():
            if type(key) is not str or not (_is_scalar(value) or type(value) is list
                                            and all(type(v) is str for v in value)):
                name = key[:60] if type(key) is str else shown(key)
                return f"config {section[:60]}.{name} is {shown(value)}, expected a number, a string or a list"
    return rules_problem(config.get("audio", {}), features)


def rules_problem(audio: dict[str, Any], features: FeatureParams) -> str:
    """What is wrong with the chunking rules in a saved [audio] section ('' when nothing is): the ranges config
    validation asks of a build (hop 0 or chunk_seconds / MAX_OVERLAP up to chunk_seconds, fractions, choices),
    and a chunk of at most MAX_CHUNK_SAMPLES."""
    chunk_seconds = features.chunk_seconds
    numbers = {key: audio.get(key, default) for key, default in
               (("hop_seconds", 0.0), ("min_fraction", 0.5), ("silence_peak", 0.0))}
    for key, value in numbers.items():
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            return f"config audio.{key} = {shown(value)}, expected a finite number >= 0"
    hop, shortest = numbers["hop_seconds"], chunk_seconds / MAX_OVERLAP
    if hop and not shortest <= hop <= chunk_seconds:
        return (f"config audio.hop_seconds = {hop!r}, expected 0 (no overlap) or chunk_seconds / {MAX_OVERLAP} = "
                f"{shortest:g} s up to the chunk length {chunk_seconds:g} s")
    for key in ("min_fraction", "silence_peak"):
        if numbers[key] > 1:
            return f"config audio.{key} = {numbers[key]!r}, expected a number in 0..1"
    clips = CHOICES["audio.short_clip"]
    short_clip, skip = audio.get("short_clip", "pad"), audio.get("skip_silent", True)
    if short_clip not in clips:
        return f"config audio.short_clip = {shown(short_clip)}, expected one of {', '.join(clips)}"
    if type(skip) is not bool:
        return f"config audio.skip_silent = {shown(skip)}, expected true or false"
    rules = ChunkRules.from_audio(audio, features.sample_rate, chunk_seconds)
    if rules.chunk > MAX_CHUNK_SAMPLES:
        return (f"a chunk of {rules.chunk} samples (features chunk_seconds x sample_rate); at most "
                f"{MAX_CHUNK_SAMPLES}")
    return ""


def _training_problem(state: dict[str, Any], epoch: int) -> str:
    """last.pt's training state (absent from best_model.pt): each record as `Run.checkpoint` writes it."""
    if "history" in state:
        history = state["history"]
        if not isinstance(history, list) or len(history) != epoch + 1:
            return f"'history' must list the {epoch + 1} epochs done (epoch = {epoch})"
        for number, record in enumerate(history, 1):
            problem = _record_problem(record, "history")
            if problem:
                return problem
            odd = [k for k in HISTORY_NUMBERS if type(record.get(k)) not in (int, float)]
            if odd or record["epoch"] != number:
                return f"history record {number} must hold {', '.join(HISTORY_NUMBERS)} as numbers, epoch = {number}"
    best, best_epoch = state.get("best_score", [0.0, 0.0]), state.get("best_epoch", -1)
    if not isinstance(best, (list, tuple)) or len(best) != 2 or not all(
            type(v) in (int, float) and not math.isnan(v) for v in best):
        return "'best_score' must be two numbers"
    if type(best_epoch) is not int or not -1 <= best_epoch <= epoch:
        return f"best_epoch = {shown(best_epoch)}, expected an integer in -1..{epoch}"
    if "rng" in state and (not isinstance(state["rng"], dict) or rng_problem(state["rng"].get("torch"))):
        return "'rng' must hold the torch generator's state"
    if "trained_weights" in state:
        kept = state["trained_weights"]
        if not isinstance(kept, dict) or type(kept.get("n_averaged")) is not int or not kept["n_averaged"] >= 0:
            return "'trained_weights' must hold the trained model and n_averaged, a count"
        problem = _tensors_problem(kept.get("model"), "trained_weights model")
        if problem:
            return problem
    for key in ("optimizer", "scheduler"):
        if key in state and not isinstance(state[key], dict):
            return f"'{key}' must be a torch state dict"
    if "position" in state:
        return position_problem(state["position"], epoch)
    return ""


def rng_problem(rng: Any, cuda: bool = False) -> str:
    """A generator state as torch.get_rng_state returns it ('' when it is). A CUDA one (a seed and an offset,
    16 bytes) is only bounded here: torch.cuda.set_rng_state checks its size where it is used."""
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1 or not (
            rng.numel() <= 64 if cuda else rng.numel() == torch.get_rng_state().numel()):
        return "a generator state is a 1-d uint8 tensor as torch.get_rng_state returns it"
    return ""


def position_problem(position: Any, epoch: int) -> str:
    """Where a mid-epoch last.pt stopped (train._position): the epoch after `epoch`, the steps done, the
    running sums (loss * n, correct, n, skipped blocks), the RNG states and the number of processes. The
    steps are checked against the shards' steps per epoch when the run resumes."""
    if not isinstance(position, dict) or set(position) != set(POSITION_KEYS):
        return f"'position' must hold {', '.join(POSITION_KEYS)}"
    step, sums, rng, world = (position[k] for k in ("step", "sums", "rng", "world_size"))
    if type(position["epoch"]) is not int or position["epoch"] != epoch + 1:
        return f"position epoch = {shown(position['epoch'])}, expected {epoch + 1} (the epoch after the saved one)"
    if type(step) is not int or not 0 <= step < MAX_INT:
        return f"position step = {shown(step)}, expected a count of steps"
    if (not isinstance(sums, (list, tuple)) or len(sums) != 4
            or not all(type(v) in (int, float) and math.isfinite(v) for v in sums)):
        return "position sums must be 4 finite numbers (loss * n, correct, n, skipped blocks)"
    if min(sums[1:]) < 0 or sums[1] > sums[2] or (step > 0) != (sums[2] > 0):
        return "position sums must count 0 <= correct <= n, with n > 0 once a step is done"
    if not isinstance(rng, dict) or not set(rng) <= {"torch", "cuda"} or rng_problem(rng.get("torch")) or (
            "cuda" in rng and rng_problem(rng["cuda"], cuda=True)):
        return "position rng must hold the torch (and cuda) generator states"
    if type(world) is not int or not 1 <= world <= MAX_WORLD_SIZE:
        return f"position world_size = {shown(world)}, expected a number of processes"
    return ""


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
        raise CheckpointError(f"{where} was trained on classes {_names(card.classes)}, but the shards at "
                              f"{manifest.root} have {_names(manifest.classes)}")
    if card.features != manifest.features:
        raise CheckpointError(f"{where} was trained on features {card.features.to_dict()}, but the shards at "
                              f"{manifest.root} have {manifest.features.to_dict()}")


def _names(names: list[str], most: int = 20) -> str:
    return "[" + ", ".join(shown(n) for n in names[:most]) + (f", ... {len(names)} in all" if len(names) > most
                                                               else "") + "]"


def resume_problem(training: dict[str, Any], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler) -> str:
    """What in last.pt's training state does not fit the optimizer and schedule a run restores it into
    ('' when it all does): torch's own `load_state_dict` checks little (a forged `lr` string, or an extra
    scheduler key that replaces one of its attributes, would fail in the middle of training)."""
    missing = [k for k in ("optimizer", "scheduler", "history", "best_score", "best_epoch", "rng") if k not in training]
    if missing:
        return f"has no {', '.join(missing)}"
    own, theirs = optimizer.state_dict(), training["optimizer"]
    if set(theirs) != {"state", "param_groups"} or not _same_kind(own["param_groups"], theirs["param_groups"]):
        return "optimizer state does not fit this run's optimizer (train.optimizer, model)"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = theirs["state"]
    if not isinstance(moments, dict) or not all(
            type(k) is int and 0 <= k < len(params) and isinstance(v, dict) and all(
                type(n) is str and (_is_scalar(t) or isinstance(t, torch.Tensor) and t.is_floating_point()
                                    and (t.dim() == 0 or t.shape == params[k].shape)) for n, t in v.items())
            for k, v in moments.items()):
        return "optimizer moments do not have the shapes of this run's parameters"
    if not _same_kind(scheduler.state_dict(), training["scheduler"]):
        return "scheduler state does not fit this run's schedule (train.schedule)"
    return ""


def _same_kind(own: Any, theirs: Any) -> bool:
    """`theirs` (read from a file) has the structure of `own` (what this process would save): the same types,
    lengths and tensor shapes, dict keys among own's, numbers finite."""
    if isinstance(own, dict):
        return isinstance(theirs, dict) and set(theirs) <= set(own) and all(_same_kind(own[k], v)
                                                                            for k, v in theirs.items())
    if isinstance(own, (list, tuple)):
        return isinstance(theirs, (list, tuple)) and len(theirs) == len(own) and all(map(_same_kind, own, theirs))
    if isinstance(own, torch.Tensor):
        return isinstance(theirs, torch.Tensor) and theirs.dtype == own.dtype and theirs.shape == own.shape
    if own is None or type(own) is bool:
        return theirs is None or type(theirs) is bool
    if type(own) in (int, float):
        return type(theirs) in (type(own), int) and math.isfinite(theirs)
    return type(theirs) is type(own)
