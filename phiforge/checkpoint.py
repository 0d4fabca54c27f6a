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
from phiforge.lm.spec import looks_like_hub_id
from phiforge.model import Phi, init_on_meta
from phiforge.readers import read_json

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
def resolve_checkpoint(spec: str | os.PathLike, *, offline: bool | None = None) -> Path:
    """A local directory, or a Hugging Face hub id ("org/name") downloaded into the HF cache (`offline`, default
    HF_HUB_OFFLINE: only found there).

    Only a name spelled as a hub id that is not a local path reaches the hub (`phiforge.lm.spec` says which);
    tests and the default run pass local directories."""
    from phiforge.lm.spec import hub_snapshot

    p = Path(spec)
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: expected a checkpoint directory (config.json + *.safetensors)")
        return p
    if looks_like_hub_id(spec):
        try:
            return hub_snapshot(str(spec), offline=offline,
                                patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"])
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    raise CheckpointError(f"{spec}: no such checkpoint directory")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (reads config.json only)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)")
    raw = _read_json(cfg_file)
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
        wm = read_json(index, what="a safetensors index", error=CheckpointError).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(f, str) and f and Path(f).name == f for f in wm.values()):
            raise CheckpointError(f"{index}: not a valid safetensors index (weight_map should map tensor names to "
                                  f"file names in this directory)")
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
        return {k: tuple(v.shape) for k, v in _load_bin(file).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch weights file (memory-mapped, tensors only), or a CheckpointError naming it."""
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated zip, a pickle of anything: one line
        raise CheckpointError(f"{file}: cannot read PyTorch weights ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return sd


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
            for k, v in _load_bin(file).items():
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
        header = _tensor_shapes(f)
        shapes.update(header)
        # An index that points a tensor at the wrong shard would otherwise surface as a confusing "missing".
        stray = [k for k, where in files.items() if where == f and k not in header]
        if stray:
            raise CheckpointError(f"{path / INDEX_NAME}: names {f.name} for tensor {stray[0]}, which that file "
                                  f"does not hold")
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
    check_finite(sd, files)
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) > 1:  # mixed storage (e.g. fp32 norms): bring everything to the weights' dtype
        target = dtype or sd["lm_head.weight"].dtype
        sd = {k: v.to(target) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.rotary.reset(device)
    model.eval()
    return model


def check_finite(sd: dict[str, torch.Tensor], files: dict[str, Path]) -> None:
    """A CheckpointError naming the first tensor (and its file) holding NaN or inf: such weights give garbage or
    NaN logits, never a usable model (a run that diverged, a bad conversion, a damaged file)."""
    bad = [k for k, t in sd.items() if t.is_floating_point() and t.device.type != "meta"
           and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise CheckpointError(f"{files.get(bad[0], '')}: tensor {bad[0]} holds NaN or inf values{more}: the "
                              f"weights are damaged (a diverged run?); use an earlier checkpoint")


def checkpoint_size_bytes(path: str | os.PathLike) -> int:
    """Bytes of weight files in a checkpoint directory."""
    return sum(f.stat().st_size for f in set(weight_files(Path(path)).values()))


# ---- the original microsoft/phi (remote-code "phi-msft" / MixFormer) layout ----------------------------------
# Keys of Microsoft's original configs that do not change the model: bookkeeping, kernel choices, and (later
# phyagi versions) training-time settings: checkpointing, context/tensor-parallel sizes, the token that
# separated packed samples in training.
_ORIG_IGNORED = {
    "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "flash_attn",
    "flash_rotary", "fused_dense", "img_processor", "checkpointing", "use_cache", "bos_token_id", "eos_token_id",
    "pad_vocab_size_multiple", "_name_or_path", "rotary_emb_scale_base", "architecture", "phyagi_version",
    "gradient_checkpointing", "cross_sample_token_id", "cp_size", "tp_size", "embd_layer",
}
# Original field -> ModelConfig field, for the fields that map one to one (errors name the original spelling).
_ORIG_FIELDS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                "n_head_kv": "num_key_value_heads", "n_inner": "intermediate_size",
                "n_positions": "max_position_embeddings", "vocab_size": "vocab_size",
                "layer_norm_epsilon": "layer_norm_eps", "activation_function": "hidden_act",
                "resid_pdrop": "resid_pdrop", "embd_pdrop": "embd_pdrop", "attn_pdrop": "attention_dropout",
                "initializer_range": "initializer_range", "tie_word_embeddings": "tie_word_embeddings"}


def config_from_original(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from an original microsoft/phi config.json (n_embd, n_layer, n_head, rotary_dim, ...)."""
    if raw.get("rotary_emb_scale_base"):
        raise ConfigError(f"{source}: rotary_emb_scale_base (xPos) is not supported")
    if raw.get("embd_layer", "default") != "default":
        raise ConfigError(f"{source}: embd_layer {raw['embd_layer']!r} is not supported (only 'default', the token "
                          f"embedding)")
    block = raw.get("architecture")
    if isinstance(block, dict) and block.get("block_cls", "parallel") != "parallel":
        raise ConfigError(f"{source}: architecture.block_cls {block['block_cls']!r} is not supported (Phi blocks "
                          f"are 'parallel')")
    unknown = sorted(set(raw) - set(_ORIG_FIELDS) - {"rotary_dim"} - _ORIG_IGNORED)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) in original phi config: {', '.join(map(repr, unknown))}")
    for name in ("n_embd", "n_layer", "n_head"):
        if not isinstance(raw.get(name), int) or isinstance(raw[name], bool) or raw[name] <= 0:
            raise ConfigError(f"{source}: original phi config field {name!r} must be a positive integer, "
                              f"got {raw.get(name)!r}")
    d, h = raw["n_embd"], raw["n_head"]
    rotary = raw.get("rotary_dim", 32)
    if not isinstance(rotary, int) or isinstance(rotary, bool) or not 0 <= rotary <= d // h:
        raise ConfigError(f"{source}: original phi config field 'rotary_dim' must be an integer in [0, head dim "
                          f"{d // h}], got {rotary!r}")
    fields = {new: raw[old] for old, new in _ORIG_FIELDS.items() if raw.get(old) is not None}
    fields.setdefault("intermediate_size", 4 * d)  # n_inner null: 4 x n_embd
    try:
        return ModelConfig(**fields, partial_rotary_factor=rotary / (d // h))
    except ConfigError as e:  # name the field as the file spells it
        msg = str(e)
        for old, new in _ORIG_FIELDS.items():
            msg = msg.replace(f"field {new!r}", f"field {old!r}")
        raise ConfigError(f"{source}: original phi config {msg.removeprefix('model config ')}") from None


def _sequential_to_parallel_name(k: str, n_layer: int) -> str:
    """The first phi-1 / phi-1.5 releases ("mixformer-sequential") number embedding, blocks and head as one
    list: layers.0 = embedding, layers.1..n_layer = blocks, layers.n_layer+1 = head. Map to transformer.h names."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", k)
    if not m:
        return k
    i, rest = int(m.group(1)), m.group(2)
    if i == 0:
        return "transformer.embd." + rest
    if i == n_layer + 1:
        return "lm_head." + rest
    return f"transformer.h.{i - 1}.{rest}"


_OLD_MLP_NAMES = {"mlp.fc_in.": "mlp.fc1.", "mlp.fc_out.": "mlp.fc2."}  # the earliest uploads' MLP names


def original_tensor_shapes(config: ModelConfig, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor an original checkpoint of `config` holds and its shape, spelled as the file (`names`) spells
    them: transformer.h.N.* or, in mixformer-sequential files, layers.N.*; mlp.fc1/fc2 or the older
    mlp.fc_in/fc_out. Checking a file's headers against this names its own tensors in every error."""
    names = set(names)
    sequential = any(k.startswith("layers.") for k in names)
    old_mlp = any(".mlp.fc_in." in k or ".mlp.fc_out." in k for k in names)
    d, f, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    fc1, fc2 = ("fc_in", "fc_out") if old_mlp else ("fc1", "fc2")
    embd, head = ("layers.0.", f"layers.{L + 1}.") if sequential else ("transformer.embd.", "lm_head.")
    out: dict[str, tuple[int, ...]] = {embd + "wte.weight": (V, d), head + "ln.weight": (d,), head + "ln.bias": (d,),
                                       head + "linear.weight": (V, d), head + "linear.bias": (V,)}
    for i in range(L):
        p = f"layers.{i + 1}." if sequential else f"transformer.h.{i}."
        out.update({p + "ln.weight": (d,), p + "ln.bias": (d,),
                    p + "mixer.Wqkv.weight": (d + 2 * kv, d), p + "mixer.Wqkv.bias": (d + 2 * kv,),
                    p + "mixer.out_proj.weight": (d, d), p + "mixer.out_proj.bias": (d,),
                    p + f"mlp.{fc1}.weight": (f, d), p + f"mlp.{fc1}.bias": (f,),
                    p + f"mlp.{fc2}.weight": (d, f), p + f"mlp.{fc2}.bias": (d,)})
    return out


def original_to_hf_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename original phi tensors to HF names and split the fused Wqkv ([q | k | v] rows) into q/k/v_proj.
    Errors name the tensor as the file does."""
    out: dict[str, torch.Tensor] = {}
    d = config.hidden_size
    kv = config.num_key_value_heads * config.head_dim
    for name, v in sd.items():
        if _IGNORED_KEYS.search(name):
            continue
        k = _sequential_to_parallel_name(name, config.num_hidden_layers)
        for old, new in _OLD_MLP_NAMES.items():
            k = k.replace("." + old, "." + new)
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
                    raise CheckpointError(f"tensor {name} has {v.shape[0]} rows, expected {d + 2 * kv} "
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
                raise CheckpointError(f"tensor {name}: unknown original phi tensor name")
        else:
            raise CheckpointError(f"tensor {name}: unknown original phi tensor name")
    return out


def convert_original(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert an original microsoft/phi-1 / phi-1.5 / phi-2 (remote code) checkpoint directory to the HF layout,
    copying its tokenizer files. `dtype` None keeps the stored dtype."""
    src = resolve_checkpoint(src)
    cfg_file = src / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{src}: no config.json")
    raw = _read_json(cfg_file)
    if raw.get("model_type") == "phi" and "hidden_size" in raw:
        raise CheckpointError(f"{cfg_file}: already in the HF layout (model_type 'phi'); nothing to convert")
    config = config_from_original(raw, source=str(cfg_file))
    target = parse_dtype(dtype)
    files = weight_files(src)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(set(files.values())):  # headers first: every name and shape checked before any data is read
        shapes.update(_tensor_shapes(f))
    check_state_dict_shapes(original_tensor_shapes(config, shapes), shapes, files)
    sd: dict[str, torch.Tensor] = {}
    for k, t in _iter_tensors(sorted(set(files.values())), set(files), "cpu"):
        sd[k] = t
    check_finite(sd, files)
    try:
        hf = original_to_hf_state_dict(sd, config)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    del sd
    model = init_on_meta(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict_shapes(expected, {k: tuple(v.shape) for k, v in hf.items()}, str(src))
    if target is not None:
        hf = {k: v.to(target) for k, v in hf.items()}
    model.load_state_dict(hf, strict=True, assign=True)
    model.rotary.reset("cpu")
    return save_checkpoint(model, out_dir, tokenizer=src, max_shard_bytes=max_shard_bytes)


def is_original_layout(path: str | os.PathLike) -> bool:
    """Whether a directory's config.json is an original microsoft/phi one (needs `phiforge convert`)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        return False
    raw = _read_json(cfg_file)
    return raw.get("model_type") in ("phi-msft", "mixformer-sequential") or "n_embd" in raw


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `src` as an HF-layout checkpoint in `out_dir`: original microsoft/phi layouts are converted, an
    HF-layout checkpoint is re-saved (to change its dtype or sharding). Tokenizer files are copied."""
    path = resolve_checkpoint(src)
    if is_original_layout(path):
        return convert_original(path, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    model = load_checkpoint(path, dtype=dtype)
    return save_checkpoint(model, out_dir, tokenizer=path, max_shard_bytes=max_shard_bytes)


def _read_json(file: Path) -> dict[str, Any]:
    return read_json(file, what="the model config", error=CheckpointError,
                     fix="restore it from where the checkpoint came from (or save the model again)")


# ---- a summary for `phiforge info` ----------------------------------------------------------------------------
def stored_dtypes(path: str | os.PathLike) -> dict[str, int]:
    """Stored dtype name -> number of tensors, from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}
    counts: dict[str, int] = {}
    for file in sorted(set(weight_files(Path(path)).values())):
        if file.suffix == ".bin":
            kinds = [dtype_name(v.dtype) for v in _load_bin(file).values()]
        else:
            try:
                with safe_open(str(file), framework="pt") as f:
                    kinds = [f.get_slice(k).get_dtype() for k in f.keys()]  # noqa: SIM118
            except Exception as e:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        for kind in kinds:
            kind = names.get(kind, kind)
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def summarize(spec: str | os.PathLike) -> dict[str, Any]:
    """What `phiforge info` prints, as a JSON-able dict: config, parameter counts, head/rotary dims, stored dtype,
    size on disk and tokenizer, for a checkpoint directory (HF or original layout), a hub id, a preset name or a
    config file. Reads headers and config files only, never tensor data."""
    from phiforge.config import PRESETS, load_model_config
    from phiforge.tokenizer import load_tokenizer, model_vocab_size

    out: dict[str, Any] = {"source": str(spec)}
    path: Path | None = None
    if str(spec) in PRESETS:
        out["kind"] = "preset"
        config = load_model_config(str(spec))
    elif Path(spec).is_file():
        out["kind"] = "config file"
        config = load_model_config(spec)
    else:
        if not Path(spec).exists() and not looks_like_hub_id(spec):
            raise CheckpointError(f"{spec}: not a preset ({', '.join(PRESETS)}), checkpoint directory or "
                                  f"config file")
        path = resolve_checkpoint(spec)
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}: no config.json (not a checkpoint directory, preset or config file; "
                                  f"presets: {', '.join(PRESETS)})")
        if is_original_layout(path):
            out["kind"] = "original microsoft/phi checkpoint (convert with `phiforge convert`)"
            config = config_from_original(_read_json(path / "config.json"), source=str(path / "config.json"))
        else:
            out["kind"] = "checkpoint"
            config = load_config(path)
        out["source"] = str(path)
    total, non_emb = config.num_params(), config.num_params(include_embedding=False)
    out["config"] = config.to_dict()
    out["head_dim"] = config.head_dim
    out["rotary_dim"] = config.rotary_dim
    out["params"] = {"total": total, "non_embedding": non_emb}
    out["size_if_stored"] = {name: total * torch.empty((), dtype=DTYPES[name]).element_size()
                             for name in ("float32", "bfloat16")}
    if path is not None:
        files = weight_files(path)
        dtypes = stored_dtypes(path)
        nbytes = checkpoint_size_bytes(path)
        out["weights"] = {"dtype": max(dtypes, key=lambda k: dtypes[k]) if dtypes else None,
                          "dtypes": dtypes, "files": len(set(files.values())), "tensors": len(files),
                          "bytes": nbytes, "size": human_bytes(nbytes)}
        tok_dir = path if (path / "tokenizer.json").exists() else None
    else:
        out["weights"] = None
        tok_dir = None
    if tok_dir is not None:
        tok = load_tokenizer(tok_dir)
        out["tokenizer"] = {"present": True, "size": len(tok), "padded_size": model_vocab_size(tok),
                            "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
                            "fits_model_vocab": len(tok) <= config.vocab_size,
                            "chat_template": tok.chat_template is not None}
    else:
        out["tokenizer"] = {"present": False}
    return out
