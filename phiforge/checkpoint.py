"""Checkpoints in the Hugging Face layout, and conversion from the original microsoft/phi layout.

A checkpoint is a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads:
    config.json                       model_type "phi"
    model.safetensors                 or model-0000K-of-0000N.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json (optional)

Loading builds the model on the meta device (no memory), checks every file, key and shape *before* reading any
tensor data, then reads tensors one at a time straight into their final storage (at the offsets the safetensors
header gives; a block of rows at a time where the dtype changes), so a phi-2 (5.6 GB fp16) never exists twice in
memory, and a bad file never gives a half-loaded model. `quant="int8"|"int4"` quantizes the linear layers and
the embedding as they are read (the float weights are never held whole: the peak is the quantized model plus a
block), and
`layout="decode"` lays the weights out the way the decode plan's kernels read them (no copies later). Errors
name the file and the tensor or field.
"""

from __future__ import annotations

import ctypes
import functools
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


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}
# A converted or quantized tensor is read this much at a time: small enough for a block and its temporaries to
# stay in the CPU's caches (measured: 2 MiB blocks quantize a 350 MB checkpoint to int8 ~2x faster than 16 MiB
# ones) and to keep the peak near the loaded model's own size.
READ_BLOCK_BYTES = 2 << 20


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (other C libraries)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc; elsewhere nothing). Why: a tensor's block
    temporaries are freed into glibc's heap, and the long-lived tensors allocated between them keep it from
    shrinking, so without this a streamed load's peak grows by blocks per layer (measured, a 350 MB fp32
    checkpoint loaded as int8: peak growth 2.6x the int8 model with 16 MiB blocks and no trim; 1.03x with 2 MiB
    blocks and a trim after each tensor)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _WeightReader:
    """Stored tensors, whole or a block of rows at a time, read from the weight files into memory the caller
    owns. Safetensors files are read with plain reads at the offsets their header gives: the process never maps
    or holds more of a file than the block it asked for (a memory map's touched pages count as the process's
    memory until unmapped), so a 5.6 GB checkpoint loads into a 1.5 GB int4 model without passing through 5.6
    GB. .bin files go through torch.load's memory map."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}
        self._handles: dict[Path, Any] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._bins.clear()

    def __enter__(self) -> _WeightReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _header(self, file: Path) -> tuple[int, dict[str, Any]]:
        if file not in self._headers:
            try:
                with open(file, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
            self._headers[file] = (8 + n, header)
        return self._headers[file]

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(stored dtype, shape) of a tensor, from its file's header."""
        file = self.files[name]
        if file.suffix == ".bin":
            t = self._bin(file)[name]
            return t.dtype, tuple(t.shape)
        entry = self._header(file)[1][name]
        if entry.get("dtype") not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {entry.get('dtype')!r}, which phiforge does not "
                                  f"read (choose F32, F16 or BF16 when saving)")
        return _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bins:
            self._bins[file] = _load_bin(file)
        return self._bins[file]

    def read_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of a stored tensor (the first dim; a 1-D tensor's elements), as stored, on the CPU."""
        file = self.files[name]
        if file.suffix == ".bin":
            return self._bin(file)[name][start:end]
        dtype, shape = self.info(name)
        out = torch.empty((end - start, *shape[1:]), dtype=dtype)
        self._read(name, start, out)
        return out

    def _read(self, name: str, start: int, out: torch.Tensor) -> None:
        """Fill contiguous CPU `out` (in the stored dtype) with the stored rows from `start` on, in one read."""
        if out.numel() == 0:
            return
        file = self.files[name]
        base, header = self._header(file)
        begin = header[name]["data_offsets"][0]
        row_bytes = out[0].numel() * out.element_size() if out.dim() > 1 else out.element_size()
        if file not in self._handles:
            self._handles[file] = open(file, "rb")  # noqa: SIM115 - closed by close()
        f = self._handles[file]
        f.seek(base + begin + start * row_bytes)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        got = f.readinto(view)
        if got != view.nbytes:
            raise CheckpointError(f"{file}: truncated: tensor {name} ends past the end of the file")

    def read_into(self, name: str, dest: torch.Tensor, block_bytes: int | None = None) -> None:
        """Fill `dest` (the stored shape; any dtype, device or strides) with a stored tensor, converting a block
        of rows (about `block_bytes` in fp32, default READ_BLOCK_BYTES) at a time, or reading straight into it
        when it is a contiguous CPU tensor of the stored dtype. NaN or inf in a floating-point tensor is a
        CheckpointError naming it."""
        dtype, shape = self.info(name)
        if tuple(dest.shape) != shape:
            raise CheckpointError(f"{self.files[name]}: tensor {name} has shape {list(shape)}, expected "
                                  f"{list(dest.shape)}")
        if dest.dim() == 0:
            block = self._whole(name)
            dest.copy_(block)
            self.check_finite(name, block)
            return
        rows = shape[0]
        step = max(1, (block_bytes or READ_BLOCK_BYTES) // (4 * max(dest[0].numel(), 1)))
        direct = self.files[name].suffix != ".bin" and dest.dtype == dtype and dest.device.type == "cpu" \
            and dest.is_contiguous()
        if direct:
            self._read(name, 0, dest)
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            if direct:
                block = dest[r0:r1]
            else:
                block = self.read_rows(name, r0, r1)
                dest[r0:r1].copy_(block)
            self.check_finite(name, block)

    def _whole(self, name: str) -> torch.Tensor:
        if self.files[name].suffix == ".bin":
            return self._bin(self.files[name])[name]
        dtype, shape = self.info(name)
        out = torch.empty(shape, dtype=dtype)
        self._read(name, 0, out.reshape(1))
        return out

    def check_finite(self, name: str, block: torch.Tensor) -> None:
        if block.is_floating_point() and block.device.type != "meta" and not bool(torch.isfinite(block).all()):
            raise CheckpointError(f"{self.files[name]}: tensor {name} holds NaN or inf values: the weights are "
                                  f"damaged (a diverged run?); use an earlier checkpoint")


def _iter_tensors(files: Iterable[Path], names: set[str], device: str, dtype: torch.dtype | None = None,
                  ) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the wanted names, file by file in stored order, each tensor read into its own
    new storage in `dtype` (None: as stored) on `device`: no other copy is made (see _WeightReader)."""
    files = list(files)
    where: dict[str, Path] = {}
    for file in files:
        if file.suffix == ".bin":
            where.update({k: file for k in _load_bin(file) if k in names})
        else:
            where.update({k: file for k in _tensor_shapes(file) if k in names})
    with _WeightReader(where) as reader:
        for file in files:
            for k in [k for k, f in where.items() if f == file]:
                stored, shape = reader.info(k)
                t = torch.empty(shape, dtype=dtype or stored, device=device)
                if device != "meta":
                    reader.read_into(k, t)
                    if t.dtype != stored:  # converted through block temporaries
                        release_freed_memory()
                yield k, t


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype of the first stored tensor (what "auto" loads as), from its file's header."""
    files = weight_files(Path(path))
    name = next(iter(files))
    with _WeightReader(files) as reader:
        return reader.info(name)[0]


LAYOUTS = ("module", "decode")


def load_checkpoint(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu", quant: str | None = None, group_size: int = 128,
                    layout: str = "module") -> Phi:
    """Load a Phi model from an HF-layout directory (or hub id), in `dtype` (None: as stored) on `device`.

    Tensors are read one at a time, straight into their final storage (converted a block of rows at a time), so
    the model never exists twice. `quant` "int8" / "int4" quantizes the linear layers and the token embedding while
    loading (serve/quant QuantLinear and QuantEmbedding, from the stored values, a block of rows at a time): peak
    memory is the quantized model plus a block, never the float model. `layout` "decode" lays the weights out for the decode plan's kernel
    (phiforge/decode/linear.py) so that it copies nothing: int8 q/k/v/fc1 as rows of one buffer, fp32 CPU weights
    as transposed views of one (in, out) matrix per group; the modules compute the same either way. "module"
    (default) gives plain contiguous parameters (what training and conversion want; quantized layers always
    share rows)."""
    from phiforge.serve.quant import MODES

    if quant in (None, "none"):
        quant = None
    elif quant not in MODES:
        raise ConfigError(f"unknown quantization {quant!r} (choose from none, {', '.join(MODES)})")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
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
    tied = config.tie_word_embeddings and "lm_head.weight" not in shapes
    if tied:
        shapes["lm_head.weight"] = shapes.get("model.embed_tokens.weight", ())
        files["lm_head.weight"] = files.get("model.embed_tokens.weight", path)
    check_state_dict_shapes(expected, shapes, files)
    device = str(device)
    stored = {k: f for k, f in files.items() if k in expected and not (tied and k == "lm_head.weight")}
    with _WeightReader(stored) as reader:
        # mixed storage (e.g. fp32 norms): everything in the weights' dtype, as the lm_head is stored
        target = dtype or reader.info("model.embed_tokens.weight" if tied else "lm_head.weight")[0]
        source = {k: k for k in stored}
        if tied:
            source["lm_head.weight"] = "model.embed_tokens.weight"
        done: set[str] = set()
        if device != "meta" and quant is not None:
            done = _load_quantized(model, reader, source, quant, group_size, target, device)
        elif device != "meta" and layout == "decode" and torch.device(device).type == "cpu" \
                and target == torch.float32:
            done = _load_transposed(model, reader, source, tied)
        rest = set(stored) - done
        for k, t in _iter_tensors(sorted(set(stored.values())), rest, device, target):
            _assign(model, k, t)
    if tied and "lm_head.weight" not in done:
        _assign(model, "lm_head.weight", model.model.embed_tokens.weight)
    model.rotary.reset(device)
    unread = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if unread and device != "meta":  # a file changed under us between the header check and the read
        raise CheckpointError(f"{path}: tensors {unread[:5]} could not be read")
    if quant is not None:
        model.quant_mode = quant
    model.eval()
    return model


def _assign(model: Phi, name: str, t: torch.Tensor) -> None:
    """Put `t` in the model as parameter or buffer `name` (what load_state_dict(assign=True) does, one tensor)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(
            t, requires_grad=old.requires_grad if old is not None else t.is_floating_point())
    else:
        module._buffers[attr] = t


def _linear_names(model: Phi, groups: list[list[tuple[torch.nn.Module, str]]]) -> list[list[str]]:
    """The qualified names (e.g. model.layers.0.self_attn.q_proj) of linear layers given as (parent, attribute)."""
    where = {id(m): n for n, m in model.named_modules()}
    return [[f"{where[id(parent)]}.{attr}".lstrip(".") for parent, attr in group] for group in groups]


def _load_quantized(model: Phi, reader: _WeightReader, source: dict[str, str], mode: str, group_size: int,
                    act_dtype: torch.dtype, device: str) -> set[str]:
    """Replace every linear layer of the (meta) model with a QuantLinear, and its token embedding with an int8
    QuantEmbedding, each filled from the stored weight a block of rows at a time; int8 q/k/v/fc1 share one buffer
    (serve/quant.share_rows). Returns the tensor names loaded."""
    from phiforge.serve.quant import QuantEmbedding, QuantLinear, linear_groups, share_rows

    groups = linear_groups(model)
    done: set[str] = set()
    # the token embedding too, in int8 (serve/quant.QuantEmbedding): at phi-2's shape it is 524 MB in fp32
    meta = model.model.embed_tokens
    emb = QuantEmbedding.empty(meta.num_embeddings, meta.embedding_dim, act_dtype=act_dtype, device=device)
    _fill_rows(reader, source["model.embed_tokens.weight"], emb, emb.num_embeddings, emb.embedding_dim)
    model.model.embed_tokens = emb
    done.add("model.embed_tokens.weight")
    release_freed_memory()
    for group, names in zip(groups, _linear_names(model, groups)):
        made = []
        for (parent, attr), name in zip(group, names):
            meta = getattr(parent, attr)
            try:
                ql = QuantLinear.empty(meta.in_features, meta.out_features, mode, group_size=group_size,
                                       act_dtype=act_dtype, device=device, bias=meta.bias is not None)
            except ValueError as e:  # e.g. int4 and an input width no group size divides
                raise ConfigError(f"{name}: cannot quantize to {mode}: {e}") from None
            setattr(parent, attr, ql)
            made.append(ql)
        share_rows(made)  # before filling: it moves the empty buffers, so nothing is copied twice
        for ql, name in zip(made, names):
            _fill_rows(reader, source[f"{name}.weight"], ql, ql.out_features, ql.in_features)
            if ql.bias is not None:
                reader.read_into(source[f"{name}.bias"], ql.bias.data)
            done |= {f"{name}.weight", f"{name}.bias"}
            release_freed_memory()  # the blocks' float temporaries (see there)
    return done


def _fill_rows(reader: _WeightReader, name: str, module: Any, rows: int, width: int) -> None:
    """Fill a quantized module (QuantLinear / QuantEmbedding: `load_rows(start, block)`) from stored tensor `name`
    (rows, width), a block of rows at a time, each block checked for inf and NaN."""
    from phiforge.serve.quant import block_rows

    step = block_rows(width)
    for r0 in range(0, rows, step):
        block = reader.read_rows(name, r0, min(r0 + step, rows))
        reader.check_finite(name, block)
        module.load_rows(r0, block)


def _load_transposed(model: Phi, reader: _WeightReader, source: dict[str, str], tied: bool) -> set[str]:
    """fp32 CPU weights in the decode plan's "t" layout: per group of linears reading one input (q|k|v|fc1,
    dense, fc2, lm_head) one contiguous (in, sum of out) matrix, each layer's weight its transposed column block
    (decode/linear.cols_view finds it; F.linear runs on it as on any strided weight). Returns the names loaded."""
    from phiforge.serve.quant import linear_groups

    groups = linear_groups(model, include_lm_head=not tied)  # a tied lm_head is the embedding's rows
    done: set[str] = set()
    for group, names in zip(groups, _linear_names(model, groups)):
        linears = [getattr(parent, attr) for parent, attr in group]
        matrix = torch.empty(linears[0].in_features, sum(lin.out_features for lin in linears), dtype=torch.float32)
        col = 0
        for lin, name in zip(linears, names):
            weight = matrix[:, col:col + lin.out_features].t()  # (out, in), strides (1, sum of out)
            col += lin.out_features
            reader.read_into(source[f"{name}.weight"], weight)
            _assign(model, f"{name}.weight", weight)
            done.add(f"{name}.weight")
        release_freed_memory()
    return done


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
