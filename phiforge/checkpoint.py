"""Checkpoints in the Hugging Face layout, and conversion from the original microsoft/phi layout.

A checkpoint is a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads:
    config.json                       model_type "phi"
    model.safetensors                 or model-0000K-of-0000N.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json (optional)

Loading builds the model on the meta device (no memory), checks every file, key and shape *before* reading any
tensor data, then reads tensors one at a time from memory-mapped safetensors, converting dtype as it goes and
assigning them into the model: a phi-2 (5.6 GB fp16) never exists twice in memory, and a bad file never gives
a half-loaded model. Errors name the file and the tensor or field.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from phiforge.atomic import atomic_dir, atomic_write_json
from phiforge.config import ModelConfig
from phiforge.errors import CheckpointError, ConfigError
from phiforge.model import Phi, init_on_meta

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Keys some checkpoints carry that are derived state, not parameters.
_IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|\.rotary\.(cos|sin)|\.masked_bias|\.attn\.bias)$")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None and 'auto' -> None (keep stored dtype)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r} (choose from fp32, bf16, fp16, auto)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- saving ---------------------------------------------------------------------------------------------------
def save_model_files(model: Phi, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write config.json and safetensors (sharded above `max_shard_bytes`) into an existing directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    sd = {k: v.to("cpu").contiguous() for k, v in sd.items()}
    stored = next(iter(sd.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    written = []
    if len(shards) == 1:
        save_file(shards[0], str(out / SAFE_NAME), metadata={"format": "pt"})
        written.append(out / SAFE_NAME)
    else:
        weight_map, n = {}, len(shards)
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            written.append(out / name)
        total = sum(v.numel() * v.element_size() for v in sd.values())
        atomic_write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(out / INDEX_NAME)
    atomic_write_json(out / "config.json", model.config.to_hf(torch_dtype=dtype_name(stored)))
    written.append(out / "config.json")
    return written


def save_checkpoint(model: Phi, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    tokenizer: str | os.PathLike | Any | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Save `model` (and optionally a tokenizer: a directory to copy from or an object with `save(dir)`) as a
    complete HF-layout directory. Written under a temporary name and renamed: all or nothing."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_model_files(model, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
    return out


def copy_tokenizer(tokenizer: str | os.PathLike | Any, out_dir: str | os.PathLike) -> None:
    """Copy tokenizer files from a directory, or call `tokenizer.save(out_dir)` on a tokenizer object."""
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, Path(out_dir) / name)
    else:
        tokenizer.save(out_dir)


# ---- loading --------------------------------------------------------------------------------------------------
def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A local directory, or a Hugging Face hub id ("org/name") downloaded into the HF cache.

    Only a name that is not a local path reaches the hub (and needs network); tests and the default run pass
    local directories."""
    p = Path(spec)
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: expected a checkpoint directory (config.json + *.safetensors)")
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)) and not str(spec).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(spec), allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                      "*.model", "*.bin"]))
        except Exception as e:  # offline, unknown repo, ...
            raise CheckpointError(f"{spec}: not a local directory, and the hub download failed: {e}") from None
    raise CheckpointError(f"{spec}: no such checkpoint directory")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (reads config.json only)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}:{e.lineno}: invalid JSON: {e.msg}") from None
    if raw.get("model_type") in ("phi-msft", "mixformer-sequential") or "n_embd" in raw:
        raise CheckpointError(f"{cfg_file}: this is an original microsoft/phi checkpoint "
                              f"(model_type {raw.get('model_type')!r}); run `phiforge convert {path} OUT` first")
    try:
        return ModelConfig.from_hf(raw, source=str(cfg_file))
    except TypeError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def weight_files(path: Path) -> dict[str, Path]:
    """Map every stored tensor name to the file that holds it (safetensors, sharded or not, or a .bin)."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        missing = sorted({f for f in wm.values() if not (path / f).exists()})
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return {k: path / f for k, f in wm.items()}
    single = path / SAFE_NAME
    files = [single] if single.exists() else sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise CheckpointError(f"{path}: no model weights (looked for {SAFE_NAME}, {INDEX_NAME}, "
                                  f"*.safetensors, pytorch_model*.bin)")
        files = bins
    out: dict[str, Path] = {}
    for f in files:
        for k in _tensor_shapes(f):
            out[k] = f
    return out


def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a file's header only (safetensors) or a memory-mapped torch.load (.bin)."""
    if file.suffix == ".bin":
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read PyTorch weights ({e})") from None
        return {k: tuple(v.shape) for k, v in sd.items()}
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def check_state_dict_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                            where: dict[str, Path] | str) -> None:
    """Raise CheckpointError naming the tensor (and file) for any missing, unexpected or mis-shaped tensor."""
    def loc(k: str) -> str:
        return str(where[k]) if isinstance(where, dict) else where

    found = {k: v for k, v in found.items() if not _IGNORED_KEYS.search(k)}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        src = where if isinstance(where, str) else str(next(iter(where.values()), ""))
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{Path(src).parent if not isinstance(where, str) else src}: missing tensor(s) "
                              f"{', '.join(missing[:5])}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{loc(unexpected[0])}: unexpected tensor(s) {', '.join(unexpected[:5])}{more}")
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise CheckpointError(f"{loc(k)}: tensor {k} has shape {list(found[k])}, the config expects "
                                  f"{list(shape)}")


def _iter_tensors(files: Iterable[Path], names: set[str], device: str) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the wanted names, one file open at a time."""
    from safetensors import safe_open

    for file in files:
        if file.suffix == ".bin":
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for k, v in sd.items():
                if k in names:
                    yield k, v
            continue
        try:
            with safe_open(str(file), framework="pt", device=device) as f:
                for k in f.keys():  # noqa: SIM118
                    if k in names:
                        yield k, f.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype of the first stored tensor (what "auto" loads as)."""
    files = weight_files(Path(path))
    name, file = next(iter(files.items()))
    for _, t in _iter_tensors([file], {name}, "cpu"):
        return t.dtype
    raise CheckpointError(f"{file}: no tensors")


def load_checkpoint(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> Phi:
    """Load a Phi model from an HF-layout directory (or hub id), in `dtype` (None: as stored) on `device`."""
    path = resolve_checkpoint(path)
    config = load_config(path)
    dtype = parse_dtype(dtype)
    files = weight_files(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(set(files.values())):
        shapes.update(_tensor_shapes(f))
    model = init_on_meta(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings and "lm_head.weight" not in shapes:
        shapes["lm_head.weight"] = shapes.get("model.embed_tokens.weight", ())
        files["lm_head.weight"] = files.get("model.embed_tokens.weight", path)
    check_state_dict_shapes(expected, shapes, files)
    device = str(device)
    sd: dict[str, torch.Tensor] = {}
    wanted = set(expected)
    for k, t in _iter_tensors(sorted(set(files.values())), wanted, device if device != "meta" else "cpu"):
        sd[k] = t.to(dtype=dtype or t.dtype, device=device)
    if config.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    if set(sd) != wanted:  # a file changed under us between the header check and the read
        raise CheckpointError(f"{path}: tensors {sorted(wanted - set(sd))[:5]} could not be read")
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) > 1:  # mixed storage (e.g. fp32 norms): bring everything to the weights' dtype
        target = dtype or sd["lm_head.weight"].dtype
        sd = {k: v.to(target) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.rotary.reset(device)
    model.eval()
    return model


def checkpoint_size_bytes(path: str | os.PathLike) -> int:
    """Bytes of weight files in a checkpoint directory."""
    return sum(f.stat().st_size for f in set(weight_files(Path(path)).values()))


# ---- the original microsoft/phi (remote-code "phi-msft" / MixFormer) layout ----------------------------------
_ORIG_IGNORED = {
    "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "flash_attn",
    "flash_rotary", "fused_dense", "img_processor", "checkpointing", "use_cache", "bos_token_id", "eos_token_id",
    "pad_vocab_size_multiple", "_name_or_path", "rotary_emb_scale_base", "architecture",
}


def config_from_original(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from an original microsoft/phi config.json (n_embd, n_layer, n_head, rotary_dim, ...)."""
    if raw.get("rotary_emb_scale_base"):
        raise ConfigError(f"{source}: rotary_emb_scale_base (xPos) is not supported")
    known = {"n_embd", "n_layer", "n_head", "n_head_kv", "n_inner", "n_positions", "rotary_dim", "vocab_size",
             "activation_function", "layer_norm_epsilon", "resid_pdrop", "embd_pdrop", "attn_pdrop",
             "initializer_range", "tie_word_embeddings"} | _ORIG_IGNORED
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) in original phi config: {', '.join(map(repr, unknown))}")
    d, h = raw["n_embd"], raw["n_head"]
    return ModelConfig(
        vocab_size=raw.get("vocab_size", 51200),
        hidden_size=d,
        intermediate_size=raw.get("n_inner") or 4 * d,
        num_hidden_layers=raw["n_layer"],
        num_attention_heads=h,
        num_key_value_heads=raw.get("n_head_kv") or h,
        partial_rotary_factor=raw.get("rotary_dim", 32) / (d // h),
        max_position_embeddings=raw.get("n_positions", 2048),
        layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        hidden_act=raw.get("activation_function", "gelu_new"),
        resid_pdrop=raw.get("resid_pdrop", 0.0),
        embd_pdrop=raw.get("embd_pdrop", 0.0),
        attention_dropout=raw.get("attn_pdrop", 0.0),
        initializer_range=raw.get("initializer_range", 0.02),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
    )


def original_to_hf_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename original phi tensors to HF names and split the fused Wqkv ([q | k | v] rows) into q/k/v_proj."""
    out: dict[str, torch.Tensor] = {}
    d = config.hidden_size
    kv = config.num_key_value_heads * config.head_dim
    for k, v in sd.items():
        if _IGNORED_KEYS.search(k):
            continue
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", k)
        if k == "transformer.embd.wte.weight":
            out["model.embed_tokens.weight"] = v
        elif k.startswith("lm_head.ln."):
            out["model.final_layernorm." + k.split(".")[-1]] = v
        elif k.startswith("lm_head.linear."):
            out["lm_head." + k.split(".")[-1]] = v
        elif m:
            i, rest = m.group(1), m.group(2)
            p = f"model.layers.{i}."
            if rest.startswith("ln."):
                out[p + "input_layernorm." + rest[3:]] = v
            elif rest.startswith("mixer.Wqkv."):
                kind = rest.split(".")[-1]
                if v.shape[0] != d + 2 * kv:
                    raise CheckpointError(f"tensor {k} has {v.shape[0]} rows, expected {d + 2 * kv} "
                                          f"(q {d} + k {kv} + v {kv})")
                q, kk, vv = v.split([d, kv, kv], dim=0)  # the rows are [q all heads | k all heads | v all heads]
                out[p + f"self_attn.q_proj.{kind}"] = q.clone()
                out[p + f"self_attn.k_proj.{kind}"] = kk.clone()
                out[p + f"self_attn.v_proj.{kind}"] = vv.clone()
            elif rest.startswith("mixer.out_proj."):
                out[p + "self_attn.dense." + rest.split(".")[-1]] = v
            elif rest.startswith(("mlp.fc1.", "mlp.fc2.")):
                out[p + rest] = v
            else:
                raise CheckpointError(f"tensor {k}: unknown original phi tensor name")
        else:
            raise CheckpointError(f"tensor {k}: unknown original phi tensor name")
    return out


def convert_original(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None) -> Path:
    """Convert an original microsoft/phi-1.5 / phi-2 (remote code) checkpoint directory to the HF layout."""
    src = resolve_checkpoint(src)
    cfg_file = src / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{src}: no config.json")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") == "phi" and "hidden_size" in raw:
        raise CheckpointError(f"{cfg_file}: already in the HF layout (model_type 'phi'); nothing to convert")
    config = config_from_original(raw, source=str(cfg_file))
    files = weight_files(src)
    sd: dict[str, torch.Tensor] = {}
    for k, t in _iter_tensors(sorted(set(files.values())), set(files), "cpu"):
        sd[k] = t
    hf = original_to_hf_state_dict(sd, config)
    del sd
    model = init_on_meta(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict_shapes(expected, {k: tuple(v.shape) for k, v in hf.items()}, str(src))
    target = parse_dtype(dtype)
    if target is not None:
        hf = {k: v.to(target) for k, v in hf.items()}
    model.load_state_dict(hf, strict=True, assign=True)
    model.rotary.reset("cpu")
    return save_checkpoint(model, out_dir, tokenizer=src)
