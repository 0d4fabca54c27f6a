"""Loading a model for decoding into an `Engine`: a phiforge checkpoint (optionally quantized) with the tokenizer
saved next to it, or any other Hugging Face causal LM (`smollm2`, a transformers directory, a .gguf file, a hub
id) through transformers. Shared by `chat` and `serve`; imports no HTTP stack, so `chat` never loads FastAPI."""

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
    """An Engine for a model spec (`phiforge.lm.spec`): a phiforge checkpoint (directory, `phiforge:DIR`, hub id)
    runs natively; `smollm2`, `hf:DIR_OR_HUB_ID`, a directory of another model type and a .gguf file run through
    transformers (`Engine.backend` says which). Quantization (int8/int4, applied while loading) and compiling are
    for the native model only."""
    from phiforge.checkpoint import load_checkpoint
    from phiforge.errors import ConfigError
    from phiforge.lm.spec import checkpoint_dir, parse_spec

    if quant == "none":
        quant = None
    if parse_spec(spec).kind in ("hf", "gguf", "alias"):
        for flag, value in (("--quant", quant), ("--compile", compile)):
            if value:
                raise ConfigError(f"{spec}: {flag}{' ' + quant if flag == '--quant' else ''} is for phiforge "
                                  f"checkpoints; this model runs through transformers (drop {flag})")
        return _hf_engine(spec, dtype=dtype, device=device)
    path = checkpoint_dir(spec)
    tokenizer = checkpoint_tokenizer(path)
    # quantized while loading (the float model never exists), in the layout the decode plan reads (no copies)
    model = load_checkpoint(path, dtype=dtype, device=device, quant=quant, group_size=group_size,
                            layout="decode").eval()
    return Engine(model, tokenizer, compile=compile)


def _hf_engine(spec: str | os.PathLike, *, dtype: str | None, device: str) -> Engine:
    from phiforge.checkpoint import parse_dtype
    from phiforge.errors import CheckpointError, PhiforgeError
    from phiforge.lm.hf import load_hf_causal_lm
    from phiforge.serve.hf_engine import hf_engine

    try:
        model, tokenizer = load_hf_causal_lm(spec, dtype=parse_dtype(dtype), device=device)
        return hf_engine(model, tokenizer)
    except PhiforgeError:
        raise
    except (OSError, ValueError, KeyError, AttributeError) as e:  # not a causal LM transformers can load
        raise CheckpointError(f"{spec}: cannot load as a transformers causal LM: {e}") from None
