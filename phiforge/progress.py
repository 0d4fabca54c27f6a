"""Progress bars: tqdm with rate and ETA on a terminal, silent when not a TTY or when asked to be quiet."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence every progress bar (the CLI's --quiet)."""
    global _QUIET
    _QUIET = quiet


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

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), dynamic_ncols=True,
                file=sys.stderr, **kwargs)
