"""Batches from packed token shards: sequential chunks (or packed examples) in a seeded order, resumable,
sliced across ranks.

The train split (all shards, concatenated) is cut into `n` non-overlapping chunks of seq_len + 1 tokens
(consecutive chunks share one token: chunk i covers tokens [i*T, i*T + T]). Each epoch visits the chunks in a
permutation drawn from (seed, epoch). The whole position is one integer, `cursor`: how many chunks the job has
consumed. Every micro-step takes the next micro_batch x world_size chunks and rank r keeps its slice
[r*mb, (r+1)*mb), so N ranks x micro_batch see exactly the chunks one process with N*micro_batch sees
(the DDP/FSDP equality test relies on this).

Fine-tuning examples (`phiforge tokenize --format completion|chat`) are never cut: `ExampleLoader` packs whole
examples into rows of seq_len positions once (next-fit, in a seeded order), and the rows take the place of the
chunks above. A row carries, besides inputs and targets, the loss mask of its targets, positions restarting at 0
with each example, and segment ids (which example each position belongs to, for the block-diagonal attention
mask); the padding after the last example that fits is one more segment, with no loss.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import torch

from phiforge.data.pack import open_masks, open_split, read_manifest, read_offsets
from phiforge.errors import DataError


class TokenStream:
    """Concatenated memory-mapped shards with random access to [start, stop) token ranges. With `vocab`, a token
    id at or above it (a damaged shard) is a DataError naming the shard, not an index error in the model."""

    def __init__(self, shards: list[np.ndarray], vocab: int | None = None) -> None:
        self.shards = [s for s in shards if len(s)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # (n_shards + 1,)
        self.vocab = vocab

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, crossing shard boundaries when needed."""
        out = np.empty(stop - start, dtype=np.int64)
        pos, i = start, int(np.searchsorted(self.offsets, start, side="right") - 1)
        while pos < stop:
            base = int(self.offsets[i])
            take = min(stop, int(self.offsets[i + 1])) - pos
            piece = self.shards[i][pos - base: pos - base + take]
            if self.vocab is not None and take and int(piece.max()) >= self.vocab:
                raise DataError(f"{getattr(self.shards[i], 'filename', None) or 'a token shard'}: token id "
                                f"{int(piece.max())} near token {pos - base} is not below the vocabulary size "
                                f"{self.vocab} (a damaged shard); re-run `phiforge tokenize`")
            out[pos - start: pos - start + take] = piece
            pos += take
            i += 1
        return out


class ChunkLoader:
    """Yields (inputs, targets) of shape (micro_batch, seq_len) for one rank; `state_dict()` is the position."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, micro_batch: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.manifest = read_manifest(data_dir)
        self.stream = TokenStream(open_split(data_dir, split), vocab=int(self.manifest["vocab_size"]))
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


class Batch(NamedTuple):
    """A micro-batch of packed examples, every field (B, T). `model(*batch)` passes them all to CausalLMLoss."""

    inputs: torch.Tensor  # token ids
    targets: torch.Tensor  # next-token ids (meaningless where loss_mask is False)
    loss_mask: torch.Tensor  # bool: the target is a completion token (or an example's closing EOS)
    position_ids: torch.Tensor | None  # 0, 1, ... within each example
    segment_ids: torch.Tensor | None  # the example (0, 1, ...) of each position; padding is the last segment
    # (both None: one example per row, padded at the end, plain causal attention: bench/finetune.py's baseline)


PACKING_STREAM = 1 << 40  # the packing order's RNG stream: [seed, PACKING_STREAM], apart from the epochs' [seed, e]


def pack_rows(positions: np.ndarray, capacity: int, order: np.ndarray) -> list[list[int]]:
    """Next-fit packing: examples (taking `positions[i]` positions each) in `order`, a new row whenever the next
    one does not fit in `capacity`. Every example must fit a row on its own."""
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i in order.tolist():
        if row and used + positions[i] > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += int(positions[i])
    if row:
        rows.append(row)
    return rows


class ExampleLoader(ChunkLoader):
    """Yields `Batch`es of whole examples packed into rows of seq_len positions; rows play the role of chunks
    (same epochs, cursor, rank slicing and state)."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, micro_batch: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.manifest = read_manifest(data_dir)
        self.stream = TokenStream(open_split(data_dir, split), vocab=int(self.manifest["vocab_size"]))
        self.masks = TokenStream(open_masks(data_dir, split))
        self.offsets = read_offsets(data_dir, split)
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.split = seed, shuffle, split
        self.eos = int(self.manifest["eos_token_id"])
        # An example of n tokens takes n - 1 positions: inputs are all its tokens but the last, targets all but
        # the first.
        positions = np.diff(self.offsets) - 1
        longest = int(positions.max()) + 1 if len(positions) else 0
        if longest > seq_len + 1:
            raise DataError(f"{data_dir}: the {split} split has examples of up to {longest} tokens, but a row of "
                            f"seq_len {seq_len} holds {seq_len + 1}; raise seq_len or re-tokenize with "
                            f"`phiforge tokenize --seq-len {seq_len}` (which truncates or drops longer ones)")
        self._positions = positions
        self._pack(seed)
        self.cursor = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _pack(self, seed: int) -> None:
        """Rows of whole examples, packed in an order drawn from `seed` (file order without shuffle)."""
        n = len(self._positions)
        order = np.random.default_rng([seed, PACKING_STREAM]).permutation(n) if self.shuffle else np.arange(n)
        self.rows = pack_rows(self._positions, self.seq_len, order)
        self.n_chunks = len(self.rows)
        self.packed_seed = seed

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.packed_seed:  # the checkpoint's seed wins, as for chunks: pack as it did
            self._pack(int(state["seed"]))
        super().load_state_dict(state)

    def packing_stats(self) -> dict[str, Any]:
        """Examples, rows, and the fraction of row positions that hold example tokens (the rest is padding)."""
        used = int(self.offsets[-1]) - (len(self.offsets) - 1)
        return {"examples": len(self.offsets) - 1, "rows": self.n_chunks,
                "fill": used / (self.n_chunks * self.seq_len) if self.n_chunks else 0.0}

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example i's token ids and loss mask (int64, uint8-valued), EOS included."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.stream.read(a, b), self.masks.read(a, b)

    def row(self, r: int) -> tuple[np.ndarray, ...]:
        """Row r as (inputs, targets, loss_mask, position_ids, segment_ids), each (seq_len,)."""
        T = self.seq_len
        inputs = np.full(T, self.eos, dtype=np.int64)
        targets = np.full(T, self.eos, dtype=np.int64)
        loss_mask = np.zeros(T, dtype=bool)
        pos = np.zeros(T, dtype=np.int64)
        # The padding after the last example is one more segment, attending only to itself: a query with no
        # visible key would make NaNs.
        seg = np.full(T, len(self.rows[r]), dtype=np.int64)
        at = 0
        for j, e in enumerate(self.rows[r]):
            ids, mask = self.example(e)
            n = len(ids) - 1
            inputs[at:at + n], targets[at:at + n] = ids[:-1], ids[1:]
            loss_mask[at:at + n] = mask[1:] == 1
            pos[at:at + n] = np.arange(n)
            seg[at:at + n] = j
            at += n
        pos[at:] = np.arange(T - at)  # any valid positions will do: padding carries no loss
        return inputs, targets, loss_mask, pos, seg

    def next_batch(self) -> Batch:  # type: ignore[override]
        """This rank's slice of the next global micro-batch of rows; advances the cursor by the global one."""
        if self.n_chunks == 0:
            raise DataError(f"the {self.split} split has no examples")
        first = self.cursor + self.rank * self.micro_batch
        rows = [self.row(self._chunk_index(k)) for k in range(first, first + self.micro_batch)]
        self.cursor += self.global_micro_batch
        return Batch(*(torch.from_numpy(np.stack(field)) for field in zip(*rows)))


def open_loader(data_dir: str | os.PathLike, split: str, seq_len: int, micro_batch: int, **kw: Any) -> ChunkLoader:
    """An ExampleLoader for fine-tuning examples (the manifest has a loss mask), else a ChunkLoader."""
    cls = ExampleLoader if "records" in read_manifest(data_dir) else ChunkLoader
    return cls(data_dir, split, seq_len, micro_batch, **kw)


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
