"""The torch and torchaudio releases audioshard is tested with, checked before a command uses them.

torchaudio is in maintenance mode and older releases ship a compiled extension built against one torch
release: a pair nobody tested can fail deep inside a run (an undefined symbol at import, or a changed
function). The ranges here are the ones pyproject.toml states; a command on another pair stops with
what is installed and the pip line that fixes it, unless AUDIOSHARD_ALLOW_UNTESTED=1 says to go on.
Reads package metadata only: no torch import, so it costs the command line nothing.
"""

from __future__ import annotations

import os

from audioshard.errors import AudioshardError

# [lowest, first untested) per package, as in pyproject.toml's dependencies
TESTED = {"torch": ((2, 6), (2, 15)), "torchaudio": ((2, 4), (2, 12))}
FIX = "pip install 'torch>=2.6,<2.15' 'torchaudio>=2.4,<2.12'"


class VersionError(AudioshardError, RuntimeError):
    """torch or torchaudio is missing or outside the tested range."""


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '2.14.1+cu130' or '2.11.0.dev20260101'."""
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0) if len(parts) > 1 else 0


def version_problems(installed: dict[str, str | None]) -> list[str]:
    """What is wrong with `installed` ({package: version or None}), one line each; [] when all is tested."""
    problems = []
    for name, (low, high) in TESTED.items():
        version = installed.get(name)
        if version is None:
            problems.append(f"{name} is not installed")
        elif not low <= release(version) < high:
            problems.append(f"{name} {version} is outside the tested range "
                            f">={low[0]}.{low[1]},<{high[0]}.{high[1]}")
    return problems


def installed_versions() -> dict[str, str | None]:
    from importlib import metadata  # 17 ms to import: only when a command runs, not for --help

    found: dict[str, str | None] = {}
    for name in TESTED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_versions() -> None:
    """Raise VersionError naming each problem and the fix (AUDIOSHARD_ALLOW_UNTESTED=1: go on anyway)."""
    if os.environ.get("AUDIOSHARD_ALLOW_UNTESTED") == "1":
        return
    problems = version_problems(installed_versions())
    if problems:
        raise VersionError("; ".join(problems) + f". Install a tested pair: {FIX} (or set "
                           "AUDIOSHARD_ALLOW_UNTESTED=1 to try this one at your own risk)")
