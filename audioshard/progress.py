"""Progress for long work: a live bar on a terminal, a few plain lines elsewhere.

When stderr is not a terminal (a log file, CI, a job array), a redrawn bar would leave thousands of
carriage-return updates in the log. There the same calls print one line at every `every` of the
work (a tenth by default) and at the end; and nothing at all for work that is itself one step of a
longer job (`lines=False`, e.g. one epoch: the epoch's own summary line is the record).
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def progress(total: int, desc: str, unit: str, enabled: bool = True, lines: bool = True, leave: bool = True):
    """A tqdm bar when stderr is a terminal, else `LineProgress` (or a silent one when `lines` is False)."""
    if enabled and sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return LineProgress(total, desc, unit, enabled=enabled and lines)


class LineProgress:
    """The part of tqdm's interface audioshard uses, printing whole lines: "build: 64/637 files (10%) ..."."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, every: float = 0.1):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.step = max(1, int(total * every))
        self.n, self.postfix, self.started = 0, "", time.monotonic()
        self._next, self._closed = self.step, False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next and self.n < self.total:
            self._print()
            self._next = (self.n // self.step + 1) * self.step

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if self.n and not self._closed:
            self._print()
        self._closed = True

    def _print(self) -> None:
        if not self.enabled:
            return
        share = f" ({100 * self.n // max(1, self.total)}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s{share}{extra}, {time.monotonic() - self.started:.0f} s",
              file=sys.stderr, flush=True)
