"""Loading a checkpoint for decoding: the model (optionally quantized) into an `Engine`, and the tokenizer saved
with it. Shared by `generate`, `chat` and `serve`; imports no HTTP stack, so `chat` never loads FastAPI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from phiforge.serve.engine import Engine


def checkpoint_tokenizer(path: Path) -> Any:
    """The tokenizer saved next to a checkpoint's weights; a missing or corrupt one is a CheckpointError."""
    from phiforge.errors import CheckpointError, PhiforgeError
    from phiforge.tokenizer import load_tokenizer

    if not (path / "tokenizer.json").exists():
        raise CheckpointError(f"{path}: no tokenizer (tokenizer.json) next to the weights; save one with the "
                              f"checkpoint (save_checkpoint(..., tokenizer=...))")
    try:
        return load_tokenizer(path)
    except PhiforgeError:
        raise
    except Exception as e:  # a corrupt tokenizer file is the user's to fix, not a bug
        raise CheckpointError(f"{path / 'tokenizer.json'}: cannot load the tokenizer: {e}") from None


def load_engine(spec: str | os.PathLike, *, quant: str | None = None, group_size: int = 128,
                dtype: str | None = None, device: str = "cpu", compile: bool = False) -> Engine:
    """An Engine for a checkpoint (weights + tokenizer) named by a model spec: a directory, `phiforge:DIR` or a
    hub id (`phiforge.lm.spec.checkpoint_dir`)."""
    from phiforge.checkpoint import load_checkpoint
    from phiforge.lm.spec import checkpoint_dir

    path = checkpoint_dir(spec)
    tokenizer = checkpoint_tokenizer(path)
    model = load_checkpoint(path, dtype=dtype, device=device).eval()
    if quant:
        from phiforge.serve.quant import quantize

        quantize(model, quant, group_size=group_size)
    return Engine(model, tokenizer, compile=compile)
