"""Export a Phi checkpoint to GGUF for llama.cpp's `phi2` architecture.

Tensor names follow llama.cpp's phi2 map (gguf.MODEL_ARCH.PHI2 / gguf.TENSOR_NAMES):

    model.embed_tokens.weight                -> token_embd.weight
    model.layers.N.input_layernorm.{w,b}     -> blk.N.attn_norm.{weight,bias}
    model.layers.N.self_attn.{q,k,v}_proj    -> blk.N.attn_qkv.{weight,bias}   (fused: rows q | k | v)
    model.layers.N.self_attn.dense           -> blk.N.attn_output.{weight,bias}
    model.layers.N.mlp.fc1 / fc2             -> blk.N.ffn_up / blk.N.ffn_down .{weight,bias}
    model.final_layernorm                    -> output_norm.{weight,bias}
    lm_head                                  -> output.{weight,bias}

Types: --quant f16 stores 2-D weights in f16 and norms/biases in f32 (as llama.cpp's converter does); q8_0 and
q4_0 store every 2-D weight whose row length is a multiple of 32 (the embedding and the output too: "pure", equal
bits everywhere) as ggml's blocks of 32, the rest as f16/f32:
  q8_0: 32 int8 q = round(w / d) and an f16 d = max|w| / 127 (34 bytes, 8.5 bits a weight);
  q4_0: an f16 d = m / -8 where m is the block's signed extreme (the first of equal magnitudes), then 16 bytes of
        codes trunc(w / d + 8.5) clamped to 15, the first 16 weights in the low nibbles, the last 16 in the high
        (18 bytes, 4.5 bits a weight); w ~= d (code - 8).
Tensors are read one at a time from the safetensors files and written as they are converted, so exporting holds
one tensor (in fp32) and its converted copy, not the model. The tokenizer goes in as llama.cpp's "gpt2" BPE model:
tokens (padded with [PADn] up to the embedding rows, as llama.cpp's converter pads Phi-2's 50295 tokens to 51200),
token types, merges, bos/eos ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiforge.errors import PhiforgeError

if TYPE_CHECKING:
    import numpy as np

QUANTS = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # weights per q8_0 / q4_0 block
_CHUNK = 1 << 16  # blocks converted at a time: bounds the temporaries to a few MB whatever the tensor


def tensor_map(num_layers: int) -> dict[str, str]:
    """Our (HF) tensor name -> GGUF phi2 name, for everything except q/k/v (fused separately)."""
    import gguf

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    out = {"model.embed_tokens.weight": names[T.TOKEN_EMBD] + ".weight",
           "model.final_layernorm.weight": names[T.OUTPUT_NORM] + ".weight",
           "model.final_layernorm.bias": names[T.OUTPUT_NORM] + ".bias",
           "lm_head.weight": names[T.OUTPUT] + ".weight", "lm_head.bias": names[T.OUTPUT] + ".bias"}
    for i in range(num_layers):
        src = f"model.layers.{i}."
        for ours, theirs in (("input_layernorm", T.ATTN_NORM), ("self_attn.dense", T.ATTN_OUT),
                             ("mlp.fc1", T.FFN_UP), ("mlp.fc2", T.FFN_DOWN)):
            for kind in ("weight", "bias"):
                out[f"{src}{ours}.{kind}"] = names[theirs].format(bid=i) + f".{kind}"
    return out


def _blocks(w: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], nbytes: int) -> np.ndarray:
    """fn applied to w's blocks of 32 (rows of a (n, 32) fp32 view), _CHUNK blocks at a time -> (rows, K/32*nbytes)"""
    import numpy as np

    rows, K = w.shape
    b = w.reshape(-1, BLOCK)
    out = np.empty((b.shape[0], nbytes), np.uint8)
    for s in range(0, b.shape[0], _CHUNK):
        out[s:s + _CHUNK] = fn(b[s:s + _CHUNK].astype(np.float32))
    return out.reshape(rows, K // BLOCK * nbytes)


def _q4_0_blocks(b: np.ndarray) -> np.ndarray:
    import numpy as np

    m = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)  # the signed extreme (first on ties)
    d = m / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    # fp32 product and sum, truncated, as ggml's C reference (values are >= 0.5 here: trunc is floor)
    q = np.minimum(np.trunc(b * inv + np.float32(8.5)), 15).astype(np.uint8)
    out = np.empty((b.shape[0], 18), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out


def _q8_0_blocks(b: np.ndarray) -> np.ndarray:
    import numpy as np

    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    out = np.empty((b.shape[0], 34), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    v = b * inv
    out[:, 2:] = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8).view(np.uint8)  # C's roundf
    return out


def quantize_q4_0(w: np.ndarray) -> np.ndarray:
    """(rows, K) float weights, K a multiple of 32 -> (rows, K / 32 * 18) uint8: ggml's Q4_0 blocks."""
    return _blocks(w, _q4_0_blocks, 18)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """(rows, K / 32 * 18) uint8 Q4_0 blocks -> (rows, K) fp32 weights, d (code - 8)."""
    import numpy as np

    rows = raw.shape[0]
    b = raw.reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    codes = np.concatenate([b[:, 2:] & 15, b[:, 2:] >> 4], axis=1).astype(np.float32) - 8
    return (d * codes).reshape(rows, -1)


def _vocab(tokenizer: Any, n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer, padded to the embedding's `n_rows`."""
    import gguf

    spec = json.loads(tokenizer.backend.to_str())
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    n = len(tokenizer)
    if n > n_rows:
        raise PhiforgeError(f"tokenizer has {n} tokens but the model's embedding only {n_rows} rows")
    tokens, types = [], []
    for i in range(n_rows):
        piece = tokenizer.id_to_token(i) if i < n else None
        if piece is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(piece)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
    merges = spec["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # tokenizers >= 0.20 writes pairs
    return tokens, [int(t) for t in types], merges


class _Source:
    """Our tensors by name, in fp32 numpy, one at a time: from the safetensors files (streamed), else from a model
    loaded whole (.bin checkpoints)."""

    def __init__(self, path: Path) -> None:
        from phiforge.checkpoint import weight_files

        self.path, self.model, self.handles = path, None, {}
        files = weight_files(path)
        if all(f.suffix == ".safetensors" for f in files.values()):
            self.files = files
        else:  # .bin: the loader's torch.load memory map, the model whole
            from phiforge.checkpoint import load_checkpoint

            self.model = load_checkpoint(path)
            self.sd = dict(self.model.state_dict())
            self.files = {k: path for k in self.sd}
        if "lm_head.weight" not in self.files and "model.embed_tokens.weight" in self.files:  # tied
            self.files["lm_head.weight"] = self.files["model.embed_tokens.weight"]
            self.alias = {"lm_head.weight": "model.embed_tokens.weight"}
        else:
            self.alias = {}

    def shape(self, name: str) -> tuple[int, ...]:
        name = self.alias.get(name, name)
        if self.model is not None:
            return tuple(self.sd[name].shape)
        return tuple(self._handle(name).get_slice(name).get_shape())

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = safe_open(str(file), framework="pt")
        return self.handles[file]

    def get(self, name: str) -> np.ndarray:
        name = self.alias.get(name, name)
        t = self.sd[name] if self.model is not None else self._handle(name).get_tensor(name)
        return t.detach().float().numpy()

    def close(self) -> None:
        self.handles.clear()


def _plan(src: _Source, num_layers: int) -> list[tuple[str, list[str]]]:
    """(GGUF name, our names concatenated along dim 0) in the order written."""
    import gguf

    names = tensor_map(num_layers)
    by_gguf = {v: [k] for k, v in names.items()}
    qkv = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_QKV]
    for i in range(num_layers):
        a = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):  # fused rows: q | k | v
            by_gguf[qkv.format(bid=i) + f".{kind}"] = [f"{a}{p}_proj.{kind}" for p in "qkv"]
    missing = sorted({k for ks in by_gguf.values() for k in ks} - set(src.files))
    if missing:
        raise PhiforgeError(f"{src.path}: no tensor {missing[0]} in the checkpoint ({len(missing)} missing); "
                            f"is this a Phi checkpoint in the Hugging Face layout?")
    return list(by_gguf.items())


def export_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, quant: str = "f16") -> Path:
    """Write `model_dir` (weights + tokenizer) as a llama.cpp phi2 GGUF file at `out_file` (atomically)."""
    import gguf
    import numpy as np

    from phiforge.checkpoint import load_config, resolve_checkpoint
    from phiforge.progress import progress
    from phiforge.tokenizer import load_tokenizer

    if quant not in QUANTS:
        raise PhiforgeError(f"--quant {quant!r}: choose from {', '.join(QUANTS)}")
    path = Path(resolve_checkpoint(model_dir))
    if not (path / "tokenizer.json").exists():
        raise PhiforgeError(f"{path}: no tokenizer.json; GGUF files carry the tokenizer, save it with the model")
    tokenizer = load_tokenizer(path)
    cfg = load_config(path)
    if cfg.qk_layernorm or cfg.num_key_value_heads != cfg.num_attention_heads:
        raise PhiforgeError(f"{path}: llama.cpp's phi2 architecture has no qk_layernorm and no grouped-query "
                            f"attention; this model uses {'qk_layernorm' if cfg.qk_layernorm else 'GQA'}")
    src = _Source(path)
    plan = _plan(src, cfg.num_hidden_layers)
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(quant)
    convert = {"q8_0": (_q8_0_blocks, 34), "q4_0": (_q4_0_blocks, 18)}.get(quant)

    def kind(shape: tuple[int, ...]) -> str:
        if len(shape) < 2 or quant == "f32":
            return "f32"
        return quant if qtype is not None and shape[-1] % BLOCK == 0 else "f16"

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI2]
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(path.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types, merges = _vocab(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex, as in our (and CodeGen's) tokenizer
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_unk_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

    # the tensor table first (shapes from the files' headers), then each tensor's data, converted one at a time
    kinds = []
    for name, parts in plan:
        shapes = [src.shape(p) for p in parts]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        k = kind(shape)
        n = int(np.prod(shape))
        if k in ("q8_0", "q4_0"):
            w.add_tensor_info(name, shape, np.dtype(np.float32), n // BLOCK * convert[1], raw_dtype=qtype)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32 if k == "f32" else np.float16), n * (4 if k == "f32"
                                                                                                   else 2))
        kinds.append(k)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (_, parts), k in progress(list(zip(plan, kinds, strict=True)), total=len(plan), desc="gguf",
                                      unit="tensor"):
            arr = np.concatenate([src.get(p) for p in parts]) if len(parts) > 1 else src.get(parts[0])
            if k in ("q8_0", "q4_0"):
                arr = _blocks(arr.reshape(-1, arr.shape[-1]), *convert)
            else:
                arr = np.ascontiguousarray(arr, dtype=np.float32 if k == "f32" else np.float16)
            w.write_tensor_data(arr)
            del arr
    finally:
        w.close()
        src.close()
    os.replace(tmp, out)
    return out
