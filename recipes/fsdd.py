"""Recipe: Free Spoken Digit Dataset, speaker-independent (train on 4 speakers, validate on 1, test on 1).

    .venv/bin/python recipes/fsdd.py [--work /tmp/audioshard-fsdd] [--rotations 6]

Clips are ~0.4 s at 8 kHz, much shorter than the default 2-s chunk: `audio.chunk_seconds = 1.0`
with `audio.short_clip = "repeat"` (a padded clip would be mostly silence), `features.hop_length =
256` (twice the frames for short sounds). These describe the data; training, augmentation and the
model are the defaults, the same as for every other data set.
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

from common import device_label, write_rows

from audioshard import build_shards, evaluate_checkpoint, load_config, train_model

ROOT = Path(__file__).resolve().parents[1]
# what describes this data (0.4-s clips): everything else is the default config
SETTINGS = ["audio.chunk_seconds=1.0", "audio.short_clip=repeat", "features.hop_length=256"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd" / "recordings")
    parser.add_argument("--work", type=Path, default=Path("/tmp/audioshard-fsdd"))
    parser.add_argument("--rotations", type=int, default=6, help="how many speakers take a turn as the test set")
    parser.add_argument("--speakers", nargs="+", help="only these test speakers (default: the first --rotations)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra setting on top of the recipe's (to try a change); repeatable")
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
        # the listing lives in the work folder and names the recordings where they are: our own CSV, so opt in
        build_shards(listing, shards, load_config(overrides=[*settings, "shards.csv_allow_outside=true"]), force=True,
                     progress=False)
        started = time.time()
        run = args.work / f"run-{test}"
        metrics = train_model(str(shards), run, load_config(overrides=settings), progress=False)
        rows.append({**result_row(test, val, metrics["test"]["clip"], adapted_test_metrics(run, shards)),
                     "best_epoch": metrics["best_epoch"], "train_minutes": round((time.time() - started) / 60, 2),
                     "device": device_label()})
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
