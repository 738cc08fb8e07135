"""The torch / torchaudio pair check: the installed pair passes, others are named with the fix, and the
command line refuses to run on an untested pair (the installed metadata is real; only the ranges move)."""

from pathlib import Path

import pytest

from audioshard.compat import TESTED, VersionError, check_versions, installed_versions, release, version_problems


def test_the_installed_pair_is_a_tested_one():
    assert version_problems(installed_versions()) == []
    check_versions()


@pytest.mark.parametrize(("version", "expected"), [("2.14.1+cu130", (2, 14)), ("2.11.0.dev20260101", (2, 11)),
                                                   ("2.6", (2, 6)), ("3.0.0rc1", (3, 0))])
def test_release_reads_major_and_minor(version, expected):
    assert release(version) == expected


def test_an_untested_or_missing_package_is_named():
    problems = version_problems({"torch": "2.5.1", "torchaudio": None})
    assert problems == ["torch 2.5.1 is outside the tested range >=2.6,<2.15", "torchaudio is not installed"]
    assert version_problems({"torch": "2.15.0", "torchaudio": "2.11.1"}) == [
        "torch 2.15.0 is outside the tested range >=2.6,<2.15"]


def test_the_ranges_are_the_ones_pyproject_states():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    for name, (low, high) in TESTED.items():
        assert f'"{name}>={low[0]}.{low[1]},<{high[0]}.{high[1]}"' in pyproject


def test_an_untested_pair_stops_a_command_with_the_fix(monkeypatch):
    monkeypatch.setitem(TESTED, "torch", ((2, 0), (2, 1)))  # the installed torch is now "untested"
    with pytest.raises(VersionError, match="pip install 'torch"):
        check_versions()
    monkeypatch.setenv("AUDIOSHARD_ALLOW_UNTESTED", "1")
    check_versions()


def test_the_command_line_refuses_an_untested_pair_before_any_work(monkeypatch, real_build, capsys):
    from audioshard.cli import main

    assert main(["info", str(real_build)]) == 0
    monkeypatch.setitem(TESTED, "torchaudio", ((9, 0), (9, 1)))
    assert main(["info", str(real_build)]) == 2
    err = capsys.readouterr().err
    assert "torchaudio" in err and "outside the tested range" in err and "pip install" in err
