"""Self-describing checkpoints, written atomically and read without unpickling.

A checkpoint holds the weights, the model's arguments, class names, feature parameters,
normalisation, the resolved config, the epoch and metrics: enough to predict with nothing else.
It is read with `torch.load(weights_only=True)`, which refuses pickled code (torch >= 2.6).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from audioshard.manifest import Manifest
from audioshard.models import build_model

CHECKPOINT_FORMAT = "audioshard-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is unreadable, unsafe, or does not match the shards it is used with."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
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
        if isinstance(exn, OSError):  # disk full, quota: say so, and that the previous file is still good
            raise CheckpointError(f"writing {path} failed ({exn.strerror or exn}); the previous {path.name} (if any) "
                                  "is intact. Free some space and continue with --resume") from exn
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:  # UnpicklingError for pickled code, RuntimeError for a truncated zip, ...
        raise CheckpointError(f"{path}: not a safe audioshard checkpoint ({type(exn).__name__}: "
                              f"{str(exn).splitlines()[0] if str(exn) else ''}); it may be corrupt, "
                              "or carry pickled code, which audioshard never loads") from exn
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an audioshard checkpoint")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> torch.nn.Module:
    model = build_model(state["model_args"])
    model.load_state_dict(state["model"])
    model.eval()
    return model


def check_compatible(state: dict[str, Any], manifest: Manifest, where: str) -> None:
    """Classes and features of the checkpoint must be those of the shards."""
    if list(state["classes"]) != manifest.classes:
        raise CheckpointError(f"{where} was trained on classes {state['classes']}, but the shards at "
                              f"{manifest.root} have {manifest.classes}")
    if state["features"] != manifest.features.to_dict():
        raise CheckpointError(f"{where} was trained on features {state['features']}, but the shards at "
                              f"{manifest.root} have {manifest.features.to_dict()}")
