"""Reading phiforge's input files: every malformed input becomes one clear error or one named skip.

Two kinds of input, two rules:

- a *document* (config.json, manifest.json, stats, a safetensors index, a token shard) is read whole or not at
  all: anything wrong with it is one PhiforgeError (the caller picks which: DataError, CheckpointError, ...)
  that names FILE[:LINE], what is wrong and what to do;
- a *record stream* (JSONL, JSONL.gz) is read line by line: a bad line (not UTF-8, not JSON, cut off) is a
  skip that names FILE:LINE and never costs the lines around it; `Skips` counts them, keeps the first ones for
  stats and stderr, and under `strict` makes the first one fatal.

YAML configs have their own reader (`phiforge.configio.load_yaml`, errors at FILE:LINE), safetensors files
theirs (`phiforge.checkpoint`), both in this spirit. Nothing heavy is imported here (numpy only inside
`open_tokens`).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiforge.errors import DataError, PhiforgeError


# ---- whole JSON documents --------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike, *, what: str, fix: str = "", error: type[PhiforgeError] = DataError,
              kind: type = dict) -> Any:
    """The JSON document at `path`, which must be a `kind` (dict or list). A missing, unreadable, non-UTF-8,
    invalid or mistyped file is an `error` naming FILE[:LINE] and `what` the file is; `fix` says what to do."""
    p = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise error(f"{p}: no such file (expected {what}){tail}") from None
    except OSError as e:
        raise error(f"{p}: cannot read {what} ({e.strerror or e}){tail}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"{p}:{line}: {what} is not UTF-8 text (byte {e.start}){tail}") from None
    if not text.strip():
        raise error(f"{p}: {what} is empty (truncated?){tail}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{p}:{e.lineno}: invalid JSON in {what}: {e.msg} (truncated or damaged?){tail}") from None
    except (ValueError, RecursionError) as e:  # an over-long integer, absurd nesting
        raise error(f"{p}: invalid JSON in {what} ({type(e).__name__}: {str(e)[:80]}){tail}") from None
    if not isinstance(data, kind):
        want = "a JSON object" if kind is dict else f"a JSON {kind.__name__}"
        raise error(f"{p}: {what} should be {want}, got {type(data).__name__}{tail}")
    return data


# ---- record streams --------------------------------------------------------------------------------------------
def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed value, None) per JSON line of a .jsonl (or .gz) file, (line, None, reason) per bad
    line. Lines are split on bytes and decoded one by one, so a line that is not UTF-8 is one bad line and the
    numbers stay those of the file. Blank lines are skipped. A gzip stream that ends early, and an unreadable
    file, are one last bad "line" saying the rest could not be read: the caller never mistakes a cut file for a
    whole one. Decoded text holding an unpaired surrogate escape ("\\ud800") is a bad line too (it cannot be
    written back as UTF-8)."""
    p = Path(path)
    gz = p.name.endswith(".gz")
    n = 0
    try:
        if gz and p.stat().st_size == 0:  # gzip reads an empty file as an empty stream: it is a cut one
            raise EOFError
        with (gzip.open if gz else open)(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                yield (n, *_parse_line(raw, first=n == 1))
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip, unreadable file
        why = "gzip stream cut off (truncated file)" if isinstance(e, EOFError) else f"{type(e).__name__}: {e}"
        yield n + 1, None, f"the rest of the file cannot be read ({why})"


def _parse_line(raw: bytes, first: bool = False) -> tuple[Any, str | None]:
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        return None, f"undecodable bytes (not UTF-8) at byte {e.start}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} (column {e.colno})"
    except (ValueError, RecursionError) as e:
        return None, f"invalid JSON: {type(e).__name__} (an over-long number, or nested too deeply)"
    if "\\ud" in line or "\\uD" in line:  # a surrogate escape (rare): only then pay for the check
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "an unpaired surrogate escape (\\udXXX): not valid Unicode text"
    return obj, None


@dataclass
class Skips:
    """Bad records of a stream run: counted, the first `keep` listed as "FILE:LINE: reason"; with `strict` the
    first one is a DataError instead."""

    strict: bool = False
    keep: int = 100
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason} (--strict stops at the first bad record; without it, bad "
                            f"records are skipped and listed)")
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {reason}")

    def report(self, print_line: Any) -> None:
        """Say every listed skip, then how many more there were (e.g. print_line=stderr printer)."""
        for line in self.examples:
            print_line(f"phiforge: skipped {line}")
        if self.count > len(self.examples):
            print_line(f"phiforge: ... and {self.count - len(self.examples)} more bad records")


# ---- fixed-size binary arrays (token shards, masks, offsets) ---------------------------------------------------
def open_tokens(path: str | os.PathLike, dtype: Any, expected: int | None, *, what: str = "token shard",
                fix: str = "re-run `phiforge tokenize`") -> Any:
    """A read-only memory map of `path` as `dtype` holding `expected` items (None: any whole number). A missing
    file, a byte count that is not a multiple of the item size (a cut write) or the wrong count is a DataError
    naming the file and `fix`."""
    import numpy as np

    p = Path(path)
    dt = np.dtype(dtype)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{p}: {what} listed in the manifest is missing; {fix}") from None
    if not p.is_file():
        raise DataError(f"{p}: {what} is not a file; {fix}")
    if size % dt.itemsize:
        raise DataError(f"{p}: {size} bytes is not a whole number of {dt.name} items (truncated {what}); {fix}")
    n = size // dt.itemsize
    if expected is not None and n != expected:
        raise DataError(f"{p}: {n} items, the manifest says {expected} (truncated or replaced {what}); {fix}")
    if n == 0:
        return np.zeros(0, dtype=dt)  # mmap cannot map an empty file
    return np.memmap(p, dtype=dt, mode="r")
