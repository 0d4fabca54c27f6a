"""`phiforge run`'s progress off a terminal: plain timestamped lines, throttled, with the final state."""

from __future__ import annotations

import re
import time

import pytest

import phiforge.progress as P


@pytest.fixture
def lines_mode(monkeypatch):
    monkeypatch.delenv("PHIFORGE_PROGRESS", raising=False)
    monkeypatch.setattr(P, "LINE_INTERVAL", 0.2)
    monkeypatch.setattr(P, "_QUIET", False)  # an earlier in-process `phiforge --quiet ...` call may have set it
    P.set_lines(True)
    yield
    P.set_lines(False)


def test_bars_become_throttled_timestamped_lines_off_a_terminal(lines_mode, capsys, monkeypatch):
    clock = [1000.0]  # the throttle's clock, advanced by hand: the test never depends on the machine's speed
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    bar = P.progress(total=20, desc="train", unit="step")
    for i in range(20):
        clock[0] += 0.1  # a 0.1 s step
        bar.update(1)
        bar.set_postfix_str(f"loss {i}")  # a refresh every step, as training does
    bar.close()
    err = capsys.readouterr().err.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d train: ", line) for line in err), err
    # 2 s of steps at one line per 0.2 s: a line every other step (not 20 or more), plus the final state
    assert 9 <= len(err) <= 12, err
    assert "20/20" in err[-1] and "loss 19" in err[-1]


def test_without_lines_mode_nothing_is_printed_off_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("PHIFORGE_PROGRESS", raising=False)
    for _ in P.progress(range(5), desc="quiet"):
        pass
    assert capsys.readouterr().err == ""
