"""Streaming exact + near-duplicate removal for generations within one synth run (and across its restarts).

Exact duplicates: sha256 of the lower-cased, whitespace-normalised text. Near duplicates: MinHash-LSH with the
curation module's hashing (phiforge.data.curate.minhash), kept as an incremental index: each band hash maps to
the kept documents that have it; a new text whose estimated Jaccard with any of them reaches `threshold` is a
near duplicate. The first occurrence wins, so results follow the order texts are offered in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from phiforge.data.curate.minhash import LSHParams, band_hashes, minhash_signatures


def exact_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


class DedupIndex:
    """`check(texts)` -> per text None (new: now indexed), "exact_duplicate" or "near_duplicate"."""

    def __init__(self, threshold: float = 0.8, ngram: int = 5, bands: int = 16, rows: int = 4, seed: int = 1):
        # 16 bands x 4 rows: a pair at Jaccard 0.8 shares a band with probability 1 - (1 - 0.8^4)^16 > 0.999.
        self.threshold = float(threshold)
        self.params = LSHParams(ngram=ngram, bands=bands, rows=rows, seed=seed)
        self.exact: set[str] = set()
        self.buckets: dict[tuple[int, int], list[int]] = {}
        self.sigs: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.exact)

    def check(self, texts: Sequence[str], add: bool = True) -> list[str | None]:
        if not texts:
            return []
        sig = minhash_signatures(list(texts), self.params)  # (N, bands*rows) uint32
        bands = band_hashes(sig, self.params.bands, self.params.rows)  # (N, bands) uint64
        out: list[str | None] = []
        for i, text in enumerate(texts):
            ek = exact_key(text)
            if ek in self.exact:
                out.append("exact_duplicate")
                continue
            cands = {j for b in range(bands.shape[1]) for j in self.buckets.get((b, int(bands[i, b])), ())}
            if any(float((self.sigs[j] == sig[i]).mean()) >= self.threshold for j in cands):
                out.append("near_duplicate")
                continue
            out.append(None)
            if add:
                self.exact.add(ek)
                self.sigs.append(sig[i])
                for b in range(bands.shape[1]):
                    self.buckets.setdefault((b, int(bands[i, b])), []).append(len(self.sigs) - 1)
        return out
