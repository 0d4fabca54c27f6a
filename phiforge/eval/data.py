"""Where benchmark data comes from: a local directory of the canonical release files, else the Hugging Face hub.

Local search order (first directory that holds the task's files wins):
  1. `--data-dir` (`data_dir=`),
  2. the environment variable PHIFORGE_BENCHMARKS,
  3. ./benchmarks and ../shared/data/benchmarks relative to the current directory,
  4. benchmarks/ and ../shared/data/benchmarks relative to the phiforge repository.
Then the hub through `datasets` (the dataset ids lm-evaluation-harness uses), only when online (not when
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, and never when `allow_hub=False`). When nothing is found the
error lists every place that was tried and how to provide the data.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from phiforge.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The local benchmark directories, in search order (existing or not)."""
    dirs: list[Path] = []
    if data_dir:
        dirs.append(Path(data_dir))
    if os.environ.get("PHIFORGE_BENCHMARKS"):
        dirs.append(Path(os.environ["PHIFORGE_BENCHMARKS"]))
    cwd = Path.cwd()
    dirs += [cwd / "benchmarks", cwd.parent / "shared" / "data" / "benchmarks",
             REPO_ROOT / "benchmarks", REPO_ROOT.parent / "shared" / "data" / "benchmarks"]
    seen: set[Path] = set()
    out = []
    for d in dirs:
        r = d.resolve() if d.exists() else d
        if r not in seen:
            seen.add(r)
            out.append(d)
    return out


def hub_allowed() -> bool:
    """Hub downloads only when not told to stay offline."""
    off = ("1", "true", "yes", "on")
    return not (os.environ.get("HF_HUB_OFFLINE", "").lower() in off
                or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in off)


def find_local(rel: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first `<dir>/<rel>` that exists in the search order, or None."""
    for d in search_dirs(data_dir):
        if (d / rel).exists():
            return d / rel
    return None


def missing_data(task: str, rel: str, hub: str | None, data_dir: str | os.PathLike | None) -> DataError:
    tried = "\n".join(f"  - {d / rel}" for d in search_dirs(data_dir))
    hub_line = (f"  - Hugging Face hub dataset {hub!r}: " + ("failed (see above)" if hub_allowed() else
                "skipped (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set)")) if hub else "  - (no hub source)"
    return DataError(
        f"no data for task {task!r}. Looked for:\n{tried}\n{hub_line}\n"
        f"To provide it: put the benchmark files under a directory laid out as <dir>/{rel} (the layout "
        f"of shared/data/benchmarks, canonical release formats) and pass --data-dir <dir> or set "
        f"PHIFORGE_BENCHMARKS=<dir>; or go online so `datasets` can fetch {hub or 'it'} from the hub.")


def load_docs(task: str, rel: str, read_local: Callable[[Path], list[dict]], *, hub: str | None = None,
              read_hub: Callable[[], list[dict]] | None = None, data_dir: str | os.PathLike | None = None,
              allow_hub: bool = True) -> tuple[list[dict], str]:
    """(documents, source description) from the local files, else the hub; a DataError listing the places."""
    local = find_local(rel, data_dir)
    if local is not None:
        return read_local(local), str(local)
    err = None
    if hub and read_hub and allow_hub and hub_allowed():
        try:
            return read_hub(), f"hf:{hub}"
        except Exception as e:  # noqa: BLE001 - any hub failure becomes the one missing-data message
            err = e
    e2 = missing_data(task, rel, hub, data_dir)
    if err is not None:
        e2.args = (f"{e2.args[0]}\n(hub error: {type(err).__name__}: {err})",)
    raise e2


def hf_dataset(path: str, name: str | None, split: str) -> list[dict]:
    import datasets

    return [dict(r) for r in datasets.load_dataset(path, name, split=split)]


# ---- readers for the canonical local formats ----------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def read_csv(path: Path) -> Iterator[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(io.StringIO(f.read()))


def require(doc: dict, fields: tuple[str, ...], where: str) -> dict:
    missing = [k for k in fields if k not in doc]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    return doc


def describe(docs: list[dict[str, Any]]) -> str:
    return f"{len(docs)} items"
