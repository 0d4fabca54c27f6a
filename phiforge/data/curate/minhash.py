"""Vectorised n-gram hashing, MinHash signatures, LSH banding and deterministic near-duplicate clustering.

Everything is numpy over a whole batch of documents at once (no per-shingle Python loop):

1. Texts are lower-cased and concatenated into one byte buffer; words are maximal runs of non-whitespace bytes.
2. Each word gets a 64-bit polynomial hash computed from prefix sums over the buffer (arithmetic mod 2^64:
   the base is odd, so it has an inverse mod 2^64 and any substring hash is (H[e] - H[s]) * base^-s).
3. Word n-gram shingles are hashed the same way over the sequence of word hashes (splitmix64-mixed).
4. MinHash: permutation k of a shingle x is (a_k * x + b_k) mod 2^64 (multiply-add with random odd a_k, a
   universal family on mixed inputs); the signature keeps the top 32 bits of each minimum.
5. LSH: the signature is cut into `bands` x `rows`; each band is hashed to 64 bits; documents that share a
   band hash are candidates. Candidates are joined (optionally only when the signature-estimated Jaccard
   reaches `verify`), connected components form clusters, and each cluster keeps its lowest index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_MASK64 = (1 << 64) - 1
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True  # ASCII whitespace bytes: \t \n \v \f \r space
_BASE = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so invertible mod 2^64
_BASE_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_WBASE = np.uint64(0x9E3779B97F4A7C15 | 1)  # golden-ratio constant, odd: base for hashing word sequences
_WBASE_INV = np.uint64(pow(0x9E3779B97F4A7C15 | 1, -1, 1 << 64))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (a bijection on uint64 with good avalanche), vectorised."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


_POWERS: dict[int, np.ndarray] = {}  # base -> cached powers table (grown by doubling, reused across batches)


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64 as uint64 (cumprod wraps around, which is exactly mod 2^64)."""
    table = _POWERS.get(int(base))
    if table is None or len(table) < n:
        size = max(n, 2 * len(table) if table is not None else 1 << 16)
        p = np.full(size, base, dtype=np.uint64)
        p[0] = 1
        with np.errstate(over="ignore"):
            table = _POWERS[int(base)] = np.cumprod(p, dtype=np.uint64)
    return table[:n]


def _substring_hashes(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, base: np.uint64,
                      base_inv: np.uint64) -> np.ndarray:
    """Polynomial hash of values[s:e] for every (s, e), all at once via prefix sums mod 2^64."""
    n = len(values)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(values.astype(np.uint64) * _powers(base, n), dtype=np.uint64, out=prefix[1:])
        inv = _powers(base_inv, n + 1)
        return (prefix[ends] - prefix[starts]) * inv[starts]


@dataclass
class Shingles:
    """Shingle hashes of a batch of documents: doc i owns hashes[offsets[i]:offsets[i+1]]."""

    hashes: np.ndarray  # (S,) uint64
    offsets: np.ndarray  # (N+1,) int64

    def doc(self, i: int) -> np.ndarray:
        return self.hashes[self.offsets[i]:self.offsets[i + 1]]


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(word hashes (W,) uint64, per-doc word offsets (N+1,)) for whitespace-separated lower-cased words."""
    encoded = [t.lower().encode("utf-8", "replace") for t in texts]
    # one separator byte between documents so no word spans two of them
    buf = np.frombuffer(b" ".join(encoded) + b" ", dtype=np.uint8)
    doc_starts = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) + 1 for e in encoded], out=doc_starts[1:])
    ws = _WS[buf]
    is_word = ~ws
    edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    h = splitmix64(_substring_hashes(buf, starts, ends, _BASE, _BASE_INV))
    offsets = np.searchsorted(starts, doc_starts).astype(np.int64)
    return h, offsets


def shingle_hashes(texts: Sequence[str], n: int = 5) -> Shingles:
    """Hashes of the word n-grams of each text (a text with fewer than n words gives one shingle of all its
    words; an empty text gives none)."""
    words, woff = word_hashes(texts)
    counts = np.diff(woff)
    per_doc = np.where(counts >= n, counts - n + 1, np.minimum(counts, 1))  # shingles per doc
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(per_doc, out=offsets[1:])
    total = int(offsets[-1])
    # start word of each shingle: doc's first word + position within doc
    doc_of = np.repeat(np.arange(len(texts)), per_doc)
    pos = np.arange(total, dtype=np.int64) - offsets[:-1][doc_of]
    s = woff[:-1][doc_of] + pos
    e = np.minimum(s + n, woff[1:][doc_of])
    h = splitmix64(_substring_hashes(words, s, e, _WBASE, _WBASE_INV))
    return Shingles(h, offsets)


class MinHasher:
    """`num_perm` seeded permutations of 32-bit shingle keys, turning shingle sets into uint32 signatures.

    Permutation k is x -> (a_k * x + b_k) mod 2^32 with a_k odd (a bijection of uint32). Inputs are the top 32
    bits of splitmix64-mixed shingle hashes, i.e. already uniformly scrambled, so these cheap affine maps act as
    independent random orderings; and 32-bit lanes keep numpy's SIMD multiply (4-8x fewer cycles than 64-bit).
    """

    def __init__(self, num_perm: int = 112, seed: int = 1, chunk: int = 1 << 20) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = (rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1))
        self.b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32)
        self.chunk = chunk  # max elements (shingles x perms) per temporary array

    def signatures(self, sh: Shingles) -> np.ndarray:
        """(N, num_perm) uint32 MinHash signatures; documents without shingles get all 0xFFFFFFFF."""
        n_docs = len(sh.offsets) - 1
        sig = np.full((n_docs, self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        counts = np.diff(sh.offsets)
        nonempty = np.flatnonzero(counts > 0)
        if len(nonempty) == 0:
            return sig
        keys = (sh.hashes >> np.uint64(32)).astype(np.uint32)
        max_shingles = max(1, self.chunk // self.num_perm)
        longest = int(counts.max())
        buf = np.empty(self.num_perm * max(max_shingles, longest), dtype=np.uint32)  # reused: no page faults
        # runs of documents whose shingles fit in one chunk (at least one document per run)
        ends = sh.offsets[nonempty + 1]
        i = 0
        while i < len(nonempty):
            base = sh.offsets[nonempty[i]]
            j = max(i + 1, int(np.searchsorted(ends, base + max_shingles, side="right")))
            docs = nonempty[i:j]
            lo, hi = sh.offsets[docs[0]], sh.offsets[docs[-1] + 1]
            # (P, S) layout: each permutation's row is contiguous, so the per-doc min runs along memory
            vals = buf[: self.num_perm * (hi - lo)].reshape(self.num_perm, hi - lo)
            with np.errstate(over="ignore"):
                np.multiply(self.a[:, None], keys[None, lo:hi], out=vals)  # uint32, wraps mod 2^32
                vals += self.b[:, None]
            # docs are contiguous in the shingle array (empty ones in between have no shingles)
            sig[docs] = np.minimum.reduceat(vals, sh.offsets[docs] - lo, axis=1).T  # (D, P)
            i = j
        return sig


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64 hashes of each band of `rows` signature values."""
    if bands * rows > sig.shape[1]:
        raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm = {sig.shape[1]}")
    b = sig[:, : bands * rows].reshape(len(sig), bands, rows).astype(np.uint64)  # (N, bands, rows)
    h = np.zeros((len(sig), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            h = splitmix64(h * _WBASE + b[:, :, r] + np.uint64(r + 1))
    return h


def candidate_pairs(bands_h: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(E, 2) int64 pairs (i, j), i < j: j shares a band hash with i, the lowest index in that bucket."""
    n = len(bands_h)
    idx = np.arange(n, dtype=np.int64) if valid is None else np.flatnonzero(valid).astype(np.int64)
    out = []
    for k in range(bands_h.shape[1]):
        keys = bands_h[idx, k]
        order = np.lexsort((idx, keys))  # by key, then index: each bucket's first member is its minimum
        ks, ids = keys[order], idx[order]
        new_bucket = np.concatenate(([True], ks[1:] != ks[:-1]))
        first = ids[np.maximum.accumulate(np.where(new_bucket, np.arange(len(ks)), 0))]
        m = ~new_bucket
        out.append(np.stack([first[m], ids[m]], axis=1))
    pairs = np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Cluster id per document: the lowest document index in its connected component.

    A vectorised union-find: parent[x] <= x always holds (a root is linked under a smaller root), so every
    root is the minimum of its tree; pointer jumping after each round keeps the trees shallow.
    """
    parent = np.arange(n, dtype=np.int64)

    def find(x: np.ndarray) -> np.ndarray:
        r = parent[x]
        while True:
            up = parent[r]
            if np.array_equal(up, r):
                return r
            r = up

    a, b = pairs[:, 0], pairs[:, 1]
    while len(a):
        ra, rb = find(a), find(b)
        differ = ra != rb
        lo, hi = np.minimum(ra, rb)[differ], np.maximum(ra, rb)[differ]
        np.minimum.at(parent, hi, lo)  # several links to one root: the smallest wins, the rest retry
        a, b = a[differ], b[differ]
        while True:  # pointer jumping: point every node at its grandparent until flat
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return parent


@dataclass
class LSHParams:
    """MinHash-LSH settings (defaults as datatrove: 5-word shingles, 14 bands x 8 rows)."""

    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    verify: float | None = None  # join candidates only when estimated Jaccard >= verify


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Fraction of equal signature values per pair: an unbiased estimate of the shingle-set Jaccard."""
    return (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)


def minhash_signatures(texts: Sequence[str], params: LSHParams, batch_bytes: int = 1 << 19) -> np.ndarray:
    """(N, bands*rows) uint32 signatures of `texts`, hashed in batches of about `batch_bytes` of text so
    the temporaries stay cache-sized (a big win on a busy machine where memory bandwidth is shared)."""
    hasher = MinHasher(params.bands * params.rows, params.seed)
    out = np.empty((len(texts), hasher.num_perm), dtype=np.uint32)
    i = 0
    while i < len(texts):
        j, size = i, 0
        while j < len(texts) and (size < batch_bytes or j == i):
            size += len(texts[j])
            j += 1
        out[i:j] = hasher.signatures(shingle_hashes(texts[i:j], params.ngram))
        i = j
    return out


def near_duplicate_clusters(sig: np.ndarray, params: LSHParams) -> tuple[np.ndarray, np.ndarray]:
    """(cluster root per doc, candidate pairs joined). A doc is kept iff root == its own index."""
    empty = (sig == np.iinfo(np.uint32).max).all(axis=1)
    pairs = candidate_pairs(band_hashes(sig, params.bands, params.rows), valid=~empty)
    if params.verify is not None and len(pairs):
        pairs = pairs[estimated_jaccard(sig, pairs) >= params.verify]
    return clusters(len(sig), pairs), pairs


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle-hash arrays taken as sets."""
    sa, sb = np.unique(a), np.unique(b)
    inter = len(np.intersect1d(sa, sb, assume_unique=True))
    union = len(sa) + len(sb) - inter
    return inter / union if union else 1.0
