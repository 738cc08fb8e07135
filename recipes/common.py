"""Shared by the recipes: build once per split seed, train each model, collect one results table."""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from pathlib import Path

from audioshard import build_shards, load_config, train_model

FIELDS = ["data", "model", "split_seed", "level", "accuracy", "macro_f1", "balanced_accuracy", "n", "best_epoch",
          "train_minutes", "device"]


def device_label() -> str:
    """What trained (train.device = "auto" picks a GPU when there is one): minutes mean little without it."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    # the cores this process may use (taskset pins runs), and the model: an AMX Xeon trains in bfloat16 at
    # twice the speed of a CPU without AMX, so "2 cores" alone does not say what the minutes mean
    cores, model = len(os.sched_getaffinity(0)), cpu_model()
    return f"cpu ({cores} core{'s' if cores > 1 else ''}{', ' + model if model else ''})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:  # not Linux
        return ""


def run_recipe(name: str, input_path: Path, work: Path, models: dict[str, list[str]], build_overrides: list[str],
               split_seeds: list[int], results_csv: Path) -> list[dict]:
    """For each split seed: build the shards, train every model on them, evaluate on test; write results_csv."""
    rows: list[dict] = []
    for seed in split_seeds:
        shards = work / f"shards-seed{seed}"
        build_shards(input_path, shards, load_config(overrides=[*build_overrides, f"split.seed={seed}"]),
                     force=True, progress=False)  # builds take seconds: always fresh
        for model, overrides in models.items():
            run_dir = work / f"run-{model}-seed{seed}"
            started = time.time()
            if (run_dir / "metrics.json").exists():  # finished earlier: re-use (delete the run folder to redo)
                metrics = json.loads((run_dir / "metrics.json").read_text())
                lines = (run_dir / "history.jsonl").read_text().splitlines()
                minutes = sum(json.loads(line)["seconds"] for line in lines) / 60
            else:
                metrics = train_model(str(shards), run_dir, load_config(overrides=overrides), progress=False)
                minutes = (time.time() - started) / 60
            for level in ("clip", "chunk"):
                m = metrics["test"][level]
                rows.append({"data": name, "model": model, "split_seed": seed,
                             "level": "recording" if level == "clip" else "chunk",
                             "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
                             "balanced_accuracy": round(m["balanced_accuracy"], 4), "n": m["n"],
                             "best_epoch": metrics["best_epoch"], "train_minutes": round(minutes, 2),
                             "device": device_label()})
            write_rows(results_csv, rows)
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """The rows as CSV: the common FIELDS, then any a recipe adds (in the order of the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = FIELDS + [k for k in (rows[0] if rows else {}) if k not in FIELDS]
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fields)
        writer.writeheader()
        writer.writerows(rows)


def summary(rows: list[dict]) -> str:
    """Mean over split seeds per model and level, as Markdown table rows."""
    lines = ["| model | level | accuracy (mean) | macro-F1 (mean) | per seed (acc / F1) |", "|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["level"]) for r in rows}, key=lambda k: (k[0], k[1] != "recording"))
    for model, level in keys:
        sel = [r for r in rows if r["model"] == model and r["level"] == level]
        per_seed = ", ".join(f"{_seed_label(r['split_seed'])}: {r['accuracy']:.3f} / {r['macro_f1']:.3f}" for r in sel)
        lines.append(f"| {model} | {level} | {statistics.mean(r['accuracy'] for r in sel):.3f} | "
                     f"{statistics.mean(r['macro_f1'] for r in sel):.3f} | {per_seed} |")
    return "\n".join(lines)


def _seed_label(seed) -> str:
    """`s0` for a split seed; a fixed split (e.g. `val=fold4`) as it is."""
    return f"s{seed}" if isinstance(seed, int) or str(seed).isdigit() else str(seed)


def dump_summary(rows: list[dict], path: Path) -> None:
    path.write_text(summary(rows) + "\n")
    print(summary(rows))
    print(json.dumps({"rows": len(rows)}))
