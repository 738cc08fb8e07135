"""Recipe: drone / car / speech (../shared/data/drone_car_speech), leak-free split, 3 split seeds.

    .venv/bin/python recipes/drone_car_speech.py [--work /tmp/dcs] [--seeds 0 1 2]

Builds the shards once per `split.seed` (grouped by recording, stratified by class), trains the
default model (`cnn6`) and the small plain CNN (`seed_cnn`) with the default config, evaluates
the best checkpoint on the test split, and writes `recipes/results/drone_car_speech.csv` (one row
per model, seed and level) and a Markdown summary beside it. Minutes per training: README, Results.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import dump_summary, run_recipe

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "drone_car_speech")
    parser.add_argument("--work", type=Path, default=Path("/tmp/audioshard-dcs"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["cnn6", "seed_cnn"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra training setting for every model (to try a change against the default); repeatable")
    parser.add_argument("--out", type=Path, default=ROOT / "recipes" / "results" / "drone_car_speech.csv",
                        help="results CSV (a Markdown summary is written beside it)")
    args = parser.parse_args()
    models = {name: [f"model.name={name}", *args.overrides] for name in args.models}
    out = args.out
    rows = run_recipe("drone_car_speech", args.data, args.work, models, [], args.seeds, out)
    dump_summary(rows, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
