"""Progress bars: tqdm with rate and ETA on a terminal, silent when not a TTY or when asked to be quiet.

A long job whose output goes to a log file (`phiforge run > log`) asks for `set_lines(True)`: off a terminal the
bars then become plain timestamped lines, at most one per bar every `LINE_INTERVAL` seconds, so a log shows the
run is alive and how far it got.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

_QUIET = False
_LINES = False
LINE_INTERVAL = 10.0  # seconds between a bar's plain lines


class _TimestampedLines:
    """A file for tqdm that turns its carriage-return refreshes into `HH:MM:SS text` lines, at most one every
    LINE_INTERVAL seconds (a caller that refreshes every step, like training's postfix, would flood a log), plus
    the final state when the bar closes (tqdm ends a bar with a newline)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.last = 0.0
        self.pending = ""

    def _emit(self, text: str) -> None:
        import time

        self.out.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.out.flush()
        self.last = time.monotonic()
        self.pending = ""

    def write(self, s: str) -> None:
        import time

        text = s.replace("\r", "").strip()
        if text:
            self.pending = text
            if time.monotonic() - self.last >= LINE_INTERVAL:
                self._emit(text)
        if "\n" in s and self.pending:
            self._emit(self.pending)

    def flush(self) -> None:
        self.out.flush()


def set_quiet(quiet: bool) -> None:
    """Silence every progress bar (the CLI's --quiet)."""
    global _QUIET
    _QUIET = quiet


def set_lines(on: bool) -> None:
    """Off a terminal, print bars as timestamped lines (every LINE_INTERVAL s) instead of nothing."""
    global _LINES
    _LINES = on


def enabled() -> bool:
    """Progress bars show only on an interactive stderr, unless PHIFORGE_PROGRESS=1 forces them."""
    if _QUIET:
        return False
    if os.environ.get("PHIFORGE_PROGRESS") == "1":
        return True
    return sys.stderr.isatty()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             **kwargs: Any):
    """A tqdm bar (disabled when `enabled()` is false); use as an iterator or call `.update(n)`."""
    from tqdm.auto import tqdm

    if _LINES and not _QUIET and not enabled():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=_TimestampedLines(sys.stderr), ascii=True,
                    ncols=100, mininterval=LINE_INTERVAL, **kwargs)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), dynamic_ncols=True,
                file=sys.stderr, **kwargs)
