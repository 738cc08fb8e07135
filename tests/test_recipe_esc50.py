"""The ESC-50 recipe's paired comparison: what docs/models.md's tables and the defaults are decided by."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from esc50 import paired  # noqa: E402 - the recipe's own function, importable once recipes/ is on the path


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
