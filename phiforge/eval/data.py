"""Where benchmark data comes from: the Hugging Face hub splits lm-evaluation-harness loads, or a local copy.

Every task names its data as hub splits (`HubSplit`: dataset id, config, split — the ones lm-eval's builtin task
loads). For each split the first of these that exists wins, directory by directory in `search_dirs` order
(`--data-dir`, $PHIFORGE_BENCHMARKS, ./benchmarks, then a developer checkout's shared benchmark folder):

  1. <dir>/<dataset id>/<config>/<split>.jsonl   what `phiforge data pull` writes: one hub row per line
                                                 (config "default" when the dataset has none), checked
                                                 against <dir>/manifest.json's sha256 when listed there;
  2. <dir>/<dataset id>/                         a clone of the hub repository (README.md configs + data
                                                 files), read with `datasets` as the hub itself is;
  3. <dir>/<release file>                        the task's original release files (see docs/eval.md);

then the hub itself through `datasets.load_dataset(id, config, split=split)`, unless told to stay offline
(`--offline`, HF_HUB_OFFLINE, HF_DATASETS_OFFLINE). Nothing found is one DataError line that says why (offline,
unreachable, `datasets` missing) and the one command that fixes it (`phiforge data pull TASKS --out DIR`).

Every load reports its source: kind (pulled, hub-repo, hub, release, package), where, rows and a sha256. For
hub rows the hash is over their canonical JSON lines (`canonical_line`), which is exactly what `data pull`
writes, so a pulled copy and the hub give the same hash for the same data.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiforge.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class HubSplit:
    """One split of a Hugging Face dataset: lm-eval's `dataset_path`, `dataset_name` and split."""

    path: str  # dataset id, e.g. "allenai/ai2_arc"
    name: str | None  # config, e.g. "ARC-Easy"; None = the dataset's default config
    split: str

    @property
    def config(self) -> str:
        return self.name or "default"

    @property
    def rel(self) -> str:
        """Where `phiforge data pull` puts this split under a data directory."""
        return f"{self.path}/{self.config}/{self.split}.jsonl"

    def __str__(self) -> str:
        return f"{self.path} ({self.config}, {self.split})"


class HubUnavailable(Exception):
    """Why the hub was not (or could not be) read: the real cause, for the missing-data message."""


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


def offline_reason(allow_hub: bool = True) -> str | None:
    """Why the hub must not be used (the flag or variable that says so), or None when it may be."""
    if not allow_hub:
        return "--offline was given"
    off = ("1", "true", "yes", "on")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in off:
            return f"{var}={os.environ[var]} is set"
    return None


def find_local(rel: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first `<dir>/<rel>` that exists in the search order, or None."""
    for d in search_dirs(data_dir):
        if (d / rel).exists():
            return d / rel
    return None


# ---- hub rows ---------------------------------------------------------------------------------------------------
def hub_location(dataset_id: str) -> str:
    """What `datasets.load_dataset` is given for a hub dataset: its id. (The tests point this at local
    repositories they build in the hub's layout, so they run the code users run online.)"""
    return dataset_id


def hf_rows(location: str, name: str | None, split: str) -> list[dict]:
    """The rows of one split through `datasets` (a hub id or a local repository in the hub's layout)."""
    try:
        import datasets
    except ImportError as e:
        raise HubUnavailable(f"the `datasets` package is not installed ({type(e).__name__}: {e}); "
                             f"pip install datasets") from None
    ds = datasets.load_dataset(location, name, split=split)
    return [dict(r) for r in ds]


def read_hub(split: HubSplit, allow_hub: bool = True) -> list[dict]:
    """The split's rows from the hub; HubUnavailable says why not (offline, `datasets` missing, unreachable)."""
    why = offline_reason(allow_hub)
    if why:
        raise HubUnavailable(f"not fetched: {why}")
    try:
        return hf_rows(hub_location(split.path), split.name, split.split)
    except HubUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - a network/hub failure is reported as its real cause, in one line
        msg = " ".join(str(e).split())
        raise HubUnavailable(f"could not be fetched ({type(e).__name__}: {msg[:300]})") from None


def canonical_line(row: dict) -> str:
    """A hub row as one JSON line: what `data pull` writes and what the data hash covers."""
    return json.dumps(row, ensure_ascii=False, sort_keys=True, default=str) + "\n"


def rows_sha256(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(canonical_line(r).encode("utf-8"))
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    p = root / MANIFEST
    if not p.exists():
        return {"format": 1, "files": {}, "tasks": {}}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{p}: not valid JSON ({e}); delete it and run `phiforge data pull` again") from None


def _pulled_rows(root: Path, split: HubSplit) -> tuple[list[dict], str]:
    """The rows of a pulled split and its sha256, checked against the data directory's manifest."""
    path = root / split.rel
    sha = file_sha256(path)
    want = read_manifest(root).get("files", {}).get(split.rel, {}).get("sha256")
    if want and want != sha:
        raise DataError(f"{path}: changed since `phiforge data pull` wrote it (sha256 {sha[:12]}..., manifest "
                        f"says {want[:12]}...); pull it again: phiforge data pull --out {root}")
    return read_jsonl(path), sha


# ---- one split, from wherever it is ----------------------------------------------------------------------------
@dataclass
class Source:
    """Where a split's documents came from: kind, place, row count and sha256 (see the module docstring)."""

    kind: str  # pulled | hub-repo | hub | release | package
    where: str
    rows: int
    sha256: str
    split: HubSplit | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "where": self.where, "rows": self.rows, "sha256": self.sha256}
        if self.split is not None:
            d.update(dataset=self.split.path, config=self.split.config, split=self.split.split)
        return d


class MissingData(DataError):
    """A task's data is nowhere: `task`, what was looked for, and why the hub gave nothing (`cause`)."""

    def __init__(self, task: str, looked_for: list[str], dirs: list[Path], cause: str) -> None:
        self.task, self.looked_for, self.dirs, self.cause = task, looked_for, dirs, cause
        super().__init__(missing_message([self]))

    @classmethod
    def merged(cls, missing: list[MissingData]) -> MissingData:
        """One error for the splits of one task that are all missing (MMLU's subjects, BBH's tasks)."""
        m = missing[0]
        return cls(m.task, [x for e in missing for x in e.looked_for], m.dirs, m.cause)


def missing_message(missing: list[MissingData]) -> str:
    """One line for one or more tasks without data: what was looked for, the real cause, the command that fixes
    it."""
    tasks = ",".join(dict.fromkeys(m.task for m in missing))
    m = missing[0]
    places = ", ".join(str(d) for d in m.dirs if d.exists())
    where = f"no local copy in {places}" if places else "no local copy (no --data-dir, $PHIFORGE_BENCHMARKS or " \
                                                        "./benchmarks)"
    n_more = sum(len(x.looked_for) for x in missing) - 1
    more = f" (and {n_more} more)" if n_more else ""
    if "not installed" in m.cause:
        fix = "pip install datasets"
    elif any(w in m.cause.lower() for w in ("gated", "401", "authenticat")):
        fix = (f"accept the dataset's terms on huggingface.co and log in (`hf auth login`), then run phiforge "
               f"data pull {tasks} --out DIR and add --data-dir DIR")
    else:
        fix = f"phiforge data pull {tasks} --out DIR (where there is internet), then add --data-dir DIR"
    return f"no data for {tasks}: {where}, and the hub split {m.looked_for[0]}{more} {m.cause}. To fix: {fix}"


def load_split(task: str, split: HubSplit, data_dir: str | os.PathLike | None = None, *, allow_hub: bool = True,
               release: str | None = None, read_release: Callable[[Path], list[dict]] | None = None
               ) -> tuple[list[dict], Source, bool]:
    """(records, source, are_hub_rows) of one split: hub rows from a pulled copy, a local hub repository or the
    hub, or documents from the task's release file `release` (read by `read_release`). MissingData when none."""
    dirs = search_dirs(data_dir)
    for d in dirs:
        if (d / split.rel).is_file():
            rows, sha = _pulled_rows(d, split)
            return rows, Source("pulled", str(d / split.rel), len(rows), sha, split), True
        repo = d / split.path
        # A pulled directory (it has a manifest) holds only what was pulled: a split it lacks is not there.
        if repo.is_dir() and not (d / MANIFEST).exists() and _is_hub_repo(repo):
            try:
                rows = hf_rows(str(repo), split.name, split.split)
            except HubUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - a broken local copy is the user's to fix: say which and why
                raise DataError(f"{repo}: cannot read {split} from this local hub repository ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]})") from None
            return rows, Source("hub-repo", str(repo), len(rows), rows_sha256(rows), split), True
        if release and read_release and (d / release).exists():
            p = d / release
            docs = read_release(p)
            return docs, Source("release", str(p), len(docs), _path_sha256(p)), False
    try:
        rows = read_hub(split, allow_hub)
    except HubUnavailable as e:
        raise MissingData(task, [str(split)], dirs, str(e)) from None
    return rows, Source("hub", f"hf:{split.path}", len(rows), rows_sha256(rows), split), True


def load_docs(task: str, split: HubSplit, from_hub: Callable[[dict], dict], data_dir: str | os.PathLike | None = None,
              *, allow_hub: bool = True, release: str | None = None,
              read_release: Callable[[Path], list[dict]] | None = None) -> tuple[list[dict], Source]:
    """A task's documents from one split: hub rows turned into documents by `from_hub`, or the release file's
    documents as `read_release` makes them (see `load_split`)."""
    records, src, hub_rows = load_split(task, split, data_dir, allow_hub=allow_hub, release=release,
                                        read_release=read_release)
    if not hub_rows:
        return records, src
    docs = []
    for i, r in enumerate(records):
        try:
            docs.append(from_hub(r))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise DataError(f"{src.where}: row {i + 1} is not a {split} row ({type(e).__name__}: {e})") from None
    return docs, src


def _is_hub_repo(path: Path) -> bool:
    """A directory that looks like a dataset repository: a README (configs) or data files in it."""
    return (path / "README.md").exists() or any(
        p.suffix in (".parquet", ".jsonl", ".json", ".csv", ".arrow") for p in path.rglob("*") if p.is_file())


def _path_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's files (sorted relative paths and their hashes)."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def combined_sha256(sources: list[Source]) -> str:
    """One hash over several splits' hashes (a task that reads many files: MMLU's subjects, BBH's tasks); it
    names each split by what it is (dataset/config/split, or the release file's name), not by where it lies."""
    if len(sources) == 1:
        return sources[0].sha256
    h = hashlib.sha256()
    for s in sources:
        name = s.split.rel if s.split is not None else Path(s.where).name
        h.update(f"{name}\0{s.sha256}\n".encode())
    return h.hexdigest()


# ---- writing a pulled copy -------------------------------------------------------------------------------------
def write_split(root: Path, split: HubSplit, rows: list[dict]) -> dict[str, Any]:
    """Write one split as canonical JSON lines under `root` (atomically); its manifest entry."""
    from phiforge.atomic import atomic_open

    path = root / split.rel
    h = hashlib.sha256()
    n = 0
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            line = canonical_line(r)
            f.write(line)
            h.update(line.encode("utf-8"))
            n += 1
    return {"dataset": split.path, "config": split.config, "split": split.split, "rows": n,
            "sha256": h.hexdigest(), "bytes": path.stat().st_size}


def write_repo_readme(root: Path, dataset_id: str, files: dict[str, dict[str, Any]]) -> None:
    """README.md with the `configs:` metadata that lets `datasets.load_dataset(<root>/<id>, config)` read the
    pulled splits of one dataset (the hub's own layout)."""
    from phiforge.atomic import atomic_write_text

    configs: dict[str, list[tuple[str, str]]] = {}
    for _, f in sorted(files.items()):
        if f["dataset"] == dataset_id:
            configs.setdefault(f["config"], []).append((f["split"], f"{f['config']}/{f['split']}.jsonl"))
    lines = ["---", "configs:"]
    for c, splits in configs.items():
        lines += [f"- config_name: {json.dumps(c)}", "  data_files:"]
        lines += [f"  - split: {json.dumps(s)}\n    path: {json.dumps(p)}" for s, p in splits]
    lines += ["---", f"# {dataset_id}", "", "Splits pulled from the Hugging Face hub by `phiforge data pull`; "
              "one hub row per line. Hashes: ../manifest.json (at the data directory's root).", ""]
    atomic_write_text(root / dataset_id / "README.md", "\n".join(lines))


def pull_splits(splits: dict[str, list[HubSplit]], out: str | os.PathLike, *, force: bool = False,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fetch `splits` ({task: its hub splits}) from the hub into `out` in the pulled layout (module docstring):
    one canonical JSON-lines file per split, a README.md per dataset (so `datasets` reads it as a hub repository)
    and manifest.json with every file's rows and sha256. Splits already there with the manifest's hash are kept
    (unless `force`); the manifest is rewritten after each split, so an interrupted pull resumes."""
    from phiforge.atomic import atomic_write_json

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root)
    manifest.setdefault("files", {})
    manifest.setdefault("tasks", {})
    why = offline_reason()
    for task, task_splits in splits.items():
        for split in task_splits:
            entry = manifest["files"].get(split.rel)
            path = root / split.rel
            if not force and entry and path.is_file() and file_sha256(path) == entry.get("sha256"):
                log(f"{split}: up to date ({entry['rows']} rows)")
                continue
            if why:
                raise DataError(f"data pull needs the hub, but {why}: run it where there is internet (and unset it)")
            try:
                rows = read_hub(split)
            except HubUnavailable as e:
                raise DataError(f"data pull: {split} {e}") from None
            manifest["files"][split.rel] = write_split(root, split, rows)
            manifest["tasks"][task] = sorted({*manifest["tasks"].get(task, []), split.rel})
            write_repo_readme(root, split.path, manifest["files"])
            _write_manifest(root, manifest, atomic_write_json)
            log(f"{split}: {len(rows)} rows -> {path} (sha256 {manifest['files'][split.rel]['sha256'][:12]})")
        manifest["tasks"][task] = sorted({*manifest["tasks"].get(task, []), *(s.rel for s in task_splits)})
    _write_manifest(root, manifest, atomic_write_json)
    return manifest


def _write_manifest(root: Path, manifest: dict[str, Any], write: Callable[[Path, Any], None]) -> None:
    import time

    from phiforge import __version__

    manifest.update(format=1, phiforge=__version__, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write(root / MANIFEST, manifest)


# ---- readers for the original release formats -------------------------------------------------------------------
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


def require(doc: dict, fields: tuple[str, ...], where: str) -> dict:
    missing = [k for k in fields if k not in doc]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    return doc


# ---- benchmark items as raw text (decontamination) ------------------------------------------------------------
def benchmark_items(pattern: str, id_field: str | None = None, data_dir: str | os.PathLike | None = None
                    ) -> Iterator[tuple[str, str]] | None:
    """(item id, text) for every record of the files matching `pattern` in the first benchmark directory (search
    order as `search_dirs`) that has any, or None when none has. A record's text is all its strings (prompt,
    choices, answer; numbers too) joined by newlines; its id is `id_field` or its position, prefixed with the
    file's stem when several files match (MMLU's subjects, BBH's tasks)."""
    for d in search_dirs(data_dir):
        files = sorted(d.glob(pattern))
        if files:
            return (item for f in files for item in _raw_items(f, id_field, stem_prefix=len(files) > 1))
    return None


def record_text(obj: Any) -> str:
    """All strings of a record (numbers as text too) joined by newlines: what decontamination n-grams."""
    return "\n".join(_strings(obj))


def _strings(obj: Any) -> Iterator[str]:
    """Every string inside a JSON value, in order; numbers as text too; BIG-bench canary strings left out."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield str(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k != "canary":
                yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _raw_items(path: Path, id_field: str | None, stem_prefix: bool) -> Iterator[tuple[str, str]]:
    prefix = f"{path.stem}/" if stem_prefix else ""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f)):
                if i == 0:
                    continue  # header
                yield f"{prefix}{i}", "\n".join(row)
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data.get("examples", data) if isinstance(data, dict) else data
        for i, item in enumerate(items):
            yield f"{prefix}{i}", "\n".join(_strings(item))
    else:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                item = json.loads(line)
                key = item.get(id_field, i) if id_field else i
                yield f"{prefix}{key}", "\n".join(_strings(item))
