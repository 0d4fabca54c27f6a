"""The performance table's rows: what each bench prints for bench/all.py beside its RESULT lines.

A bench prints one `held equal: ...` line per comparison (what both sides shared, in words a reader can check)
and one `ROW {json}` line per row of the table; bench/all.py runs every bench and collects those lines.
The benches run as scripts (`python bench/x.py`), so this module is imported from bench/ as `rows`.
"""

from __future__ import annotations

import json


def held_equal(what: str) -> str:
    """Print (and return) the line that says what the two sides of a comparison shared."""
    print(f"held equal: {what}", flush=True)
    return what


def row(workload: str, peer: str, peer_setting: str, ours: float | None, theirs: float | None, unit: str,
        goal: str, *, ratio: float | None = None, ratio_unit: str = "x", held: str = "", note: str = "") -> dict:
    """Print one table row as `ROW {json}` and return it. `ratio` defaults to ours / theirs (rates: higher is
    better); a figure that is not a rate (accuracy, a step count) passes its own ratio and ratio_unit."""
    if ratio is None and ours is not None and theirs:
        ratio = ours / theirs
    r = {"workload": workload, "peer": peer, "peer_setting": peer_setting, "ours": ours, "theirs": theirs,
         "unit": unit, "ratio": ratio, "ratio_unit": ratio_unit, "goal": goal, "held": held, "note": note}
    print("ROW " + json.dumps(r), flush=True)
    return r


_BW_BUFFER: list = []


def measure_bandwidth() -> float:
    """GB/s of x.sum() over 1 GiB of fp32 (allocated once, kept), best of 3, on the threads torch uses: the read
    bandwidth weight streaming can reach, measured beside a bench's runs (bench/serve.py, bench/laptop.py)."""
    import time

    import torch

    if not _BW_BUFFER:
        _BW_BUFFER.append(torch.ones(256 * 1024 * 1024))
    x = _BW_BUFFER[0]
    x.sum()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9
