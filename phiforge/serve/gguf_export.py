"""Export a Phi checkpoint to GGUF for llama.cpp's `phi2` architecture.

Tensor names follow llama.cpp's phi2 map (gguf.MODEL_ARCH.PHI2 / gguf.TENSOR_NAMES):

    model.embed_tokens.weight                -> token_embd.weight
    model.layers.N.input_layernorm.{w,b}     -> blk.N.attn_norm.{weight,bias}
    model.layers.N.self_attn.{q,k,v}_proj    -> blk.N.attn_qkv.{weight,bias}   (fused: rows q | k | v)
    model.layers.N.self_attn.dense           -> blk.N.attn_output.{weight,bias}
    model.layers.N.mlp.fc1 / fc2             -> blk.N.ffn_up / blk.N.ffn_down .{weight,bias}
    model.final_layernorm                    -> output_norm.{weight,bias}
    lm_head                                  -> output.{weight,bias}

Types: --quant f16 stores 2-D weights in f16 and norms/biases in f32 (as llama.cpp's converter does); q8_0
stores 2-D weights whose row length is a multiple of 32 as Q8_0 blocks (32 int8 + one f16 scale), the rest
as f16/f32. The tokenizer goes in as llama.cpp's "gpt2" BPE model: tokens (padded with [PADn] up to the
embedding rows, as llama.cpp's converter pads Phi-2's 50295 tokens to 51200), token types, merges, bos/eos ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from phiforge.errors import PhiforgeError

QUANTS = ("f32", "f16", "q8_0")


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


def export_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, quant: str = "f16") -> Path:
    """Write `model_dir` (weights + tokenizer) as a llama.cpp phi2 GGUF file at `out_file` (atomically)."""
    import gguf
    import numpy as np
    import torch

    from phiforge.checkpoint import load_checkpoint, resolve_checkpoint
    from phiforge.progress import progress
    from phiforge.tokenizer import load_tokenizer

    if quant not in QUANTS:
        raise PhiforgeError(f"--quant {quant!r}: choose from {', '.join(QUANTS)}")
    path = Path(resolve_checkpoint(model_dir))
    if not (path / "tokenizer.json").exists():
        raise PhiforgeError(f"{path}: no tokenizer.json; GGUF files carry the tokenizer, save it with the model")
    tokenizer = load_tokenizer(path)
    model = load_checkpoint(path, dtype=torch.float32)
    cfg = model.config
    if cfg.qk_layernorm or cfg.num_key_value_heads != cfg.num_attention_heads:
        raise PhiforgeError(f"{path}: llama.cpp's phi2 architecture has no qk_layernorm and no grouped-query "
                            f"attention; this model uses {'qk_layernorm' if cfg.qk_layernorm else 'GQA'}")
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    tensors: dict[str, np.ndarray] = {}
    names = tensor_map(cfg.num_hidden_layers)
    qkv = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_QKV]
    for i in range(cfg.num_hidden_layers):
        a = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):  # fused rows: q | k | v
            tensors[qkv.format(bid=i) + f".{kind}"] = np.concatenate(
                [sd[f"{a}{p}_proj.{kind}"] for p in ("q", "k", "v")], axis=0)
    for ours, theirs in names.items():
        tensors[theirs] = sd[ours]

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
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
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

    for name, arr in progress(tensors.items(), total=len(tensors), desc="gguf", unit="tensor"):
        arr = np.ascontiguousarray(arr)
        if arr.ndim < 2 or quant == "f32":
            w.add_tensor(name, arr.astype(np.float32))
        elif quant == "q8_0" and arr.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr.astype(np.float16))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, out)
    return out
