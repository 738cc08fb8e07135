"""Recipe: ESC-50 (50 environmental-sound classes, 5-s clips), folds 1-4 from ../shared/data/esc50_dev.

    .venv/bin/python recipes/esc50.py                                   # the default config, rotated over folds 1-4
    .venv/bin/python recipes/esc50.py --name ema5 --set train.ema_epochs=5          # a candidate, rotated
    .venv/bin/python recipes/esc50.py --screen --name ema5 --set train.ema_epochs=5 # the same, cheap screen
    .venv/bin/python recipes/esc50.py --folds 4                          # one fold only (a hint, not evidence)

The whole path with the default config, as a user runs it: a CSV manifest (`path,label,split`)
with ESC-50's official folds (clips of one source recording share a fold, so nothing leaks),
`build`, `train`, then the trained model scored on the held-out fold at the end of the schedule
(`train.select_metric = "last"`: nothing is picked on the fold that is reported). Fold 5 is not
shipped (the project is judged on it).

Rotation: each of folds 1-4 is held out once and the other three train, so every clip is scored
once by a model that never saw it, and a setting is judged by the mean over four folds and their
spread, not by one fold (a default picked on one fold fitted that fold: 0.83 there, 0.72 on fold 5).

Screening (`--screen`): width 32 and a quarter of the examples-seen budget, to rank candidates
cheaply (about 1/10 of a full run's CPU time); its rows go to `esc50_screen.csv`. A screen ranks,
the full rotation decides (docs/models.md says how well the two agreed).

Builds are made once per fold and build settings and reused by later candidates (a changed
[audio]/[features] setting gets its own folder). Results accumulate: a row is keyed by its
setting name, fold and level, so runs of other settings are kept and a re-run replaces its own.
Several runs of the recipe may go side by side (one process per fold where a GPU has room for four):
they take turns at a fold's build and at the results file, so none loses another's rows.

    for f in 1 2 3 4; do .venv/bin/python recipes/esc50.py --folds $f --name hop256 --set ... & done; wait
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import subprocess
import time
from pathlib import Path

from common import FIELDS, device_label
from variants import score_variants

from audioshard import build_shards, load_config, train_model
from audioshard.build import BuildError
from audioshard.localfile import taking_turns

ROOT = Path(__file__).resolve().parents[1]
FOLDS = (1, 2, 3, 4)
SCREEN = ["model.width=32", "train.samples_budget=90000"]  # ~1/10 of the CPU time of a full run
# the screen's "as trained" (last weights, training's BatchNorm statistics, one view, mean of logits): exactly
# what the default config gives at screen scale, scored from the --variants run of the screen's default
SCREEN_BASELINE = "screen+last/bn-trained/views1/logits"
# the full runs' baseline: the default config, and the same config again with train.seed=1 where it ran (a second
# run of the same code), averaged fold by fold so that one run's luck does not shift every difference on its fold
BASELINE = "default,seed1"
BUILD_SECTIONS = ("audio.", "features.", "split.", "shards.")
EXTRA_FIELDS = ["setting", "overrides", "code"]


def write_listing(data: Path, val_fold: int, path: Path) -> None:
    """A build CSV: every clip of folds 1-4, `val` for `val_fold`, `train` for the others."""
    with open(data / "meta.csv", newline="") as stream:
        clips = list(csv.DictReader(stream))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "split"])
        for clip in clips:
            split = "val" if int(clip["fold"]) == val_fold else "train"
            writer.writerow([str(data / "audio" / clip["filename"]), clip["category"], split])


def shards_for(data: Path, work: Path, val_fold: int, overrides: list[str]) -> Path:
    """The fold's build, made once per set of build settings (an up-to-date build is reused as it is)."""
    build_settings = sorted(o for o in overrides if o.startswith(BUILD_SECTIONS))
    tag = hashlib.sha256("\n".join(build_settings).encode()).hexdigest()[:8] if build_settings else "default"
    shards = work / f"shards-val{val_fold}-{tag}"
    listing = work / f"fold{val_fold}.csv"
    # the listing lives in the work folder and names the clips where they are: this CSV is ours
    cfg = load_config(overrides=["shards.csv_allow_outside=true", *build_settings])
    work.mkdir(parents=True, exist_ok=True)
    with taking_turns(work):  # a recipe started beside this one waits, then finds the build up to date
        write_listing(data, val_fold, listing)
        try:
            build_shards(listing, shards, cfg, progress=False)
        except BuildError:  # a build of the same settings by another audioshard version: made again
            build_shards(listing, shards, cfg, progress=False, force=True)
    return shards


def code_version() -> str:
    """The commit that produced a row (with `+` when the tree had uncommitted changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "audioshard") else "")


def run_fold(data: Path, work: Path, val_fold: int, name: str, overrides: list[str],
             variants: bool = False) -> list[dict]:
    """Train (or re-use a finished run of the same name: delete its folder to redo) and score the held-out
    fold; with `variants`, also every paired variant of the trained run (recipes/variants.py)."""
    shards = shards_for(data, work, val_fold, overrides)
    cfg = load_config(overrides=overrides)
    run = work / f"run-{name}-val{val_fold}"
    code = code_version()  # the code that trains, not what the tree holds when the run ends
    started = time.time()
    if (run / "metrics.json").exists():
        metrics = json.loads((run / "metrics.json").read_text())
        minutes = round(metrics["train_seconds"] / 60, 2)
    else:
        metrics = train_model(str(shards), run, cfg, progress=False)
        minutes = round((time.time() - started) / 60, 2)
    common = {"data": "esc50", "model": cfg.model.name, "split_seed": f"val=fold{val_fold}",
              "best_epoch": metrics["best_epoch"], "train_minutes": minutes,
              "device": device_label() + (" bf16" if metrics.get("bf16_autocast") else ""),
              "overrides": " ".join(overrides), "code": code}
    # "val" is the held-out fold: with select_metric = "last" nothing picks on it
    levels = (("clip", "recording"), ("chunk", "chunk"))
    rows = [_row(common, name, level, metrics["val"][key]) for key, level in levels]
    if variants:
        for variant, figures in score_variants(run, str(shards)).items():
            rows += [_row(common, f"{name}+{variant}", level, m) for level, m in figures.items()]
    return rows


def _row(common: dict, setting: str, level: str, m: dict) -> dict:
    return {**common, "setting": setting, "level": level, "accuracy": round(m["accuracy"], 4),
            "macro_f1": round(m["macro_f1"], 4), "balanced_accuracy": round(m["balanced_accuracy"], 4), "n": m["n"]}


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Old rows, with those of the same (setting, fold, level) as a new row replaced by it."""
    def key(row: dict) -> tuple:
        return setting_of(row), row["split_seed"], row["level"]
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, FIELDS + EXTRA_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def record(out: Path, new: list[dict], baseline: str) -> list[dict]:
    """Merge `new` into the results CSV and rewrite its Markdown; returns every row. Read, merge and write
    happen in one turn: recipes run side by side (one per fold or setting) would otherwise each write back
    what they read before the other's rows landed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with taking_turns(out.parent):
        rows = merge(read_rows(out), new)
        write_rows(out, rows)
        write_markdown(out, rows, baseline)
    return rows


def write_markdown(out: Path, rows: list[dict], baseline: str) -> None:
    """The results CSV's Markdown beside it: the summary per setting, then the paired table."""
    out.with_suffix(".md").write_text(summary(rows) + "\n" + paired(rows, baseline))


def setting_of(row: dict) -> str:
    return row.get("setting") or "default"  # rows written before settings were named are the default's


def summary(rows: list[dict]) -> str:
    """Per setting and level: mean and spread over the folds it ran on, and each fold's figure."""
    lines = ["| setting | level | folds | accuracy: mean ± sd | macro-F1: mean ± sd | per fold (accuracy) | "
             "minutes a fold | overrides |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((setting_of(r), r["level"]), []).append(r)
    for (setting, level), sel in sorted(groups.items(), key=lambda kv: (kv[0][1] != "recording", kv[0][0])):
        sel = sorted(sel, key=lambda r: r["split_seed"])
        acc, f1 = [float(r["accuracy"]) for r in sel], [float(r["macro_f1"]) for r in sel]
        folds = ", ".join(f"{r['split_seed'][-1]}: {float(r['accuracy']):.3f}" for r in sel)
        minutes = statistics.mean(float(r["train_minutes"]) for r in sel)
        lines.append(f"| {setting} | {level} | {len(sel)} | {_mean_sd(acc)} | {_mean_sd(f1)} | {folds} | "
                     f"{minutes:.1f} | {sel[-1].get('overrides') or '(defaults)'} |")
    return "\n".join(lines) + "\n"


def paired(rows: list[dict], baseline: str) -> str:
    """Each setting against `baseline`, fold by fold, at recording level: the mean of the per-fold differences in
    accuracy, their range, and in how many shared folds the setting is better. Paired differences cancel what
    makes one fold easier than another, so they separate settings better than two means with their spreads
    (the run-to-run spread of one fold is still about +-2.5 points: "better in 2 of 4" is noise).

    `baseline` may name several settings, comma-separated ("default,seed1": repeated runs of the same training
    code): a fold's baseline is then the mean of those that ran it, so one lucky or unlucky baseline run does
    not shift every difference on its fold."""
    acc: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["level"] == "recording":
            acc.setdefault(setting_of(r), {})[r["split_seed"]] = float(r["accuracy"])
    names = [b.strip() for b in baseline.split(",") if b.strip()]
    runs: dict[str, list[float]] = {}
    for name in names:
        for fold, value in acc.get(name, {}).items():
            runs.setdefault(fold, []).append(value)
    base = {fold: statistics.mean(values) for fold, values in runs.items()}
    against = f"`{names[0]}`" if len(names) == 1 else \
        "the mean of " + ", ".join(f"`{n}`" for n in names) + " (runs per fold: " + \
        ", ".join(f"{f[-1]}: {len(runs[f])}" for f in sorted(runs)) + ")"
    lines = [f"Against {against}, fold by fold (recording accuracy):", "",
             "| setting | shared folds | difference: mean [min, max] | better in |", "|---|---|---|---|"]
    for setting, folds in sorted(acc.items()):
        shared = sorted(set(folds) & set(base))
        if setting in names or not shared:
            continue
        diffs = [folds[f] - base[f] for f in shared]
        better = sum(d > 0 for d in diffs)
        lines.append(f"| {setting} | {', '.join(f[-1] for f in shared)} | {statistics.mean(diffs):+.3f} "
                     f"[{min(diffs):+.3f}, {max(diffs):+.3f}] | {better} of {len(diffs)} |")
    return "\n".join(lines) + "\n"


def _mean_sd(values: list[float]) -> str:
    """"mean ± sample sd", or the one value (a single fold has no spread: a hint, not evidence)."""
    if len(values) == 1:
        return f"{values[0]:.3f} (one fold)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "esc50_dev")
    parser.add_argument("--work", type=Path, default=Path("/tmp/audioshard-esc50"))
    parser.add_argument("--folds", type=int, nargs="+", default=list(FOLDS), choices=FOLDS,
                        help="held-out folds, one run each with the other three training (default: all four)")
    parser.add_argument("--name", default="default", help="the setting's name in the results (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting on top of the defaults (to try a change); repeatable: --set A=1 --set B=2")
    parser.add_argument("--screen", action="store_true",
                        help=f"cheap screening runs ({' '.join(SCREEN)}, before --set), rows in esc50_screen.csv")
    parser.add_argument("--variants", action="store_true",
                        help="also score paired variants of each trained run (recipes/variants.py): weights of the "
                             "last step or their average, BatchNorm statistics re-estimated, rolled views, pooling")
    parser.add_argument("--summary-only", action="store_true",
                        help="only rewrite the Markdown summary from the results CSV (no training)")
    parser.add_argument("--baseline", help="the setting the results' paired table compares every other with "
                        f"(default: {BASELINE}, or {SCREEN_BASELINE} with --screen); several, comma-separated "
                        "(e.g. default,seed1: repeated runs of the same code), are averaged fold by fold")
    parser.add_argument("--out", type=Path, help="results CSV (default recipes/results/esc50.csv, or "
                        "esc50_screen.csv with --screen); a Markdown summary is written beside it")
    args = parser.parse_args()
    overrides = [*SCREEN, *args.overrides] if args.screen else args.overrides
    out = args.out or ROOT / "recipes" / "results" / ("esc50_screen.csv" if args.screen else "esc50.csv")
    baseline = args.baseline or (SCREEN_BASELINE if args.screen else BASELINE)
    if args.summary_only:
        write_markdown(out, read_rows(out), baseline)
        return
    ours: list[dict] = []
    for fold in args.folds:
        ours += run_fold(args.data, args.work, fold, args.name, overrides, args.variants)
        rows = record(out, ours, baseline)  # each fold's rows as soon as they land
    print(summary([r for r in rows if setting_of(r).split("+")[0] == args.name]))


if __name__ == "__main__":
    main()
