"""What a results file says about what ran: the model's identity, package versions, and lm-eval's layout.

`model_identity(lm, spec)` names the weights by content (sha256 of the weight files, remembered per file size and
mtime in ~/.cache/phiforge/content_hashes.json so a 5 GB checkpoint is hashed once), the dtype the model ran in,
the dtype it is stored in and any quantization (a GGUF file's type, which loader dequantized it on load and to
what dtype: phiforge's GGUF loader or transformers'; a transformers `quantization_config`). `package_versions()` lists the packages that decide the numbers.
`lm_eval_task_entry` writes one task the way lm-evaluation-harness writes it (`results` rows of "metric,filter"
keys), so its tooling (`lm_eval.utils.make_table`, its loggers) reads phiforge's results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("phiforge", "torch", "transformers", "tokenizers", "datasets", "numpy", "safetensors", "gguf",
            "lm_eval", "openai")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers (None: not installed); Python's too."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---- model identity ---------------------------------------------------------------------------------------------
def _hash_cache_path() -> Path:
    base = os.environ.get("PHIFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "phiforge")
    return Path(base) / "content_hashes.json"


def content_sha256(files: list[Path]) -> str:
    """sha256 over the files' names and contents (each file's hash remembered by path, size and mtime)."""
    cache_path = _hash_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    h = hashlib.sha256()
    changed = False
    for f in sorted(files, key=lambda p: p.name):
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in cache:
            from phiforge.eval.data import file_sha256

            cache[key] = file_sha256(f)
            changed = True
        h.update(f"{f.name}\0{cache[key]}\n".encode())
    if changed:
        from phiforge.atomic import atomic_write_json

        cache = {k: v for k, v in cache.items() if Path(k.split("|", 1)[0]).exists()}  # forget deleted files

        with contextlib.suppress(OSError):  # a read-only home only costs hashing again next time
            atomic_write_json(cache_path, cache)
    return h.hexdigest()


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def gguf_file_type(path: Path) -> str | None:
    """The GGUF file's `general.file_type` by name (e.g. MOSTLY_Q4_1), read from its header only."""
    with open(path, "rb") as f:
        def read(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def skip_value(t: int) -> Any:
            if t in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[t])
            if t == 8:
                return f.read(read("<Q"))
            if t == 9:
                item, n = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(n):
                        skip_value(item)
                return None
            raise ValueError(f"unknown GGUF value type {t}")

        if f.read(4) != b"GGUF":
            return None
        read("<I")  # version
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = f.read(read("<Q")).decode("utf-8", "replace")
            value = skip_value(read("<I"))
            if key == "general.file_type":
                try:
                    import gguf

                    return gguf.LlamaFileType(int(value)).name
                except (ImportError, ValueError):
                    return str(value)
    return None


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def model_identity(lm: Any, spec: str = "") -> dict[str, Any]:
    """Which weights ran, as what: backend, where, content hash, dtype, quantization, parameters (see the module
    docstring). Works on any LM; fields that do not apply are left out."""
    inner = getattr(lm, "lm", lm)  # a CachedLM wraps the backend
    out: dict[str, Any] = {"spec": spec or getattr(inner, "identity", ""), "backend": type(inner).__name__}
    if hasattr(inner, "base_url"):  # an endpoint: its name is all we know
        out.update(endpoint=inner.base_url, model=inner.model)
        return out
    model = getattr(inner, "model", None)
    params = list(model.parameters()) if model is not None and hasattr(model, "parameters") else []
    # serve/quant's modules: QuantLinear (in_features) and the int8 QuantEmbedding (num_embeddings)
    quant = [m for m in model.modules() if hasattr(m, "qweight")] if params else []
    quant_layers = [m for m in quant if hasattr(m, "in_features")]
    quant_tables = [m for m in quant if hasattr(m, "num_embeddings")]
    if params:
        float_params = [p for p in params if p.is_floating_point()]
        out["dtype"] = _dtype_name((float_params or params)[0].dtype)
        # a quantized linear keeps its weight as codes in buffers: count them as the (out x in) weights they are
        out["parameters"] = sum(p.numel() for p in params) + sum(m.in_features * m.out_features for m in quant_layers) \
            + sum(m.num_embeddings * m.embedding_dim for m in quant_tables)
        out["device"] = str(params[0].device)
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    out["quantization"] = None
    if qcfg is not None:
        out["quantization"] = qcfg.to_dict() if hasattr(qcfg, "to_dict") else str(qcfg)
    elif quant_layers:  # phiforge's weight-only quantization (--quant int8|int4): linear weights only
        q = quant_layers[0]
        out["quantization"] = {"mode": getattr(model, "quant_mode", q.mode), "layers": len(quant_layers),
                               "group_size": q.group_size, "kernel": q.kernel,
                               "activations": _dtype_name(q.act_dtype),
                               "embedding": "int8 per row" if quant_tables else _dtype_name(q.act_dtype),
                               "note": "weight-only: linear weights as integer codes with scales, dequantized "
                                       "inside the matmul; the token embedding as the line above says (rows "
                                       "dequantized as looked up); LayerNorms and biases keep the dtype above"}
    files = _weight_files(spec) if spec else []
    if files:
        out["files"] = [str(f) for f in files]
        out["sha256"] = content_sha256(files)
        gguf_files = [f for f in files if f.suffix == ".gguf"]
        if gguf_files:
            ftype = gguf_file_type(gguf_files[0])
            # what phiforge.lm.gguf_load records on the models it loads: which loader built the weights and the
            # tokenizer ("phiforge", or "transformers (why)"); absent on a model object built elsewhere
            load = getattr(model, "phiforge_gguf_load", None) or {}
            out["quantization"] = {"gguf_file_type": ftype,
                                   "dequantized_to": out.get("dtype"),
                                   "dequantized_by": load.get("weights"),
                                   "tokenizer_built_by": load.get("tokenizer"),
                                   "note": "GGUF weights are dequantized to float on load"}
        else:
            stored = _stored_dtype(files)
            if stored:
                out["stored_dtype"] = stored
    return out


def _weight_files(spec: str) -> list[Path]:
    """The weight files of a local model spec (checkpoint dir, transformers dir, GGUF file, alias)."""
    from phiforge.errors import PhiforgeError
    from phiforge.lm.spec import hf_location, parse_spec

    try:
        m = parse_spec(spec)
        if m.kind == "phiforge":
            where, gguf = Path(m.target), None
        elif m.kind in ("hf", "gguf", "alias"):
            loc, gguf = hf_location(m)
            where = Path(loc)
        else:
            return []
    except PhiforgeError:
        return []
    if gguf:
        return [where / gguf]
    if not where.is_dir():
        return []
    return sorted(f for f in where.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf") and f.is_file())


def _stored_dtype(files: list[Path]) -> str | None:
    """The dtype of the first floating-point tensor of a safetensors file (its header only)."""
    st = [f for f in files if f.suffix == ".safetensors"]
    if not st:
        return None
    with open(st[0], "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    for k, v in header.items():
        if k != "__metadata__" and v.get("dtype") in names:
            return names[v["dtype"]]
    return None


# ---- lm-eval's layout -------------------------------------------------------------------------------------------
def lm_eval_task_entry(name: str, metrics: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """One task's row in `results` as lm-eval writes it: alias, then "metric,none" and "metric_stderr,none"."""
    row: dict[str, Any] = {"alias": name}
    for m, (v, se) in metrics.items():
        row[f"{m},none"] = v
        row[f"{m}_stderr,none"] = "N/A" if se != se else se  # NaN (no standard error) the way lm-eval writes it
    return row
