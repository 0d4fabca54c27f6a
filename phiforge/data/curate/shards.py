"""Reading input shards (JSONL, JSONL.gz, Parquet) record by record; bad records become counted errors.

Every record carries its source as "file:line" (Parquet: row number from 1) so that stats, removed samples
and decontamination reports can point at it. Nothing in a malformed file crashes a run, and a bad line costs
only itself (JSONL lines are read by `phiforge.readers.iter_jsonl`, which decodes each line on its own).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phiforge.errors import DataError
from phiforge.readers import iter_jsonl


@dataclass
class Record:
    src: str  # "file:line"
    data: dict


@dataclass
class BadRecord:
    src: str
    error: str


def expand_inputs(patterns: str | list[str]) -> list[Path]:
    """Sorted, de-duplicated files matching one or more globs (directories expand to their data files)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: set[Path] = set()
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            for ext in ("*.jsonl", "*.jsonl.gz", "*.json", "*.parquet"):
                files.update(p.glob(ext))
        else:
            files.update(Path(x) for x in glob.glob(os.path.expanduser(pat), recursive=True) if Path(x).is_file())
    if not files:
        raise DataError(f"no input files match {' '.join(map(str, patterns))!r}")
    return sorted(files)


def shard_names(files: list[Path]) -> list[str]:
    """A unique, filesystem-safe name per input file (its stem; index-prefixed when stems collide)."""
    stems = [f.name.split(".")[0] for f in files]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i:05d}-{s}" for i, s in enumerate(stems)]


def read_records(path: str | os.PathLike, text_field: str = "text") -> Iterator[Record | BadRecord]:
    """Records of a JSONL(.gz) or Parquet file; a record without a string `text_field` is a BadRecord."""
    path = Path(path)
    if path.suffix == ".parquet":
        yield from _read_parquet(path, text_field)
        return
    for lineno, obj, reason in iter_jsonl(path):
        where = f"{path}:{lineno}"
        yield BadRecord(where, reason) if reason is not None else _check(obj, where, text_field)


def _check(obj, src: str, text_field: str) -> Record | BadRecord:
    if not isinstance(obj, dict):
        return BadRecord(src, f"not a JSON object ({type(obj).__name__})")
    if not isinstance(obj.get(text_field), str):
        return BadRecord(src, f"missing or non-string field {text_field!r}")
    return Record(src, obj)


def _read_parquet(path: Path, text_field: str) -> Iterator[Record | BadRecord]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                row += 1
                yield _check(obj, f"{path}:{row}", text_field)
    except Exception as e:  # noqa: BLE001 - any pyarrow failure is a bad file, never a crash
        yield BadRecord(f"{path}:0", f"unreadable Parquet file ({type(e).__name__}: {e})")
