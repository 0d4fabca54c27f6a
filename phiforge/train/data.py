"""Batches from packed token shards: sequential chunks in a seeded order, resumable, sliced across ranks.

The train split (all shards, concatenated) is cut into `n` non-overlapping chunks of seq_len + 1 tokens
(consecutive chunks share one token: chunk i covers tokens [i*T, i*T + T]). Each epoch visits the chunks in a
permutation drawn from (seed, epoch). The whole position is one integer, `cursor`: how many chunks the job has
consumed. Every micro-step takes the next micro_batch x world_size chunks and rank r keeps its slice
[r*mb, (r+1)*mb), so N ranks x micro_batch see exactly the chunks one process with N*micro_batch sees
(the DDP/FSDP equality test relies on this).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from phiforge.data.pack import open_split, read_manifest
from phiforge.errors import DataError


class TokenStream:
    """Concatenated memory-mapped shards with random access to [start, stop) token ranges."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = [s for s in shards if len(s)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # (n_shards + 1,)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, crossing shard boundaries when needed."""
        out = np.empty(stop - start, dtype=np.int64)
        pos, i = start, int(np.searchsorted(self.offsets, start, side="right") - 1)
        while pos < stop:
            base = int(self.offsets[i])
            take = min(stop, int(self.offsets[i + 1])) - pos
            out[pos - start: pos - start + take] = self.shards[i][pos - base: pos - base + take]
            pos += take
            i += 1
        return out


class ChunkLoader:
    """Yields (inputs, targets) of shape (micro_batch, seq_len) for one rank; `state_dict()` is the position."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, micro_batch: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.manifest = read_manifest(data_dir)
        self.stream = TokenStream(open_split(data_dir, split))
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.split = seed, shuffle, split
        self.n_chunks = max(0, (len(self.stream) - 1) // seq_len)
        self.cursor = 0
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch * self.world_size

    def _chunk_index(self, k: int) -> int:
        """The chunk visited at global position k (epoch = k // n, permuted within the epoch)."""
        epoch, i = divmod(k, self.n_chunks)
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(self.n_chunks))
        return int(self._perm[1][i])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global micro-batch; advances the cursor by the global micro-batch."""
        if self.n_chunks == 0:
            raise DataError(f"the {self.split} split has {len(self.stream)} tokens, fewer than one "
                            f"sequence of {self.seq_len + 1}")
        T = self.seq_len
        first = self.cursor + self.rank * self.micro_batch
        rows = [self.stream.read(self._chunk_index(k) * T, self._chunk_index(k) * T + T + 1)
                for k in range(first, first + self.micro_batch)]
        self.cursor += self.global_micro_batch
        buf = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        return buf[:, :-1], buf[:, 1:]  # inputs (B, T), next-token targets (B, T)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "seed": self.seed, "n_chunks": self.n_chunks, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n_chunks"] != self.n_chunks or state["seq_len"] != self.seq_len:
            raise DataError(f"cannot resume: the checkpoint's data had {state['n_chunks']} chunks of "
                            f"{state['seq_len']} tokens, this data has {self.n_chunks} of {self.seq_len} "
                            f"(different data or seq_len)")
        self.cursor = int(state["cursor"])
        self.seed = int(state["seed"])
        self._perm = None


def eval_batches(loader: ChunkLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` micro-batches of a split in order (the same every evaluation)."""
    loader.cursor = 0
    if loader.n_chunks == 0:
        return []
    n = min(n, max(1, loader.n_chunks // loader.global_micro_batch))
    out = []
    for _ in range(n):
        if loader.cursor + loader.global_micro_batch > loader.n_chunks:
            break
        out.append(loader.next_batch())
    return out
