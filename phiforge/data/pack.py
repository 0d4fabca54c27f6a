"""Tokenize-and-pack: JSONL / Parquet / plain-text files -> memory-mapped token shards + a manifest.

Output directory (written under a temporary name and renamed when complete):

    manifest.json            token counts, dtype, tokenizer hash, source files and their sha256, bad lines
    tokenizer/               the tokenizer the shards were made with (trained here or copied)
    train-00000.bin ...      raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val-00000.bin ...
    train-00000.mask ...     fine-tuning examples only (--format completion/chat, data/examples.py): uint8 per
    train-offsets.bin        token, 1 = trained (completion + EOS); int64 example start offsets, then the total

Every document is followed by EOS, so packed training windows see document boundaries. Each document goes to
train or val by a keyed hash of its text: the split is deterministic, independent of file order and worker
count, and a document repeated across files always lands on the same side.

Streaming: files are read line by line (Parquet by record batch) and tokenized in small batches; each worker
process appends its tokens to per-file part files, which are concatenated into shards at the end. Memory stays
bounded by the batch size whatever the corpus size.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.data.examples import (
    OVERLONG_RULES,
    RECORD_FORMATS,
    ChatTemplate,
    Segments,
    fit_example,
    load_template,
    record_segments,
    segments_text,
    tokenize_segments,
)
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
    # prompt/completion and chat records only
    train_loss_tokens: int = 0
    val_loss_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    longest: int = 0


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


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object, None) per JSON line, or (n, None, reason) for a line that is not JSON (or
    the rest of a cut .gz file): `phiforge.readers.iter_jsonl`, the one JSONL reader."""
    from phiforge.readers import iter_jsonl

    return iter_jsonl(path)


def iter_records(path: Path, text_field: str = "text") -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (line_or_row_number, text, None) for good records and (n, None, reason) for bad ones.

    JSONL: one JSON object per line, text under `text_field` (dotted paths reach nested objects).
    Parquet: column `text_field`, rows numbered from 1. Plain text: the whole file is one document; a line
    that is not UTF-8 is reported and dropped."""
    kind = _kind(path)
    if kind == "jsonl":
        for n, obj, reason in _iter_jsonl(path):
            if reason is not None:
                yield n, None, reason
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
        try:
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    n += 1
                    if not isinstance(value, str):
                        yield n, None, f"column {text_field!r} is {'null' if value is None else type(value).__name__}"
                    else:
                        yield n, value, None
        except Exception as e:  # noqa: BLE001 - a damaged row group: the rest of the file, said, not a traceback
            yield n + 1, None, f"the rest of the file cannot be read ({type(e).__name__}: {str(e)[:120]})"
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


def iter_examples(path: Path, fmt: str, template: ChatTemplate | None = None
                  ) -> Iterator[tuple[int, Segments | None, str | None]]:
    """Yield (line, segments, None) for good prompt/completion or chat records, (line, None, reason) for bad ones
    (JSONL only: examples are records with named fields)."""
    if _kind(path) != "jsonl":
        raise DataError(f"{path}: {fmt} records are read from JSONL files (.jsonl[.gz]), not {path.suffix}")
    for n, obj, reason in _iter_jsonl(path):
        if reason is None:
            got = record_segments(obj, fmt, template)
            if isinstance(got, str):
                yield n, None, got
            else:
                yield n, got, None
        else:
            yield n, None, reason


def iter_texts(files: Iterable[Path], text_field: str = "text", strict: bool = False, *, records: str = "text",
               template: ChatTemplate | None = None) -> Iterator[str]:
    """Every good document's text, in file order (used to train a tokenizer without loading the corpus)."""
    for path in files:
        if records == "text":
            found: Iterable[tuple[int, str | None, str | None]] = iter_records(path, text_field)
        else:
            found = ((n, segments_text(seg) if seg else None, reason)
                     for n, seg, reason in iter_examples(path, records, template))
        for n, text, reason in found:
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

    if job["records"] != "text":
        return _pack_examples_file(job)

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
                _bad(stats, job, path, n, reason)
                continue
            if not text:
                continue
            batch.append(text)
            if len(batch) >= _BATCH_DOCS:
                flush()
        flush()
    return stats


def _bad(stats: FileStats, job: dict[str, Any], path: Path, n: int, reason: str) -> None:
    """Count a bad record (and keep its file:line), or stop with it under --strict."""
    if job["strict"]:
        raise DataError(f"{path}:{n}: {reason} (--strict)")
    stats.bad_count += 1
    if len(stats.bad) < MAX_BAD_EXAMPLES:
        stats.bad.append(BadLine(str(path), n, reason))


def _pack_examples_file(job: dict[str, Any]) -> FileStats:
    """Prompt/completion or chat records of one file -> per split: token ids (`.bin`), the loss mask (`.mask`,
    uint8, one per token) and example lengths (`.len`, int64), so the loader can pack whole examples."""
    from phiforge.tokenizer import load_tokenizer

    path = Path(job["path"])
    tok = load_tokenizer(job["tokenizer"])
    dtype = np.dtype(job["dtype"])
    stats = FileStats(path=str(path), sha256=file_sha256(path))
    parts = Path(job["parts"])
    files = {f"{split}.{kind}": open(parts / f"{job['index']:05d}.{split}.{kind}", "wb")  # noqa: SIM115
             for split in ("train", "val") for kind in ("bin", "mask", "len")}
    try:
        batch: list[tuple[int, Segments]] = []

        def flush() -> None:
            flat = tok.encode_batch([text for _, seg in batch for text, _ in seg]) if batch else []
            at, ntok = 0, 0
            for n, seg in batch:
                got = tokenize_segments(flat[at:at + len(seg)], seg, tok.eos_token_id)
                at += len(seg)
                if isinstance(got, str):
                    _bad(stats, job, path, n, got)
                    continue
                ids, mask, fate = fit_example(*got, job["max_tokens"], job["overlong"])
                if fate == "dropped":
                    stats.dropped += 1
                    continue
                stats.truncated += fate == "truncated"
                split = "val" if is_val(segments_text(seg), job["val_fraction"], job["seed"]) else "train"
                np.asarray(ids, dtype=dtype).tofile(files[f"{split}.bin"])
                np.asarray(mask, dtype=np.uint8).tofile(files[f"{split}.mask"])
                np.asarray([len(ids)], dtype=np.int64).tofile(files[f"{split}.len"])
                setattr(stats, f"{split}_tokens", getattr(stats, f"{split}_tokens") + len(ids))
                setattr(stats, f"{split}_documents", getattr(stats, f"{split}_documents") + 1)
                setattr(stats, f"{split}_loss_tokens", getattr(stats, f"{split}_loss_tokens") + sum(mask))
                stats.documents += 1
                stats.longest = max(stats.longest, len(ids))
                ntok += len(ids)
            _bump(len(batch), ntok)
            batch.clear()

        for n, seg, reason in iter_examples(path, job["records"], job["template"]):
            if reason is not None:
                _bad(stats, job, path, n, reason)
                continue
            batch.append((n, seg))
            if len(batch) >= _BATCH_DOCS:
                flush()
        flush()
    finally:
        for f in files.values():
            f.close()
    stats.bad.sort(key=lambda b: b.line)  # tokenization finds some in batches, after later lines' parse errors
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
                shard_tokens: int = DEFAULT_SHARD_TOKENS, records: str = "text", template: str | None = None,
                seq_len: int | None = None, overlong: str = "truncate") -> PackResult:
    """Tokenize `inputs` (paths, dirs, globs) into token shards under `out_dir`; returns the manifest.

    Exactly one of `tokenizer` (a tokenizer dir or tokenizer.json) and `train_vocab` (train a BPE tokenizer of
    that size on the inputs first, streaming) must be given. Bad records are skipped, counted and reported with
    file:line (the first one is a DataError when `strict`).

    `records`: "text" (documents), or fine-tuning examples, "completion" ({"prompt", "completion"}) or "chat"
    ({"messages"}, rendered by `template`, a shipped name or YAML file; default phi-2), see data/examples.py.
    Examples also get a loss mask beside each token shard and their boundaries (`<split>-offsets.bin`); an
    example longer than seq_len + 1 tokens (one training row; default seq_len 2048) is fitted by `overlong`:
    "truncate" (prompt tokens from the left) or "drop", counted in the manifest."""
    from phiforge.atomic import atomic_dir, atomic_write_json, remove_stale
    from phiforge.progress import progress
    from phiforge.tokenizer import load_tokenizer, train_tokenizer

    if (tokenizer is None) == (train_vocab is None):
        raise DataError("give exactly one of a tokenizer (--tokenizer) or a vocabulary size to train "
                        "(--train-tokenizer)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if records not in RECORD_FORMATS:
        raise DataError(f"record format {records!r} is not one of {', '.join(RECORD_FORMATS)}")
    if overlong not in OVERLONG_RULES:
        raise DataError(f"overlong rule {overlong!r} is not one of {', '.join(OVERLONG_RULES)}")
    examples = records != "text"
    if not examples and (template is not None or seq_len is not None):
        raise DataError("a chat template and seq_len apply to completion/chat records only (--format)")
    if template is not None and records != "chat":
        raise DataError("a chat template applies to chat records only (--format chat)")
    chat = load_template(template or "phi-2") if records == "chat" else None
    seq_len = seq_len or 2048
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    files = expand_inputs(inputs)
    out = Path(out_dir)
    t0 = time.time()
    remove_stale(out.parent, glob.escape(out.name))  # a killed tokenize's half-built output (.OUT.*.tmp)
    with atomic_dir(out) as tmp:
        tok_dir = tmp / "tokenizer"
        if train_vocab is not None:
            tok = train_tokenizer(iter_texts(files, text_field, strict, records=records, template=chat),
                                  vocab_size=int(train_vocab), min_frequency=min_frequency)
        else:
            tok = load_tokenizer(tokenizer)
        tok_dir.mkdir()
        tok.save(tok_dir)
        vocab = len(tok)
        dtype = "uint16" if vocab <= 1 << 16 else "uint32"
        parts = tmp / ".parts"
        parts.mkdir()
        jobs = [dict(index=i, path=str(p), tokenizer=str(tok_dir), dtype=dtype, text_field=text_field,
                     val_fraction=val_fraction, seed=seed, strict=strict, parts=str(parts), records=records,
                     template=chat, max_tokens=seq_len + 1, overlong=overlong)
                for i, p in enumerate(files)]
        stats = _run_jobs(jobs, workers, progress)
        total_docs = sum(s.documents for s in stats)
        if total_docs == 0:
            what = f"is the text field {text_field!r} right?" if not examples else \
                f"are these {records} records?{' Too long for seq_len?' if any(s.dropped for s in stats) else ''}"
            raise DataError(f"no usable documents in {len(files)} input file(s) "
                            f"({sum(s.bad_count for s in stats)} bad record(s); {what})")
        splits = {}
        for split in ("train", "val"):
            shards = _merge_parts(parts, split, len(files), tmp, np.dtype(dtype), shard_tokens)
            splits[split] = {
                "tokens": sum(s["tokens"] for s in shards),
                "documents": sum(getattr(s, f"{split}_documents") for s in stats),
                "shards": shards,
            }
            if examples:
                masks = _merge_parts(parts, split, len(files), tmp, np.dtype(np.uint8), shard_tokens, kind="mask")
                for shard, mask in zip(shards, masks, strict=True):
                    shard["mask"] = mask["file"]
                splits[split]["loss_tokens"] = sum(getattr(s, f"{split}_loss_tokens") for s in stats)
                splits[split]["offsets"] = _merge_offsets(parts, split, len(files), tmp)
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
        if examples:
            manifest["records"] = records
            if chat is not None:
                manifest["template"] = chat.to_dict()
            manifest["examples"] = {
                "max_tokens": seq_len + 1,  # inputs + next-token targets of one row of seq_len
                "overlong": overlong,
                "rule": "truncate: prompt tokens cut from the left, keeping one before the completion; an example "
                        "whose completion alone is too long is dropped" if overlong == "truncate"
                        else "drop: every example longer than max_tokens is dropped",
                "truncated": sum(s.truncated for s in stats),
                "dropped": sum(s.dropped for s in stats),
                "longest": max(s.longest for s in stats),
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
                 shard_tokens: int, kind: str = "bin") -> list[dict[str, Any]]:
    """Concatenate per-file parts (in file order) into shards of at most `shard_tokens` tokens. `kind` "mask"
    merges the loss masks, which roll over into shards at the same tokens as the ids."""
    shards: list[dict[str, Any]] = []
    f = None
    chunk = 1 << 20
    try:
        for i in range(n_files):
            part = parts / f"{i:05d}.{split}.{kind}"
            src = np.memmap(part, dtype=dtype, mode="r") if part.stat().st_size else np.zeros(0, dtype)
            pos = 0
            while pos < len(src):
                if f is None or shards[-1]["tokens"] >= shard_tokens:
                    if f is not None:
                        f.close()
                    name = f"{split}-{len(shards):05d}.{kind}"
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


def _merge_offsets(parts: Path, split: str, n_files: int, out: Path) -> str:
    """Example boundaries of a split: int64 start offsets into its concatenated tokens, then the total."""
    lengths = [np.fromfile(parts / f"{i:05d}.{split}.len", dtype=np.int64) for i in range(n_files)]
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    name = f"{split}-offsets.bin"
    offsets.tofile(out / name)
    return name


# ---- reading packed data --------------------------------------------------------------------------------------
def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a packed-token directory, every field the readers use checked: a missing, damaged or
    mistyped manifest is one DataError naming it and the field (re-run `phiforge tokenize`)."""
    from phiforge.readers import read_json

    p = Path(data_dir) / MANIFEST
    if not p.exists():
        raise DataError(f"{data_dir}: no {MANIFEST} (make one with `phiforge tokenize`)")
    fix = f"re-run `phiforge tokenize` into {data_dir}"
    m = read_json(p, what="a token manifest", fix=fix)
    if m.get("format") != FORMAT:
        raise DataError(f"{p}: format {m.get('format')!r}, expected {FORMAT!r}")
    why = _manifest_problem(m)
    if why:
        raise DataError(f"{p}: damaged manifest: {why}; {fix}")
    return m


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's fields (None: nothing the readers would trip over)."""
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def name(v: Any) -> bool:  # a file of the token directory itself
        return isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v

    if m.get("dtype") not in ("uint16", "uint32"):
        return f"dtype should be uint16 or uint32, got {m.get('dtype')!r}"
    if not count(m.get("vocab_size")) or not m["vocab_size"]:
        return f"vocab_size should be a positive integer, got {m.get('vocab_size')!r}"
    if not count(m.get("eos_token_id")) or m["eos_token_id"] >= m["vocab_size"]:
        return f"eos_token_id should be a token id below vocab_size, got {m.get('eos_token_id')!r}"
    tok = m.get("tokenizer")
    if not (isinstance(tok, dict) and name(tok.get("path")) and isinstance(tok.get("sha256"), str)):
        return "tokenizer should hold the tokenizer's path and sha256"
    examples = "records" in m
    splits = m.get("splits")
    for split in ("train", "val"):
        sp = splits.get(split) if isinstance(splits, dict) else None
        if not (isinstance(sp, dict) and count(sp.get("tokens")) and count(sp.get("documents"))
                and isinstance(sp.get("shards"), list)):
            return f"splits.{split} should hold tokens, documents and shards"
        for i, sh in enumerate(sp["shards"]):
            if not (isinstance(sh, dict) and name(sh.get("file")) and count(sh.get("tokens"))
                    and (not examples or name(sh.get("mask")))):
                return f"splits.{split}.shards[{i}] should name its file{' and mask' if examples else ''} and tokens"
        if sum(sh["tokens"] for sh in sp["shards"]) != sp["tokens"]:
            return f"splits.{split}: its shards' tokens do not add up to its {sp['tokens']} tokens"
        if examples and not name(sp.get("offsets")):
            return f"splits.{split} should name its offsets file"
    return None


def open_split(data_dir: str | os.PathLike, split: str) -> list[np.ndarray]:
    """The memory-mapped shards of a split, in order (zero-length list when the split is empty); a missing or
    cut shard is a DataError naming it (`phiforge.readers.open_tokens`)."""
    from phiforge.readers import open_tokens

    m = read_manifest(data_dir)
    if split not in m["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} in the manifest")
    return [open_tokens(Path(data_dir) / s["file"], m["dtype"], s["tokens"], fix=f"re-run `phiforge tokenize` "
                        f"into {data_dir}") for s in m["splits"][split]["shards"]]


def open_masks(data_dir: str | os.PathLike, split: str) -> list[np.ndarray]:
    """The memory-mapped uint8 loss masks of a split's shards (1 = the token is a training target), in order."""
    from phiforge.readers import open_tokens

    m = read_manifest(data_dir)
    if "records" not in m:
        raise DataError(f"{data_dir}: plain-text tokens have no loss mask (tokenize with --format completion/chat)")
    return [open_tokens(Path(data_dir) / s["mask"], np.uint8, s["tokens"], what="loss mask",
                        fix=f"re-run `phiforge tokenize` into {data_dir}") for s in m["splits"][split]["shards"]]


def read_offsets(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """Example boundaries of a split: start offsets into its concatenated tokens, then the total (int64)."""
    from phiforge.readers import open_tokens

    m = read_manifest(data_dir)
    sp = m["splits"][split]
    path = Path(data_dir) / sp["offsets"]
    offsets = np.asarray(open_tokens(path, np.int64, sp["documents"] + 1, what="example offsets file",
                                     fix=f"re-run `phiforge tokenize` into {data_dir}"))
    if offsets[0] != 0 or offsets[-1] != sp["tokens"] or np.any(np.diff(offsets) < 1):
        raise DataError(f"{path}: example offsets do not run from 0 to the split's {sp['tokens']} tokens in "
                        f"increasing steps (damaged); re-run `phiforge tokenize` into {data_dir}")
    return offsets
