"""A run's raw corpus from anywhere: local files (JSONL, JSONL.gz, Parquet, plain text; by glob) and Hugging Face
datasets (streamed, with a document limit). The interpreter's standard library stays the offline default
(`phiforge.run.stage_corpus`, when the corpus section names no `sources`).

    corpus:
      sources:
        - {hf: bigcode/the-stack-dedup, data_dir: data/python, text_field: content, limit: 1000000}
        - {path: "data/my-shards/*.parquet", text_field: body, id_field: doc_id}
        - {path: "notes/**/*.md"}                # a plain-text file is one document

Every source is read record by record and written out as it goes, into JSONL shards of `shard_docs` records
`{"id", "text"}` (`corpus/<label>-00000.jsonl`, ...), so memory stays bounded whatever the input's size: Parquet
is read by record batches, a hub dataset is streamed (`datasets.load_dataset(..., streaming=True)`), a text file
is read up to `max_chars`. Curation then reads the shards with its default fields (`text_field: text`,
`id_field: id`), whatever the sources called them.

A record without a string text field, a line that is not JSON, an unreadable file: a *bad record*, named on
stderr (FILE:LINE, or DATASET:SPLIT:ROW), counted in the stage summary, and skipped.

A finished shard is recorded in `corpus/.progress/<label>.json` (atomically, after the shard): a stage that stops
half-way (a dropped connection, a kill) resumes after its last finished shard when it runs again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from phiforge.errors import ConfigError, DataError, PhiforgeError

MAX_BAD_SHOWN = 20  # bad records named on stderr per source (all are counted)
MAX_BAD_LISTED = 100  # bad records listed in the stage summary
PROGRESS_DIR = ".progress"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")


@dataclass
class CorpusSource:
    """One input of the corpus: local files (`path`) or a Hugging Face dataset (`hf`), not both."""

    path: str | list[str] | None = None  # glob(s): *.jsonl / *.jsonl.gz / *.json / *.parquet; other files: text
    hf: str | None = None  # a hub dataset id (ORG/NAME), or a local dataset repository or folder
    subset: str | None = None  # hf: the dataset's config ("name" in datasets.load_dataset), e.g. sample-10BT
    data_dir: str | None = None  # hf: a folder of the repository, e.g. data/python in The Stack
    split: str = "train"  # hf
    text_field: str = "text"  # records: the field holding the document
    id_field: str | None = None  # records: the field holding its id (default: FILE:LINE, or DATASET:SPLIT:ROW)
    limit: int = 0  # documents taken from this source (0 = all of it)
    label: str | None = None  # output shards' name (default: the dataset's or the first glob's name)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hf is None):
            raise ConfigError("a corpus source names exactly one of `path` (local files) or `hf` (a Hugging "
                              "Face dataset)")
        if self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")
        if self.path is not None and (self.subset or self.data_dir):
            raise ConfigError("subset and data_dir are for `hf` sources")
        if not self.text_field:
            raise ConfigError("text_field may not be empty")

    @property
    def globs(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path or [])

    def describe(self) -> str:
        """One line for the plan: what is read, and how much."""
        if self.hf is not None:
            extra = "".join(f" {k}={v}" for k, v in (("subset", self.subset), ("data_dir", self.data_dir)) if v)
            what = f"hf:{self.hf}{extra} split={self.split} (streamed)"
        else:
            what = " ".join(self.globs)
        return f"{what}, field {self.text_field!r}" + (f", first {self.limit:,} documents" if self.limit else "")


def hub_location(dataset_id: str) -> str:
    """What `datasets.load_dataset` is given for a hub dataset: its id, or the local path it names. (Tests point
    this at local repositories in the hub's layout.)"""
    return dataset_id


def source_labels(sources: list[CorpusSource]) -> list[str]:
    """A distinct, filesystem-safe output name per source."""
    out: list[str] = []
    for i, s in enumerate(sources):
        base = s.label or (Path(s.hf.rstrip("/")).name if s.hf else
                           Path(s.globs[0].split("*")[0] or "files").name.split(".")[0])
        # no dots: curation names its shards by the part of a file name before the first dot
        base = "".join(c if c.isalnum() or c in "-_" else "-" for c in base).strip("-") or f"source{i}"
        out.append(base if base not in out else f"{base}-{i}")
    return out


# ---- reading ------------------------------------------------------------------------------------------------


@dataclass
class _Bad:
    src: str
    error: str


def _doc(obj: Any, where: str, src: CorpusSource) -> tuple[str, str] | _Bad:
    """(id, text) of one input record, or why it is bad."""
    if not isinstance(obj, dict):
        return _Bad(where, f"not a record ({type(obj).__name__})")
    text = obj.get(src.text_field)
    if not isinstance(text, str):
        return _Bad(where, f"missing or non-string field {src.text_field!r}" +
                    (f" (fields: {', '.join(list(obj)[:8])})" if obj else ""))
    ident = obj.get(src.id_field) if src.id_field else None
    return (str(ident) if isinstance(ident, (str, int)) and not isinstance(ident, bool) else where), text


def _iter_files(src: CorpusSource, max_chars: int) -> Iterator[tuple[str, str] | _Bad]:
    from phiforge.data.curate.shards import BadRecord, expand_inputs, read_records

    try:
        files = expand_inputs(src.globs)
    except DataError as e:
        raise DataError(f"corpus source {' '.join(src.globs)!r}: {e}; check the path (globs are relative to "
                        f"the directory phiforge runs in)") from None
    for f in files:
        name = f.name.lower()
        if name.endswith(".parquet") or name.endswith(JSONL_SUFFIXES):
            for rec in read_records(f, src.text_field):
                # read_records checks only the text field; _doc also takes the id field
                yield _Bad(rec.src, rec.error) if isinstance(rec, BadRecord) else _doc(rec.data, rec.src, src)
        else:  # plain text: the file is one document
            try:
                with open(f, encoding="utf-8") as fh:
                    text = fh.read(max_chars) if max_chars else fh.read()
            except (OSError, UnicodeDecodeError) as e:
                yield _Bad(f"{f}:0", f"unreadable text file ({type(e).__name__}: {e})")
                continue
            yield str(f), text


def _iter_hub(src: CorpusSource, skip: int) -> Iterator[tuple[str, str] | _Bad]:
    try:
        import datasets
    except ImportError:
        raise PhiforgeError("corpus source hf:" + src.hf + ": the `datasets` package is needed for Hugging Face "
                            "datasets (pip install datasets)") from None
    where = f"hf:{src.hf}"
    try:
        ds = datasets.load_dataset(hub_location(src.hf), src.subset, split=src.split, data_dir=src.data_dir,
                                   streaming=True)
        if skip:
            ds = ds.skip(skip)
        rows = iter(ds)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot open this source"
        raise PhiforgeError(f"corpus source {where} (subset {src.subset}, split {src.split}): cannot open it "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the id, "
                            f"subset and split, log in (`hf auth login`) for a gated dataset, and unset "
                            f"HF_HUB_OFFLINE to reach the hub") from None
    i = skip
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a stream that breaks off (network) ends the stage, resumably
            raise PhiforgeError(f"corpus source {where}: reading row {i} failed ({type(e).__name__}: {e}); run "
                                f"the same command again to resume after the last finished shard") from None
        yield _doc(row, f"{where}:{src.split}:{i}", src)
        i += 1


# ---- writing ------------------------------------------------------------------------------------------------


class _ShardWriter:
    """JSONL shards of at most `size` records, each written atomically; `on_shard(k)` after shard k is in place."""

    def __init__(self, d: Path, label: str, size: int, first: int, on_shard: Callable[[int], None]) -> None:
        self.d, self.label, self.size, self.index = d, label, size, first
        self.on_shard = on_shard
        self.count = 0
        self._stack: contextlib.ExitStack | None = None
        self._f: IO[str] | None = None

    def path(self, k: int) -> Path:
        return self.d / f"{self.label}-{k:05d}.jsonl"

    def write(self, ident: str, text: str) -> None:
        if self._f is None:
            from phiforge.atomic import atomic_open

            self._stack = contextlib.ExitStack()
            self._f = self._stack.enter_context(atomic_open(self.path(self.index), "w", encoding="utf-8"))
        self._f.write(json.dumps({"id": ident, "text": text}, ensure_ascii=False) + "\n")
        self.count += 1
        if self.count >= self.size:
            self.close()

    def close(self) -> None:
        """Put the open shard in place (a shard with no record is never made)."""
        if self._stack is not None:
            self._stack.close()
            self._stack, self._f = None, None
            self.index += 1
            self.count = 0
            self.on_shard(self.index)

    def abort(self) -> None:
        if self._stack is not None:  # the temporary file is removed, nothing is renamed into place
            with contextlib.suppress(BaseException):
                self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._stack, self._f = None, None


def write_corpus(d: Path, sources: list[CorpusSource], *, max_chars: int, shard_docs: int,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write every source's documents into JSONL shards under `d`; returns the stage summary."""
    from phiforge.atomic import atomic_write_json
    from phiforge.progress import progress

    log = log or (lambda m: print(f"    {m}", file=sys.stderr))
    if shard_docs < 1:
        raise ConfigError(f"corpus: shard_docs must be >= 1, got {shard_docs}")
    totals: dict[str, Any] = {"documents": 0, "chars": 0, "bad_records": 0, "shards": 0, "sources": []}
    listed: list[str] = []
    labels = source_labels(sources)
    for f in d.glob("*.jsonl"):  # shards of sources no longer configured (a stage stopped, then edited)
        if not any(_is_shard(f.name, label) for label in labels):
            f.unlink()
    for src, label in zip(sources, labels):
        key = {"source": asdict(src), "max_chars": max_chars, "shard_docs": shard_docs}
        state_path = d / PROGRESS_DIR / f"{label}.json"
        state = _read_progress(state_path, key)
        if not state["consumed"] and not state["done"]:  # starting this source afresh: no shard of before stays
            for f in d.glob(f"{label}-*.jsonl"):
                if _is_shard(f.name, label):
                    f.unlink()
        if state["consumed"]:
            log(f"corpus: {label}: resuming after {state['shards']} finished shard(s) ({state['documents']:,} "
                f"documents)")
        # what the stream has consumed / kept since the last finished shard: made permanent with that shard
        pending = {"consumed": 0, "documents": 0, "chars": 0, "bad_records": 0, "bad_examples": []}

        def shard_done(k: int, state: dict = state, pending: dict = pending, state_path: Path = state_path) -> None:
            for name in ("consumed", "documents", "chars", "bad_records"):
                state[name] += pending[name]
                pending[name] = 0
            state["bad_examples"] = (state["bad_examples"] + pending["bad_examples"])[:MAX_BAD_LISTED]
            pending["bad_examples"] = []
            state["shards"] = k
            atomic_write_json(state_path, state)

        writer = _ShardWriter(d, label, shard_docs, state["shards"], shard_done)
        if state["done"]:
            records: Iterator = iter(())
        elif src.hf is not None:
            records = _iter_hub(src, state["consumed"])
        else:
            records = _iter_files(src, max_chars)
            for _ in range(state["consumed"]):  # local files: read again up to where the last shard ended
                next(records, None)
        bad_shown = state["bad_records"]
        try:
            with progress(desc=f"corpus {label}", unit="doc", total=src.limit or None,
                          initial=state["documents"]) as bar:
                for item in records:
                    if src.limit and state["documents"] + pending["documents"] >= src.limit:
                        break
                    pending["consumed"] += 1
                    if isinstance(item, _Bad):
                        pending["bad_records"] += 1
                        pending["bad_examples"].append(f"{item.src}: {item.error}")
                        if bad_shown < MAX_BAD_SHOWN:
                            log(f"corpus: bad record {item.src}: {item.error} (skipped)")
                        bad_shown += 1
                        continue
                    ident, text = item
                    text = text[:max_chars] if max_chars else text
                    pending["documents"] += 1  # before the write, which may finish the shard that holds it
                    pending["chars"] += len(text)
                    writer.write(ident, text)
                    bar.update(1)
            writer.close()
            if pending["consumed"]:  # bad records after the last shard: counted with no shard to carry them
                shard_done(writer.index)
        except BaseException:
            writer.abort()
            raise
        if not state["done"]:
            state["done"] = True
            atomic_write_json(state_path, state)
        if state["bad_records"] > MAX_BAD_SHOWN:
            log(f"corpus: {label}: {state['bad_records']:,} bad records in all (the first {MAX_BAD_LISTED} are "
                f"listed in corpus/.stage.json)")
        if state["documents"] == 0:
            raise DataError(f"corpus source {src.describe()}: no usable documents ({state['bad_records']} bad "
                            f"record(s){'; first: ' + state['bad_examples'][0] if state['bad_examples'] else ''})")
        totals["sources"].append({"label": label, "source": src.describe(), "documents": state["documents"],
                                  "chars": state["chars"], "bad_records": state["bad_records"],
                                  "shards": state["shards"]})
        for name in ("documents", "chars", "bad_records", "shards"):
            totals[name] += state[name]
        listed += state["bad_examples"]
    totals["bad_examples"] = listed[:MAX_BAD_LISTED]
    return totals


def _is_shard(name: str, label: str) -> bool:
    """Whether `name` is one of `label`'s output shards (LABEL-NNNNN.jsonl)."""
    num = name[len(label) + 1: -len(".jsonl")]
    return name.startswith(label + "-") and name.endswith(".jsonl") and len(num) == 5 and num.isdigit()


def _read_progress(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """A source's progress, or a fresh one when there is none, it is damaged, or it was made by other settings."""
    fresh = {"key": key, "consumed": 0, "documents": 0, "chars": 0, "bad_records": 0, "bad_examples": [],
             "shards": 0, "done": False}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return fresh
    if not isinstance(state, dict) or state.get("key") != json.loads(json.dumps(key)) or \
            set(fresh) - set(state):
        return fresh
    return state


def corpus_files(d: str | os.PathLike) -> list[str]:
    """The corpus stage's output shards in `d`, in order (`stdlib.jsonl` for the default corpus)."""
    return [str(p) for p in sorted(Path(d).glob("*.jsonl"))]
