"""Shareable weights: a model as `model.safetensors` plus `model.safetensors.json`, with no pickle anywhere.

    audioshard export --checkpoint runs/first/best_model.pt --format safetensors --out model.safetensors
    audioshard predict --checkpoint model.safetensors recordings/

safetensors is the format people exchange weights in (Hugging Face's hub, timm, diffusers): a JSON
header and raw tensor bytes, which the `safetensors` library reads by offsets it checks against the
file, never by running code. The JSON file beside it holds what a checkpoint holds besides the
weights (model arguments, classes, features, normalisation, chunking rules), and `read_checkpoint`
reads the pair into the same `Checkpoint` record, through the same checks as a training checkpoint:
`predict`, `evaluate`, `export` and `model.init_checkpoint` take either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from audioshard.checkpoint import CHECKPOINT_FORMAT, Checkpoint, CheckpointError, check_schema, tree_problem

SUFFIX = ".safetensors"
MAX_CONFIG_BYTES = 16 << 20  # the JSON: class names and settings, a few KB for ordinary models


def config_path(weights: str | Path) -> Path:
    """`model.safetensors` -> `model.safetensors.json`."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".json")


def card_record(card: Checkpoint) -> dict[str, Any]:
    """What the JSON holds: every record of the checkpoint but the weights and the training state."""
    record = card.without_training().to_dict()
    record.pop("model")
    return {"format": CHECKPOINT_FORMAT, **record}


def save_safetensors(card: Checkpoint, out: str | Path) -> Path:
    """Write `out` (the weights) and its JSON; returns the JSON's path."""
    from safetensors.torch import save_file

    out = Path(out)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in card.weights.items()}
    save_file(weights, str(out), metadata={"format": CHECKPOINT_FORMAT})
    config_path(out).write_text(json.dumps(card_record(card), indent=1, default=float) + "\n", encoding="utf-8")
    return config_path(out)


def read_safetensors(path: str | Path) -> Checkpoint:
    """The pair as a `Checkpoint`, checked as `read_checkpoint` checks a training checkpoint (no torch.load)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, side = Path(path), config_path(path)
    if not path.is_file() or not side.is_file():
        missing = path if not path.is_file() else side
        raise CheckpointError(f"{missing}: no such file; a safetensors model is the pair {path.name} and "
                              f"{side.name} that `audioshard export --format safetensors` writes")
    record = _read_record(side)
    try:
        weights = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exn:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exn).__name__}: "
                              f"{str(exn)[:200]})") from exn
    state = {**record, "model": weights}
    problem = tree_problem(state, tensor_bytes=path.stat().st_size + (1 << 20))
    if problem:
        raise CheckpointError(f"{side}: not a usable model description: {problem}")
    check_schema(state, str(side))
    return Checkpoint.from_dict(state, str(path))


def _read_record(side: Path) -> dict[str, Any]:
    from audioshard.remote import DEFAULT_FETCHER, SourceError

    if side.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{side}: {side.stat().st_size:,} bytes, more than a model description holds "
                              f"({MAX_CONFIG_BYTES:,})")
    try:  # a regular file, read within the manifest's size and node budgets
        record = DEFAULT_FETCHER.read_json(str(side))
    except (SourceError, ValueError) as exn:
        raise CheckpointError(f"{side}: not a readable model description ({exn})") from exn
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{side}: not an audioshard model description (no \"format\": "
                              f"\"{CHECKPOINT_FORMAT}\")")
    if "model" in record:
        raise CheckpointError(f"{side}: holds a 'model' entry; the weights belong in the .safetensors file")
    return record
