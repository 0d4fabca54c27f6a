"""Loading a GGUF file into a transformers model and tokenizer, fast, and exactly as transformers would.

transformers' own GGUF path (`from_pretrained(..., gguf_file=...)`) parses the file's metadata several times over
(config, tokenizer, weights: the 49k-entry token and merge arrays each time, one Python object per element),
converts the tokenizer through its slow-tokenizer machinery, and initialises every weight at random before
overwriting it. Here the file is parsed once by a lean reader (`read_gguf`), the common tensor types (F32, F16,
BF16, Q4_0, Q4_1, Q8_0) are dequantized with vectorised torch ops, the model is built on the meta device and
given the dequantized tensors (no random init), and the tokenizer is built directly with the `tokenizers`
library from the file's vocabulary, merges and special tokens.

The bar is identity with transformers' load: the same state dict (bit for bit, llama.cpp's Q/K row permutation
undone as transformers undoes it), config, tokenizer (vocabulary, merges, added tokens, pre-tokenizer, special
tokens, chat template) and so the same logits and token ids. Whatever this module does not know (another
architecture, a K-quant or other tensor type, an unmapped tensor, a sentencepiece vocabulary, a pre-tokenizer
whose split is not known here) goes to transformers' own path, with a warning and a note in
`model.phiforge_gguf_load` (which `phiforge.eval.results.model_identity` writes into results.json).
"""

from __future__ import annotations

import logging
import mmap
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from phiforge.errors import CheckpointError

log = logging.getLogger(__name__)

LOAD_INFO_ATTR = "phiforge_gguf_load"  # the attribute of a loaded model saying who loaded and dequantized it

# ggml tensor types dequantized here: type id -> (name, elements per block, bytes per block)
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
TENSOR_TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), BF16: ("BF16", 1, 2), Q4_0: ("Q4_0", 32, 18),
                Q4_1: ("Q4_1", 32, 20), Q8_0: ("Q8_0", 32, 34)}

# metadata value types: fixed-size scalars (struct format, numpy dtype); 8 is a string, 9 an array
_SCALARS = {0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
            5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
            12: ("<d", "<f8")}
_STRING, _ARRAY = 8, 9


class Unsupported(Exception):
    """Something this module does not load itself; transformers' own path takes the file (or its tokenizer)."""


# ---- the file ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: its shape in torch order (slowest dimension first), ggml type, absolute offset."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata (numeric arrays as numpy arrays, string arrays as lists), the tensor table,
    and the file mapped copy-on-write (tensor bytes are read only when a tensor is asked for)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: Any

    def raw(self, info: TensorInfo):
        """The tensor's bytes as a uint8 torch tensor over the mapped file (no copy)."""
        import torch

        if info.ggml_type not in TENSOR_TYPES:
            raise Unsupported(f"tensor {info.name} has ggml type {info.ggml_type}")
        _, per_block, block_bytes = TENSOR_TYPES[info.ggml_type]
        n = prod(info.shape)
        if info.shape and info.shape[-1] % per_block:
            raise CheckpointError(f"{self.path}: tensor {info.name}'s rows of {info.shape[-1]} are not whole "
                                  f"{TENSOR_TYPES[info.ggml_type][0]} blocks; the file is corrupt")
        nbytes = n // per_block * block_bytes
        if info.offset + nbytes > len(self.buffer):
            raise CheckpointError(f"{self.path}: tensor {info.name} runs past the end of the file (truncated "
                                  f"download?); fetch the file again")
        return torch.frombuffer(self.buffer, dtype=torch.uint8, count=nbytes, offset=info.offset)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor table) once; a file that is not GGUF, or is cut short,
    is a CheckpointError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except ValueError:  # mmap of an empty file
        raise CheckpointError(f"{path}: empty file, not a GGUF model; fetch the file again") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if buf[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return _parse(path, buf)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError, OverflowError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF header ({e}); fetch the file again") from None


def _parse(path: Path, buf) -> GGUFFile:
    unpack = struct.unpack_from
    version, n_tensors, n_kv = unpack("<IQQ", buf, 4)
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} (only versions 2 and 3 are read); convert it again "
                              f"with a current llama.cpp")
    pos = 24

    def string(pos: int) -> tuple[str, int]:
        (n,) = unpack("<Q", buf, pos)
        end = pos + 8 + n
        if end > len(buf):
            raise ValueError("a string runs past the end of the file")
        return buf[pos + 8:end].decode("utf-8"), end

    def value(pos: int, vtype: int) -> tuple[Any, int]:
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype][0]
            return unpack(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return string(pos)
        if vtype == _ARRAY:
            etype, n = unpack("<IQ", buf, pos)
            pos += 12
            if etype in _SCALARS:
                import numpy as np

                dt = np.dtype(_SCALARS[etype][1])
                if pos + n * dt.itemsize > len(buf):
                    raise ValueError("an array runs past the end of the file")
                return np.frombuffer(buf, dtype=dt, count=n, offset=pos).copy(), pos + n * dt.itemsize
            out = []
            if etype == _STRING:  # the vocabulary and the merges: the one loop this reader cannot avoid
                for _ in range(n):
                    (k,) = unpack("<Q", buf, pos)
                    out.append(buf[pos + 8:pos + 8 + k].decode("utf-8"))
                    pos += 8 + k
                if pos > len(buf):
                    raise ValueError("a string array runs past the end of the file")
                return out, pos
            for _ in range(n):
                v, pos = value(pos, etype)
                out.append(v)
            return out, pos
        raise ValueError(f"unknown metadata value type {vtype}")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = unpack("<I", buf, pos)
        metadata[key], pos = value(pos + 4, vtype)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (ndim,) = unpack("<I", buf, pos)
        dims = unpack(f"<{ndim}Q", buf, pos + 4)
        ttype, offset = unpack("<IQ", buf, pos + 4 + 8 * ndim)
        pos += 16 + 8 * ndim
        infos.append((name, tuple(reversed(dims)), ttype, offset))  # ggml lists the fastest dimension first
    align = int(metadata.get("general.alignment", 32))
    data_start = (pos + align - 1) // align * align
    tensors = {name: TensorInfo(name, shape, t, data_start + off) for name, shape, t, off in infos}
    return GGUFFile(path, version, metadata, tensors, buf)


# ---- dequantization ---------------------------------------------------------------------------------------------
_CHUNK_BLOCKS = 1 << 14  # blocks dequantized per step, so that the step's temporaries stay in cache


def dequantize(raw, ggml_type: int, shape: tuple[int, ...]):
    """float32 values of one tensor from its raw bytes, bit-identical to gguf-py's `dequantize` (what
    transformers uses): each block's fp16 scale (and Q4_1's minimum) widened to float32, then `d * q` (`+ m`),
    every operation rounded on its own, as numpy does it."""
    import torch

    if ggml_type == F32:
        return raw.clone().view(torch.float32).reshape(shape)
    if ggml_type in (F16, BF16):
        return raw.clone().view(torch.float16 if ggml_type == F16 else torch.bfloat16).float().reshape(shape)
    if ggml_type not in TENSOR_TYPES:
        raise Unsupported(f"ggml type {ggml_type}")
    _, per_block, block_bytes = TENSOR_TYPES[ggml_type]
    blocks = raw.view(-1, block_bytes)
    out = torch.empty((blocks.shape[0], per_block), dtype=torch.float32)
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        b, o = blocks[s:s + _CHUNK_BLOCKS], out[s:s + _CHUNK_BLOCKS]
        d = b[:, 0:2].contiguous().view(torch.float16).float()  # (n, 1)
        if ggml_type == Q8_0:
            o.copy_(b[:, 2:].view(torch.int8)).mul_(d)
            continue
        qs = b[:, 4:] if ggml_type == Q4_1 else b[:, 2:]
        # element j of a block is the low nibble of byte j for j < 16, the high nibble of byte j - 16 after
        o[:, :16].copy_(qs & 0x0F)
        o[:, 16:].copy_(qs >> 4)
        if ggml_type == Q4_0:
            o.sub_(8.0).mul_(d)
        else:
            o.mul_(d).add_(b[:, 2:4].contiguous().view(torch.float16).float())
    return out.reshape(shape)


def unpermute_rows(w, n_head: int):
    """Undo llama.cpp's row order for rotary Q/K weights: within each head, it interleaves the two halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- llama: config, names, model --------------------------------------------------------------------------------
# GGUF metadata -> transformers LlamaConfig fields, as transformers maps them (integrations/ggml.py)
_LLAMA_CONFIG = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
                 "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
                 "rope.dimension_count": "head_dim", "rope.freq_base": "rope_theta",
                 "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
                 "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size"}
_TOKEN_IDS = {"ggml.bos_token_id": "bos_token_id", "ggml.eos_token_id": "eos_token_id",
              "ggml.unknown_token_id": "unk_token_id", "ggml.padding_token_id": "pad_token_id"}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def llama_config_dict(f: GGUFFile) -> dict[str, Any]:
    """The LlamaConfig fields transformers derives from this file's metadata (Unsupported if not llama)."""
    md = f.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise Unsupported(f"architecture {arch!r}")
    if md.get("general.name") == "mistral":  # transformers loads exactly this name as a Mistral model
        raise Unsupported("a llama file named 'mistral'")
    cfg: dict[str, Any] = {"model_type": "llama", "tie_word_embeddings": "output.weight" not in f.tensors}
    for key, val in md.items():
        prefix, _, rest = key.partition(".")
        if key == "general.name":
            cfg["_model_name_or_path"] = val
        elif prefix == "llama" and rest in _LLAMA_CONFIG:
            cfg[_LLAMA_CONFIG[rest]] = val
        elif prefix == "tokenizer" and rest in _TOKEN_IDS:
            cfg[_TOKEN_IDS[rest]] = val
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in md:
        cfg["vocab_size"] = len(md["tokenizer.ggml.tokens"])
    if cfg.get("num_attention_heads") is None or cfg.get("num_key_value_heads") is None:
        # transformers then leaves llama.cpp's Q/K row order as is; not a model worth reproducing exactly
        raise Unsupported("no attention head counts in the metadata")
    return cfg


def _hf_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _LLAMA_TOP and suffix in ("weight", "bias"):
        return f"{_LLAMA_TOP[stem]}.{suffix}"
    m = _BLOCK_NAME.fullmatch(gguf_name)
    if m and m.group(2) in _LLAMA_BLOCK:
        return f"model.layers.{m.group(1)}.{_LLAMA_BLOCK[m.group(2)]}.{m.group(3)}"
    raise Unsupported(f"tensor {gguf_name} has no llama mapping here")


def _map_single_threaded_ops(fn, items: list) -> list:
    """`[fn(x) for x in items]` on torch.get_num_threads() Python threads, each running single-threaded torch
    ops (they release the GIL). Many small multi-threaded ops instead meet at an OpenMP barrier each, which on a
    machine with other work to do costs 5-10x (measured: 1.7 s single-threaded vs 9-19 s on 2 threads)."""
    import torch

    n = torch.get_num_threads()
    if n <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(n)


@contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)  # transformers builds the model under the load dtype; so do we
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_llama(f: GGUFFile, dtype, name_or_path: str = ""):
    """A LlamaForCausalLM holding the file's weights dequantized to `dtype`, built on the meta device (no random
    init) and given the tensors with `load_state_dict(assign=True)`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = llama_config_dict(f)
    names = {g: _hf_name(g) for g in f.tensors}  # Unsupported before any work for an unmapped tensor
    for info in f.tensors.values():
        if info.ggml_type not in TENSOR_TYPES:
            raise Unsupported(f"tensor {info.name} is stored as ggml type {info.ggml_type}")
    config = LlamaConfig(**cfg)
    config.name_or_path = name_or_path
    config.dtype = dtype
    with _default_dtype(dtype), torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k: v for k, v in model.state_dict().items()}
    tied = config.tie_word_embeddings
    wanted = set(expected) - ({"lm_head.weight"} if tied else set())
    if set(names.values()) != wanted:
        missing, extra = sorted(wanted - set(names.values())), sorted(set(names.values()) - wanted)
        raise Unsupported(f"the file's tensors do not match the model's (missing {missing[:3]}, extra {extra[:3]})")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for gguf_name, info in f.tensors.items():
        hf = names[gguf_name]
        if tuple(expected[hf].shape) != info.shape:
            raise Unsupported(f"tensor {gguf_name} has shape {info.shape}, the model wants "
                              f"{tuple(expected[hf].shape)}")

    def load(gguf_name: str):
        info = f.tensors[gguf_name]
        raw = f.raw(info)
        n_head = heads if ".attn_q." in gguf_name else kv_heads if ".attn_k." in gguf_name else None
        if n_head and len(info.shape) == 2:  # whole rows are whole blocks: reorder the bytes, not the floats
            raw = unpermute_rows(raw.view(info.shape[0], -1), n_head).reshape(-1)
        w = dequantize(raw, info.ggml_type, info.shape)
        if n_head and len(info.shape) != 2:
            w = unpermute_rows(w, n_head)
        return names[gguf_name], w.to(dtype)

    state = dict(_map_single_threaded_ops(load, list(f.tensors)))
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (the rotary inverse frequencies) were computed on the meta device: rebuild their
    # modules for real (cheap: no parameters in them).
    for mod_name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            if any(True for _ in mod.parameters(recurse=False)) or not hasattr(mod, "config"):
                raise Unsupported(f"module {mod_name} holds buffers this loader cannot rebuild")
            model.set_submodule(mod_name, type(mod)(config=mod.config))
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise Unsupported("some weights were left unloaded")
    return model.eval()


# ---- tokenizer --------------------------------------------------------------------------------------------------
# Pre-tokenizer splits, by the file's `tokenizer.ggml.pre`, as transformers' GGUF tokenizer reads them
# (tests/test_gguf_load.py checks both tables against the installed transformers): with no split of its own a
# byte-level vocabulary gets GPT-2's ByteLevel regex; other pre-tokenizer names go to transformers.
GPT2_DEFAULT_PRE = (None, "default", "gpt-2", "gpt2", "smollm", "starcoder", "refact")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the rest for chr(256 + k)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def build_tokenizer(f: GGUFFile, name_or_path: str = ""):
    """A PreTrainedTokenizerFast for a byte-level BPE vocabulary (`tokenizer.ggml.model` gpt2), built with the
    `tokenizers` library the way transformers' GGUF tokenizer is: vocabulary (tokens outside the byte alphabet
    respelled in it), merges, CONTROL tokens as special added tokens, USER_DEFINED ones as added tokens, the
    pre-tokenizer, ByteLevel decoding, the special tokens and chat template from the metadata."""
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    if int(transformers.__version__.split(".")[0]) < 5:
        raise Unsupported("transformers < 5 builds GGUF tokenizers its own older way")  # checked against 5.x only
    md = f.metadata
    kind, pre = md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise Unsupported(f"tokenizer model {kind!r}")
    if pre not in GPT2_DEFAULT_PRE and pre not in PRE_SPLITS:
        raise Unsupported(f"pre-tokenizer {pre!r}")
    tokens, merges = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise Unsupported("no vocabulary or no merges in the metadata")
    types = md.get("tokenizer.ggml.token_type")
    types = [] if types is None else types.tolist() if hasattr(types, "tolist") else list(types)
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise Unsupported("a merge that is not two tokens")
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    split = PRE_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # A CONTROL token spelled outside the byte alphabet is a llama.cpp mislabel that transformers skips too.
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == _CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    known = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
            if k == _USER_DEFINED and t in known]
    if user:
        tok.add_tokens(user)
    kwargs: dict[str, Any] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        i = md.get(f"tokenizer.ggml.{key}")
        if i is not None and not 0 <= int(i) < len(tokens):
            raise Unsupported(f"{key} {i} is outside the vocabulary")
        kwargs[name] = tokens[int(i)] if i is not None else None
    if "tokenizer.chat_template" in md:
        kwargs["chat_template"] = md["tokenizer.chat_template"]
    for key in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{key}" in md:
            kwargs[key] = bool(md[f"tokenizer.ggml.{key}"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, name_or_path=name_or_path, **kwargs)


# ---- the entry point --------------------------------------------------------------------------------------------
def load_gguf_causal_lm(path: str | Path, *, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, on the CPU, in `dtype` (default float32): phiforge's loader where it
    knows the file, transformers' `from_pretrained(..., gguf_file=...)` for the model or the tokenizer where it
    does not (a warning says why). `model.phiforge_gguf_load` records which loader built what."""
    import torch

    path = Path(path)
    dtype = dtype or torch.float32
    f = read_gguf(path)
    where = str(path.parent)
    info: dict[str, Any] = {"weights": "phiforge", "tokenizer": "phiforge", "dequantized_to": str(dtype).removeprefix("torch.")}
    try:
        tok = build_tokenizer(f, where)
    except Unsupported as e:
        log.warning("%s: tokenizer loaded by transformers (phiforge's GGUF loader does not read it: %s)", path, e)
        info["tokenizer"] = f"transformers ({e})"
        tok = _transformers_load(path, "tokenizer", dtype, e)
    try:
        model = build_llama(f, dtype, where)
    except Unsupported as e:
        log.warning("%s: weights loaded and dequantized by transformers, slower (phiforge's GGUF loader does not "
                    "read them: %s)", path, e)
        info["weights"] = f"transformers ({e})"
        model = _transformers_load(path, "model", dtype, e)
    setattr(model, LOAD_INFO_ATTR, info)
    return model, tok


def _transformers_load(path: Path, what: str, dtype, why: Unsupported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if what == "tokenizer":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    except (ValueError, NotImplementedError, KeyError) as e:  # a file neither loader reads: one line, not a trace
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot load its {what}: phiforge's GGUF loader does not read {why}, and "
                              f"transformers says: {first}") from None
