"""Tokenize-and-pack: JSONL / Parquet / plain-text files -> memory-mapped token shards + a manifest.

Output directory (written under a temporary name and renamed when complete):

    manifest.json            token counts, dtype, tokenizer hash, source files and their sha256, bad lines
    tokenizer/               the tokenizer the shards were made with (trained here or copied)
    train-00000.bin ...      raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val-00000.bin ...

Every document is followed by EOS, so packed training windows see document boundaries. Each document goes to
train or val by a keyed hash of its text: the split is deterministic, independent of file order and worker
count, and a document repeated across files always lands on the same side.

Streaming: files are read line by line (Parquet by record batch) and tokenized in small batches; each worker
process appends its tokens to per-file part files, which are concatenated into shards at the end. Memory stays
bounded by the batch size whatever the corpus size.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "phiforge-tokens/1"
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens = 512 MB of uint16 per shard
MAX_BAD_EXAMPLES = 100
_BATCH_DOCS = 256


@dataclass
class BadLine:
    """A record that could not be used: where it is and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class FileStats:
    path: str
    sha256: str = ""
    documents: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    train_documents: int = 0
    val_documents: int = 0
    bad_count: int = 0
    bad: list[BadLine] = field(default_factory=list)


# ---- inputs -----------------------------------------------------------------------------------------------
def expand_inputs(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by paths, directories (their supported files) and globs; sorted, de-duplicated.

    Raises DataError for a pattern that matches nothing and for an empty result."""
    if not patterns:
        raise DataError("no input files given")
    out: list[Path] = []
    for pat in patterns:
        s = str(pat)
        if any(c in s for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(s, recursive=True)) if Path(m).is_file()]
        elif Path(s).is_dir():
            matches = [p for p in sorted(Path(s).rglob("*")) if p.is_file() and _kind(p) is not None]
        elif Path(s).is_file():
            matches = [Path(s)]
        else:
            raise DataError(f"{s}: no such file or directory")
        if not matches:
            raise DataError(f"{s}: matches no input files (supported: {', '.join(_all_suffixes())})")
        out.extend(matches)
    seen: set[Path] = set()
    files = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            files.append(p)
    for p in files:
        if _kind(p) is None:
            raise DataError(f"{p}: unsupported input type (supported: {', '.join(_all_suffixes())})")
    return files


def _all_suffixes() -> tuple[str, ...]:
    return JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def iter_records(path: Path, text_field: str = "text") -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (line_or_row_number, text, None) for good records and (n, None, reason) for bad ones.

    JSONL: one JSON object per line, text under `text_field` (dotted paths reach nested objects).
    Parquet: column `text_field`, rows numbered from 1. Plain text: the whole file is one document; a line
    that is not UTF-8 is reported and dropped."""
    kind = _kind(path)
    if kind == "jsonl":
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield n, None, f"undecodable bytes (not UTF-8) at byte {e.start}"
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, None, f"invalid JSON: {e.msg} (column {e.colno})"
                    continue
                text = _field(obj, text_field)
                if not isinstance(text, str):
                    what = "missing" if text is None else f"not a string ({type(text).__name__})"
                    yield n, None, f"field {text_field!r} {what}"
                    continue
                yield n, text, None
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        n = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                n += 1
                if not isinstance(value, str):
                    yield n, None, f"column {text_field!r} is {'null' if value is None else type(value).__name__}"
                else:
                    yield n, value, None
    elif kind == "text":
        parts: list[str] = []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    parts.append(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield n, None, f"undecodable bytes (not UTF-8) at byte {e.start}"
        yield 1, "".join(parts), None
    else:
        raise DataError(f"{path}: unsupported input type")


def _field(obj: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def iter_texts(files: Iterable[Path], text_field: str = "text", strict: bool = False) -> Iterator[str]:
    """Every good document's text, in file order (used to train a tokenizer without loading the corpus)."""
    for path in files:
        for n, text, reason in iter_records(path, text_field):
            if reason is not None:
                if strict:
                    raise DataError(f"{path}:{n}: {reason}")
                continue
            if text:
                yield text


def is_val(text: str, val_fraction: float, seed: int) -> bool:
    """Deterministic split: a keyed 64-bit hash of the text, compared with the val fraction."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") < val_fraction * 2**64


# ---- one file -> part files (runs in a worker process) ----------------------------------------------------------
_COUNTERS: tuple[Any, Any] | None = None  # (documents, tokens) shared with the parent for the progress bar


def _init_worker(counters: tuple[Any, Any] | None) -> None:
    global _COUNTERS
    _COUNTERS = counters


_LOCAL_PROGRESS: Any = None  # in-process runs: a callback(docs, tokens) updating the bar


def _bump(docs: int, tokens: int) -> None:
    if _LOCAL_PROGRESS is not None:
        _LOCAL_PROGRESS(docs, tokens)
    if _COUNTERS is not None:
        with _COUNTERS[0].get_lock():
            _COUNTERS[0].value += docs
        with _COUNTERS[1].get_lock():
            _COUNTERS[1].value += tokens


def _pack_file(job: dict[str, Any]) -> FileStats:
    """Tokenize one file into `<parts>/<index>.train.bin` and `.val.bin`; returns its counts and bad lines."""
    from phiforge.tokenizer import load_tokenizer

    path = Path(job["path"])
    tok = load_tokenizer(job["tokenizer"])
    eos, dtype = tok.eos_token_id, np.dtype(job["dtype"])
    stats = FileStats(path=str(path), sha256=file_sha256(path))
    parts = Path(job["parts"])
    with open(parts / f"{job['index']:05d}.train.bin", "wb") as ftrain, \
            open(parts / f"{job['index']:05d}.val.bin", "wb") as fval:
        batch: list[str] = []

        def flush() -> None:
            if not batch:
                return
            ntok = 0
            for text, ids in zip(batch, tok.encode_batch(batch)):
                ids.append(eos)  # EOS after every document: the boundary packed windows learn from
                arr = np.asarray(ids, dtype=dtype)
                if is_val(text, job["val_fraction"], job["seed"]):
                    arr.tofile(fval)
                    stats.val_tokens += len(arr)
                    stats.val_documents += 1
                else:
                    arr.tofile(ftrain)
                    stats.train_tokens += len(arr)
                    stats.train_documents += 1
                ntok += len(arr)
            stats.documents += len(batch)
            _bump(len(batch), ntok)
            batch.clear()

        for n, text, reason in iter_records(path, job["text_field"]):
            if reason is not None:
                if job["strict"]:
                    raise DataError(f"{path}:{n}: {reason} (--strict)")
                stats.bad_count += 1
                if len(stats.bad) < MAX_BAD_EXAMPLES:
                    stats.bad.append(BadLine(str(path), n, reason))
                continue
            if not text:
                continue
            batch.append(text)
            if len(batch) >= _BATCH_DOCS:
                flush()
        flush()
    return stats


# ---- the whole corpus ---------------------------------------------------------------------------------------
@dataclass
class PackResult:
    out_dir: Path
    manifest: dict[str, Any]

    @property
    def train_tokens(self) -> int:
        return self.manifest["splits"]["train"]["tokens"]

    @property
    def val_tokens(self) -> int:
        return self.manifest["splits"]["val"]["tokens"]

    @property
    def bad_lines(self) -> list[str]:
        return self.manifest["bad_lines"]["examples"]


def pack_corpus(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                tokenizer: str | os.PathLike | None = None, train_vocab: int | None = None,
                min_frequency: int = 2, text_field: str = "text", val_fraction: float = 0.01, seed: int = 0,
                workers: int | None = None, strict: bool = False,
                shard_tokens: int = DEFAULT_SHARD_TOKENS) -> PackResult:
    """Tokenize `inputs` (paths, dirs, globs) into token shards under `out_dir`; returns the manifest.

    Exactly one of `tokenizer` (a tokenizer dir or tokenizer.json) and `train_vocab` (train a BPE tokenizer of
    that size on the inputs first, streaming) must be given. Bad records are skipped, counted and reported with
    file:line (the first one is a DataError when `strict`)."""
    from phiforge.atomic import atomic_dir, atomic_write_json
    from phiforge.progress import progress
    from phiforge.tokenizer import load_tokenizer, train_tokenizer

    if (tokenizer is None) == (train_vocab is None):
        raise DataError("give exactly one of a tokenizer (--tokenizer) or a vocabulary size to train "
                        "(--train-tokenizer)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = expand_inputs(inputs)
    out = Path(out_dir)
    t0 = time.time()
    with atomic_dir(out) as tmp:
        tok_dir = tmp / "tokenizer"
        if train_vocab is not None:
            tok = train_tokenizer(iter_texts(files, text_field, strict), vocab_size=int(train_vocab),
                                  min_frequency=min_frequency)
        else:
            tok = load_tokenizer(tokenizer)
        tok_dir.mkdir()
        tok.save(tok_dir)
        vocab = len(tok)
        dtype = "uint16" if vocab <= 1 << 16 else "uint32"
        parts = tmp / ".parts"
        parts.mkdir()
        jobs = [dict(index=i, path=str(p), tokenizer=str(tok_dir), dtype=dtype, text_field=text_field,
                     val_fraction=val_fraction, seed=seed, strict=strict, parts=str(parts))
                for i, p in enumerate(files)]
        stats = _run_jobs(jobs, workers, progress)
        total_docs = sum(s.documents for s in stats)
        if total_docs == 0:
            raise DataError(f"no usable documents in {len(files)} input file(s) "
                            f"({sum(s.bad_count for s in stats)} bad record(s); is the text field "
                            f"{text_field!r} right?)")
        splits = {}
        for split in ("train", "val"):
            shards = _merge_parts(parts, split, len(files), tmp, np.dtype(dtype), shard_tokens)
            splits[split] = {
                "tokens": sum(s["tokens"] for s in shards),
                "documents": sum(getattr(s, f"{split}_documents") for s in stats),
                "shards": shards,
            }
        shutil.rmtree(parts)
        bad = [str(b) for s in stats for b in s.bad][:MAX_BAD_EXAMPLES]
        manifest = {
            "format": FORMAT,
            "dtype": dtype,
            "vocab_size": vocab,
            "eos_token_id": tok.eos_token_id,
            "tokenizer": {"path": "tokenizer", "sha256": tok.hash(), "trained": train_vocab is not None},
            "text_field": text_field,
            "val_fraction": val_fraction,
            "seed": seed,
            "documents": total_docs,
            "splits": splits,
            "sources": [{"path": s.path, "sha256": s.sha256, "documents": s.documents,
                         "tokens": s.train_tokens + s.val_tokens, "bad_lines": s.bad_count} for s in stats],
            "bad_lines": {"count": sum(s.bad_count for s in stats), "examples": bad},
            "seconds": round(time.time() - t0, 3),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return PackResult(out, manifest)


def _run_jobs(jobs: list[dict[str, Any]], workers: int | None, progress_fn: Any) -> list[FileStats]:
    """Run `_pack_file` over files, in worker processes when more than one, with a docs/s + tokens/s bar."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = progress_fn(desc="tokenize", unit="doc", total=None)
    try:
        if workers == 1:
            global _LOCAL_PROGRESS
            t0, ntok = time.time(), [0]

            def tick(docs: int, tokens: int) -> None:
                ntok[0] += tokens
                bar.update(docs)
                bar.set_postfix_str(_rate(bar.n, ntok[0], t0), refresh=False)

            _LOCAL_PROGRESS = tick
            try:
                return [_pack_file(job) for job in jobs]
            finally:
                _LOCAL_PROGRESS = None
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch/tokenizers threads started is unsafe
        counters = (ctx.Value("q", 0), ctx.Value("q", 0))
        t0 = time.time()
        with ctx.Pool(workers, initializer=_init_worker, initargs=(counters,)) as pool:
            pending = pool.map_async(_pack_file, jobs, chunksize=1)
            while not pending.ready():
                pending.wait(0.5)
                bar.update(counters[0].value - bar.n)
                bar.set_postfix_str(_rate(counters[0].value, counters[1].value, t0))
            result = pending.get()  # re-raises a worker's DataError (e.g. --strict) here
            bar.update(counters[0].value - bar.n)
            return result
    finally:
        bar.close()


def _rate(docs: int, tokens: int, t0: float) -> str:
    dt = max(time.time() - t0, 1e-9)
    return f"{docs / dt:,.0f} docs/s, {tokens / dt:,.0f} tok/s"


def _merge_parts(parts: Path, split: str, n_files: int, out: Path, dtype: np.dtype,
                 shard_tokens: int) -> list[dict[str, Any]]:
    """Concatenate per-file parts (in file order) into shards of at most `shard_tokens` tokens."""
    shards: list[dict[str, Any]] = []
    f = None
    chunk = 1 << 20
    try:
        for i in range(n_files):
            src = np.memmap(parts / f"{i:05d}.{split}.bin", dtype=dtype, mode="r") \
                if (parts / f"{i:05d}.{split}.bin").stat().st_size else np.zeros(0, dtype)
            pos = 0
            while pos < len(src):
                if f is None or shards[-1]["tokens"] >= shard_tokens:
                    if f is not None:
                        f.close()
                    name = f"{split}-{len(shards):05d}.bin"
                    f = open(out / name, "wb")  # noqa: SIM115 - rolls over to the next shard
                    shards.append({"file": name, "tokens": 0})
                take = min(chunk, len(src) - pos, shard_tokens - shards[-1]["tokens"])
                np.asarray(src[pos:pos + take]).tofile(f)
                shards[-1]["tokens"] += take
                pos += take
    finally:
        if f is not None:
            f.close()
    return shards


# ---- reading packed data --------------------------------------------------------------------------------------
def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a packed-token directory (DataError if it is not one)."""
    p = Path(data_dir) / MANIFEST
    if not p.exists():
        raise DataError(f"{data_dir}: no {MANIFEST} (make one with `phiforge tokenize`)")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None
    if m.get("format") != FORMAT:
        raise DataError(f"{p}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def open_split(data_dir: str | os.PathLike, split: str) -> list[np.ndarray]:
    """The memory-mapped shards of a split, in order (zero-length list when the split is empty)."""
    m = read_manifest(data_dir)
    if split not in m["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} in the manifest")
    out = []
    for s in m["splits"][split]["shards"]:
        path = Path(data_dir) / s["file"]
        if not path.exists():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        arr = np.memmap(path, dtype=np.dtype(m["dtype"]), mode="r")
        if len(arr) != s["tokens"]:
            raise DataError(f"{path}: {len(arr)} tokens, the manifest says {s['tokens']} (truncated?)")
        out.append(arr)
    return out
