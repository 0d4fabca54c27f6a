"""Progress bars: tqdm with rate and ETA on a terminal, silent when not a TTY or when asked to be quiet.

A long job whose output goes to a log file (`phiforge run > log`) asks for `set_lines(True)`: off a terminal the
bars then become plain timestamped lines, at most one per bar every `LINE_INTERVAL` seconds, so a log shows the
run is alive and how far it got. A bar that does not move (one shard that takes minutes, a batch of generations
in one call) would still print nothing, so lines mode also runs a heartbeat: whenever no line was printed for
`LINE_INTERVAL` seconds it prints the newest open bar's state again (its elapsed time moves on), or, with no bar
open, the innermost `working(label)` block's label and elapsed time. Code that can be silent for long (loading a
model, a stage without a bar) runs inside `working(...)`.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

_QUIET = False
_LINES = False
LINE_INTERVAL = 10.0  # seconds between a bar's plain lines, and the most a log stays silent in lines mode

_lock = threading.RLock()
_last_line = 0.0  # time.monotonic() of the last plain line anyone printed
_bars: list[tuple[weakref.ref, _TimestampedLines]] = []  # open lines-mode bars and their files, oldest first
_working: list[tuple[str, float]] = []  # (label, start) of the open `working` blocks, outermost first
_beat_stop: threading.Event | None = None


def _now() -> float:
    import time

    return time.monotonic()


def _write_line(out: Any, text: str) -> None:
    import time

    global _last_line
    with _lock:
        out.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        out.flush()
        _last_line = _now()


class _TimestampedLines:
    """A file for tqdm that turns its carriage-return refreshes into `HH:MM:SS text` lines, at most one every
    LINE_INTERVAL seconds (a caller that refreshes every step, like training's postfix, would flood a log), plus
    the final state when the bar closes (tqdm ends a bar with a newline)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.last = 0.0
        self.pending = ""
        self.last_text = ""

    def _emit(self, text: str) -> None:
        _write_line(self.out, text)
        self.last = _now()
        self.pending = ""
        self.last_text = text

    def write(self, s: str) -> None:
        text = s.replace("\r", "").strip()
        if text:
            self.pending = text
            if _now() - self.last >= LINE_INTERVAL:
                self._emit(text)
        # the final state, unless the line just printed already said it
        if "\n" in s and self.pending and self.pending != self.last_text:
            self._emit(self.pending)

    def flush(self) -> None:
        self.out.flush()


def set_quiet(quiet: bool) -> None:
    """Silence every progress bar (the CLI's --quiet)."""
    global _QUIET
    _QUIET = quiet


def set_lines(on: bool, heartbeat: bool = True) -> None:
    """Off a terminal, print bars as timestamped lines (every LINE_INTERVAL s) instead of nothing, with the
    heartbeat thread (see the module docstring) unless `heartbeat` is false."""
    global _LINES, _beat_stop
    _LINES = on
    if _beat_stop is not None:
        _beat_stop.set()
        _beat_stop = None
    if on and heartbeat:
        _beat_stop = threading.Event()
        threading.Thread(target=_heartbeat, args=(_beat_stop,), name="phiforge-progress-heartbeat",
                         daemon=True).start()


def _heartbeat(stop: threading.Event) -> None:
    while not stop.wait(min(1.0, LINE_INTERVAL / 4)):
        beat()


def beat(now: float | None = None) -> bool:
    """One heartbeat: when lines mode is on and no line was printed for LINE_INTERVAL seconds, print the newest
    open bar's state, else the innermost `working` label; True when it printed. (The heartbeat thread calls
    this about once a second; tests call it with their own clock.)"""
    if not _LINES or _QUIET or enabled():
        return False
    now = _now() if now is None else now
    with _lock:
        if now - _last_line < LINE_INTERVAL:
            return False
        _bars[:] = [(r, f) for r, f in _bars if r() is not None and not r().disable]
        bar, lines = (_bars[-1][0](), _bars[-1][1]) if _bars else (None, None)
        label, start = _working[-1] if _working else (None, 0.0)
    if bar is not None:
        # outside our lock: tqdm's refresh takes tqdm's lock and then (writing) ours, as the bar's owner does
        lines.last = 0.0  # the bar's own throttle must not hold back the heartbeat's line
        bar.refresh()
        return True
    if label is not None:
        secs = int(now - start)
        _write_line(sys.stderr, f"{label}: working, {secs // 60}:{secs % 60:02d} elapsed")
        return True
    return False


@contextmanager
def working(label: str) -> Iterator[None]:
    """Mark a block that may print nothing for long (loading a model, a stage without bars): in lines mode the
    heartbeat names it, with its elapsed time, whenever the log has been silent for LINE_INTERVAL seconds."""
    with _lock:
        _working.append((label, _now()))
    try:
        yield
    finally:
        with _lock:
            _working.pop()


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
        lines = _TimestampedLines(sys.stderr)
        bar = tqdm(iterable, total=total, desc=desc, unit=unit, file=lines, ascii=True, ncols=100,
                   mininterval=LINE_INTERVAL, **kwargs)
        with _lock:
            _bars.append((weakref.ref(bar), lines))
        return bar
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), dynamic_ncols=True,
                file=sys.stderr, **kwargs)
