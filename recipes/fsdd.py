"""Recipe: Free Spoken Digit Dataset, speaker-independent (train on 4 speakers, validate on 1, test on 1).

    .venv/bin/python recipes/fsdd.py [--work /tmp/audioshard-fsdd] [--rotations 6]

Clips are ~0.4 s at 8 kHz, much shorter than the default 2-s chunk: `audio.chunk_seconds = 1.0`
with `audio.short_clip = "repeat"` (a padded clip would be mostly silence), `features.hop_length =
256`. The test speaker is always new, so the recipe also turns on the settings for data from new
recordists (off by default; README, Results): per-example gain normalisation in the model, a
frequency warp and time stretch, and background noise mixed into half of the training examples;
and batches of 32 (a small training set: twice the steps per epoch).
The split is given per file through a CSV `split` column, rotating which speaker
is held out for test (and the next one for val). Each trained model is scored on the test speaker
twice: as trained, and after `evaluate --adapt` (its BatchNorm statistics re-estimated on the test
speaker's clips, labels unused: what `predict --adapt` does with a folder of a new speaker's
recordings). Writes `recipes/results/fsdd.csv` and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

from common import write_rows

from audioshard.build import build_shards
from audioshard.config import load_config
from audioshard.evaluate import evaluate_checkpoint
from audioshard.train import train

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["audio.chunk_seconds=1.0", "audio.short_clip=repeat", "features.hop_length=256",
            # new speakers: other levels, voices, rates and noise floors than in training
            "model.input_norm=chunk", "augment.freq_warp=0.1", "augment.time_stretch=0.2",
            "augment.background_prob=0.5",
            # 2,000 training clips: 32-clip batches give 63 steps an epoch instead of 32
            "train.batch_size=32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd" / "recordings")
    parser.add_argument("--work", type=Path, default=Path("/tmp/audioshard-fsdd"))
    parser.add_argument("--rotations", type=int, default=6, help="how many speakers take a turn as the test set")
    parser.add_argument("--speakers", nargs="+", help="only these test speakers (default: the first --rotations)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra setting on top of the recipe's (to try a change)")
    parser.add_argument("--out", type=Path, default=ROOT / "recipes" / "results" / "fsdd.csv",
                        help="results CSV (a Markdown summary is written beside it)")
    args = parser.parse_args()
    settings = [*SETTINGS, *args.overrides]
    files = sorted(args.data.glob("*.wav"))
    speakers = sorted({f.stem.split("_")[1] for f in files})
    rows = []
    for turn in range(min(args.rotations, len(speakers))):
        test, val = speakers[turn], speakers[(turn + 1) % len(speakers)]
        if args.speakers and test not in args.speakers:
            continue
        listing = args.work / f"split-{test}.csv"
        listing.parent.mkdir(parents=True, exist_ok=True)
        with open(listing, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["path", "label", "group", "split"])
            for f in files:
                digit, speaker = f.stem.split("_")[:2]
                split = "test" if speaker == test else "val" if speaker == val else "train"
                writer.writerow([str(f), digit, speaker, split])
        shards = args.work / f"shards-{test}"
        build_shards(listing, shards, load_config(overrides=settings), force=True, progress=False)
        started = time.time()
        run = args.work / f"run-{test}"
        metrics = train(str(shards), run, load_config(overrides=settings), progress=False)
        rows.append({**result_row(test, val, metrics["test"]["clip"], adapted_test_metrics(run, shards)),
                     "best_epoch": metrics["best_epoch"], "train_minutes": round((time.time() - started) / 60, 2)})
        write_rows(args.out, rows)
        print(f"test speaker {test}: accuracy {rows[-1]['accuracy']:.3f} (adapted to the speaker "
              f"{rows[-1]['adapted_accuracy']:.3f}), macro-F1 {rows[-1]['macro_f1']:.3f}", flush=True)
    summary = markdown_summary(rows)
    args.out.with_suffix(".md").write_text(summary)
    print(summary)


def adapted_test_metrics(run: Path, shards: Path) -> dict:
    """The trained model on the test speaker after `evaluate --adapt`: its BatchNorm statistics
    re-estimated on that speaker's 500 clips, labels unused (unsupervised speaker adaptation)."""
    return evaluate_checkpoint(run / "best_model.pt", str(shards), "test", run / "test-adapted", adapt=True)["clip"]


def result_row(test: str, val: str, plain: dict, adapted: dict) -> dict:
    # one chunk per clip: recording level = chunk level
    return {"data": "fsdd", "model": "cnn6", "split_seed": f"test={test},val={val}", "level": "recording",
            "accuracy": round(plain["accuracy"], 4), "macro_f1": round(plain["macro_f1"], 4),
            "balanced_accuracy": round(plain["balanced_accuracy"], 4), "n": plain["n"],
            "adapted_accuracy": round(adapted["accuracy"], 4), "adapted_macro_f1": round(adapted["macro_f1"], 4)}


def markdown_summary(rows: list[dict]) -> str:
    lines = ["| test speaker | accuracy | macro-F1 | adapted to the speaker: accuracy | adapted: macro-F1 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['split_seed'].split(',')[0][5:]} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
              f"{r['adapted_accuracy']:.3f} | {r['adapted_macro_f1']:.3f} |" for r in rows]
    mean = {k: statistics.mean(float(r[k]) for r in rows)
            for k in ("accuracy", "macro_f1", "adapted_accuracy", "adapted_macro_f1")}
    lines.append(f"| **mean** | **{mean['accuracy']:.3f}** | **{mean['macro_f1']:.3f}** | "
                 f"**{mean['adapted_accuracy']:.3f}** | **{mean['adapted_macro_f1']:.3f}** |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
