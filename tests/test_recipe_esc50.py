"""The ESC-50 recipe: its paired comparison (what docs/models.md's tables and the defaults are decided by), and
runs of it side by side."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import SHARED_DATA

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))
from esc50 import paired, read_rows  # noqa: E402 - the recipe's own functions, importable once recipes/ is on the path


def _rows(setting: str, accuracies: dict[int, float], level: str = "recording") -> list[dict]:
    return [{"setting": setting, "split_seed": f"val=fold{fold}", "level": level, "accuracy": str(acc)}
            for fold, acc in accuracies.items()]


def test_paired_differences_use_only_the_folds_both_settings_ran_on():
    rows = (_rows("default", {1: 0.75, 2: 0.78, 3: 0.77, 4: 0.81})
            + _rows("budget2x", {1: 0.80, 2: 0.77})            # two folds so far
            + _rows("budget2x", {1: 0.10, 2: 0.10}, "chunk")   # chunk level is not what the table compares
            + _rows("other", {}))
    table = paired(rows, "default")
    line = next(row for row in table.splitlines() if row.startswith("| budget2x"))
    # fold 1: +0.05, fold 2: -0.01 -> mean +0.02, better in 1 of 2; folds 3 and 4 of the default left out
    assert line == "| budget2x | 1, 2 | +0.020 [-0.010, +0.050] | 1 of 2 |"
    assert "| default |" not in table and "other" not in table


def test_a_setting_sharing_no_fold_with_the_baseline_is_not_compared():
    table = paired(_rows("default", {4: 0.8}) + _rows("new", {1: 0.9}), "default")
    assert "| new |" not in table


def test_a_baseline_of_several_runs_is_their_mean_on_each_fold():
    rows = (_rows("default", {1: 0.74, 2: 0.78, 3: 0.77})
            + _rows("seed1", {1: 0.76, 2: 0.76})               # a second run of the same code, on folds 1-2 only
            + _rows("new", {1: 0.77, 2: 0.78, 3: 0.76}))
    table = paired(rows, "default,seed1")
    # baseline per fold: 1: 0.75, 2: 0.77 (two runs each), 3: 0.77 (one) -> +0.02, +0.01, -0.01
    assert "| new | 1, 2, 3 | +0.007 [-0.010, +0.020] | 2 of 3 |" in table.splitlines()
    assert "runs per fold: 1: 2, 2: 2, 3: 1" in table
    assert "| seed1 |" not in table and "| default |" not in table


START_TOGETHER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import esc50  # torch and audioshard loaded: the slow part of a start, which would otherwise stagger the processes
Path(f"ready-{sys.argv[1]}").touch()
while not Path("go").exists():
    time.sleep(0.01)
"""


def _side_by_side(code: str, count: int, cwd: Path) -> list[subprocess.CompletedProcess]:
    """`count` Python processes running `code` (recipes/ importable) from the same moment on."""
    procs = [subprocess.Popen([sys.executable, "-c", START_TOGETHER + code, str(i), str(RECIPES)], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(count)]
    deadline = time.monotonic() + 120
    while not all((cwd / f"ready-{i}").exists() for i in range(count)) and time.monotonic() < deadline:
        time.sleep(0.05)
    (cwd / "go").touch()
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def test_recipes_run_side_by_side_keep_every_row(tmp_path):
    # four processes record 25 rows each, one at a time, into one results file: a read-merge-write that is
    # not taken in turns writes back what it read before another's row landed, and rows go missing
    code = """
from esc50 import record
me = sys.argv[1]
for fold in range(25):
    row = {"setting": f"p{me}", "split_seed": f"val=fold{fold}", "level": "recording", "accuracy": 0.5,
           "macro_f1": 0.5, "train_minutes": 1, "overrides": ""}
    record(Path("results/esc50.csv"), [row], "p0")
"""
    done = _side_by_side(code, 4, tmp_path)
    assert all(p.returncode == 0 for p in done), [p.stderr[-2000:] for p in done]
    rows = read_rows(tmp_path / "results" / "esc50.csv")
    assert sorted((r["setting"], r["split_seed"]) for r in rows) == sorted(
        (f"p{me}", f"val=fold{fold}") for me in range(4) for fold in range(25))
    assert "| p3 | recording | 25 |" in (tmp_path / "results" / "esc50.md").read_text()


def test_recipes_run_side_by_side_share_one_build(tmp_path):
    # two recipes holding out the same fold start at once: one builds, the other waits and reuses the build
    # (unguarded, the second meets the first's lock on the shard folder and fails)
    with open(SHARED_DATA / "esc50_dev" / "meta.csv", newline="") as stream:
        clips = list(csv.DictReader(stream))
    labels = ("dog", "rooster", "rain", "siren")
    few = [c for fold in ("1", "2") for label in labels
           for c in [c for c in clips if (c["fold"], c["category"]) == (fold, label)][:4]]
    data = tmp_path / "esc50"
    data.mkdir()
    (data / "audio").symlink_to(SHARED_DATA / "esc50_dev" / "audio")
    with open(data / "meta.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, list(few[0]))
        writer.writeheader()
        writer.writerows(few)
    code = f"""
from esc50 import shards_for
print(shards_for(Path({str(data)!r}), Path("work"), 1, []))
"""
    done = _side_by_side(code, 2, tmp_path)
    assert all(p.returncode == 0 for p in done), [p.stderr[-2000:] for p in done]
    assert {p.stdout.strip() for p in done} == {"work/shards-val1-default"}
    manifest = json.loads((tmp_path / "work" / "shards-val1-default" / "manifest.json").read_text())
    assert manifest["classes"] == sorted(labels)
