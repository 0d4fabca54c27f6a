"""The Phi decoder, single-device and readable top to bottom.

Architecture (Phi-1 / Phi-1.5 / Phi-2; see config.py for the sources):
- token embedding (+ dropout); no absolute positions;
- N *parallel* blocks: one LayerNorm feeds both attention and the MLP, out = x + attn(h) + mlp(h)
  (GPT-J / CodeGen style);
- attention: q/k/v and output ("dense") projections all with bias; optional LayerNorm on q and k;
  *partial* NeoX-style rotary embeddings on the first `rotary_dim` channels of each head, the rest pass through;
  grouped-query attention when num_key_value_heads < num_attention_heads; torch's scaled_dot_product_attention;
- MLP: fc1 -> GELU (tanh approximation, "gelu_new") -> fc2, with biases;
- final LayerNorm, then an untied lm_head *with* bias.

Parameter names equal Hugging Face's `PhiForCausalLM` (model.layers.N.self_attn.q_proj, ...), so a
state dict moves between the two without renaming. Parallelism, compilation and activation checkpointing are
applied from outside (phiforge/train), never here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge import kernels
from phiforge.config import ModelConfig

FP32_CACHE_LIMIT_BYTES = 256 << 20  # see Phi.new_cache


class KVCache:
    """A static, preallocated key/value cache for incremental decoding.

    Per layer, keys and values live in (B, n_kv_heads, max_len, head_dim) buffers; `length` positions are filled.
    Left-padded batches record which key positions are real in `key_mask` (B, max_len), so padding is never
    attended to. Preallocation avoids a torch.cat per token (which re-copies the whole cache every step).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if max_len > config.max_position_embeddings:
            raise ValueError(f"KV cache length {max_len} exceeds the model's context "
                             f"{config.max_position_embeddings}")
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        # `dtype` is the storage dtype; it may be wider than the activations (see Phi.new_cache): `update` hands
        # back the cached keys and values in the dtype they came in, losslessly.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0
        self.key_mask: torch.Tensor | None = None  # (B, max_len) bool, only once padding was seen
        self.valid_count = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.plan_serial = 0  # the decode plan this cache's steps were checked against (see Phi._use_plan)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, n_kv, T, hd) at [length, length+T) and return all filled positions."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end].to(k.dtype), self.v[layer][:, :, :end].to(v.dtype)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (e.g. drop finished sequences from a batch)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.valid_count = self.valid_count[rows]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]


class RotaryEmbedding(nn.Module):
    """cos/sin tables for NeoX-style rotary embeddings over `dim` channels (HF's PhiRotaryEmbedding numerics)."""

    def __init__(self, dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.dim, self.max_positions, self.theta = dim, max_positions, theta
        self.register_buffer("cos", torch.empty(max_positions, dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, dim), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables, e.g. after the model was materialised from the meta device."""
        device = device or self.cos.device
        if torch.device(device).type == "meta":
            return
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))
        pos = torch.arange(self.max_positions, dtype=torch.float, device=device)
        freqs = pos[:, None] * inv_freq[None, :]  # (P, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, dim): the same frequency for channel i and i + dim/2
        self.cos = emb.cos()
        self.sin = emb.sin()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B or 1, T) -> cos, sin (B or 1, 1, T, dim), broadcast over heads
        return self.cos[position_ids].unsqueeze(1).to(dtype), self.sin[position_ids].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x (B, H, T, hd); the remaining channels pass through."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)  # NeoX "rotate_half": pairs channel i with i + rd/2
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


# ---- the single-token decode path --------------------------------------------------------------------------------
# Batch-1 decoding reads every weight once per token, so it is bound by how fast the matrix-vector products
# stream weights, plus the per-token Python/dispatch overhead (at ~100M parameters a step is only a few ms).
# `Phi.prepare_decoding()` builds a DecodePlan: every layer's tensors resolved once, linear weights copied into
# the layout the fastest CPU kernel for their dtype streams best (measured, bench/decode.py), and `forward` runs
# one-token steps as one flat loop over it (no module calls, no mask or position building). Everything else
# (prefill, padding, autograd, training) and any model whose weights changed since the plan was built uses the
# ordinary modules. That check costs ~15 us a layer in Python (10 % of a 100M int8 model's step), so it runs once
# per KV cache, at the cache's first planned step: a cache holds the keys and values of one set of weights, and
# changing weights in the middle of a generation would mix two models whichever path ran. A linear layer that
# is not a plain nn.Linear (e.g. serve/quant's QuantLinear, swapped in from outside) is simply called as a
# module inside the same loop.
#
# Kernels (x is (B, in)); with the copying ones q, k, v and fc1 (all fed by the same LayerNorm) are one matmul:
#   "mkldnn": oneDNN weight prepacked for its small-batch kernel (bf16 on CPU: ~2x F.linear);
#   "t":      a transposed (in, out) contiguous copy and addmm (fp32 on CPU: MKL streams it faster than the
#             row-major weight F.linear hands it);
#   "mkl":    MKL's packed sgemm format (fp32; measured no faster than "t" and its packed buffers are 2-5x the
#             weights, so never the default);
#   "plain":  F.linear on the parameters themselves (other devices/dtypes): no copies, just the flat loop.
# Int8 QuantLinears (serve/quant) served by the native kernel (phiforge/kernels) are fused the same way, as one
# concatenated int8 matrix (per-row scales make that exact), whatever the kernel for the float weights.
def default_kernel(weight: torch.Tensor) -> str:
    """The decode kernel for a weight's device and dtype (see the table above)."""
    if weight.device.type != "cpu":
        return "plain"
    if weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        return "mkldnn"
    if weight.dtype == torch.float32:
        return "t"
    return "plain"


LinearFn = Callable[[torch.Tensor], torch.Tensor]


def _is_q8(linear: nn.Module) -> bool:
    """An int8 QuantLinear that runs on the native kernel (duck-typed: model.py does not import serve)."""
    return getattr(linear, "kernel", None) == "q8"


def _fusable(linears: list[nn.Module], kernel: str) -> bool:
    return kernel != "plain" and (all(type(lin) is nn.Linear for lin in linears) or all(map(_is_q8, linears)))


def _q8_parts(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 codes, fp32 row scales, fp32 bias or None) of int8 QuantLinears fused along the output dim (one
    linear: its own tensors where they are fp32 already, no copy)."""
    def cat(ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0] if len(ts) == 1 else torch.cat(ts)

    q = cat([lin.qweight for lin in linears])  # (sum of out, in) int8
    scale = cat([lin.scales for lin in linears]).float().contiguous()
    bias = None if any(lin.bias is None for lin in linears) else cat([lin.bias.detach() for lin in linears])
    return q, scale, None if bias is None else bias.float().contiguous()


def _q8_fn(linears: list[nn.Module]) -> LinearFn:
    """One native int8 matmul for int8 QuantLinears fused along the output dim (modules called if it declines)."""
    q, scale, bias = _q8_parts(linears)
    fallback = _linear_fn(linears, "plain")
    by_dtype: dict[torch.dtype, Callable[[torch.Tensor], torch.Tensor | None] | None] = {}  # output = x's dtype

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in by_dtype:
            native = x.dtype in (torch.float32, torch.bfloat16)
            by_dtype[x.dtype] = kernels.q8_matmul(q, scale, bias, x.dtype) if native else None
        matmul = by_dtype[x.dtype]
        y = None if matmul is None else matmul(x)
        return fallback(x) if y is None else y

    fn.parts = (q, scale, bias)  # type: ignore[attr-defined]  # for kernels.Q8Layer
    return fn


def _mkldnn_fn(packed: torch.Tensor, bias: torch.Tensor) -> LinearFn:
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _linear_fn(linears: list[nn.Module], kernel: str) -> LinearFn:
    """x (B, in) -> (B, sum of out) for linears fused along the output dim, in `kernel`'s weight layout."""
    if kernel != "plain" and all(map(_is_q8, linears)):
        return _q8_fn(linears)
    if kernel == "plain" or len(linears) == 1 and type(linears[0]) is not nn.Linear:
        if len(linears) == 1:
            return linears[0]
        return lambda x: torch.cat([lin(x) for lin in linears], dim=-1)
    weight = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else linears[0].weight.detach()
    bias = torch.cat([lin.bias.detach() for lin in linears]) if len(linears) > 1 else linears[0].bias.detach()
    if kernel == "mkldnn":
        return _mkldnn_fn(torch.ops.mkldnn._reorder_linear_weight(weight, 1), bias)
    if kernel == "t":
        weight_t = weight.t().contiguous()  # (in, out)
        return lambda x: torch.addmm(bias, x, weight_t)
    if kernel == "mkl":
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 1)
        return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, bias, 1)
    raise ValueError(f"unknown decode kernel {kernel!r}")


class ArgmaxScreen:
    """argmax(h @ W^T + b) per row of h, reading a low-precision copy of W instead of all of it.

    A cheap pass gives approximations y_n of every logit with a rigorous bound |y_n - r_n| <= B (B over all
    rows n at once; r_n are the logits the full lm_head computes, in its dtype). The argmax n* of r satisfies
    y_n* >= max(y) - 2B, so only rows within 2B of the top can win: their exact logits are computed from W (a few
    rows, usually < 20 of 51,200) and argmax'd, lowest id first on ties like a full argmax. When too many rows
    are candidates (flat logits, inf/NaN) the caller computes all the logits instead.

    Copies, by what exists (both halve the bytes or better):
    - "int8": per-row int8 codes read by the native kernel (phiforge/kernels), for fp32 and bf16 weights. With
      d_n = w_n - s_n q_n (kept: its 2-norm), x~ the kernel's int16 rounding of h and a_n = s_n sum_k |q_nk|:
      |h.w_n - y_n| <= |h|_2 |d_n|_2 + 0.51 max|h| / 32767 a_n + float error (< 2^-20 (max|h| a_n + |b_n|));
      the full lm_head accumulates in fp32 (<= (K + 2) 2^-24 |h|_2 |w_n|_2) and rounds its output to its dtype
      (unit roundoff u: 2^-8 bf16, 2^-24 fp32).
    - "bf16" (fp32 weights, no C compiler): oneDNN with bf16 h and W, fp32 accumulation, bf16 output:
      |h.w_n - y_n| <= 2^-7 |h|_2 |w_n|_2 + 2^-8 |y_n| (Cauchy-Schwarz over the 2^-9 rounding of each side).
    """

    MAX_CANDIDATES = 1 / 8  # of the vocabulary; beyond it a full matmul is cheaper than the gather

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach()
        self.kind, self.weight = kind, w
        self.bias = bias.detach() if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        wf = w.float()
        w_norm_max = float(wf.norm(dim=-1).max())
        K = w.shape[1]
        if kind == "int8":
            scale = (wf.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (V,) as serve/quant.quantize_int8
            self.q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.scale, self.bias32 = scale, self.bias.float()
            a = scale * self.q.float().abs().sum(-1)  # (V,)
            d_norm_max = float((wf - self.q.float() * scale[:, None]).norm(dim=-1).max())
            u = 2.0 ** -8 if w.dtype != torch.float32 else 2.0 ** -24
            # B = (c_h2 |h|_2 + c_hmax max|h| + c_b) (1 + u) + u max|y|, constants per weight, scalars per row
            self.c_h2 = d_norm_max + (K + 2) * 2.0 ** -24 * w_norm_max
            self.c_hmax = float(a.max()) * (0.51 / 32767 + 2.0 ** -20)
            self.c_b = float(self.bias32.abs().max()) * 2.0 ** -20
            self.u = u
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), 1)
            self.c_h2, self.c_hmax, self.c_b, self.u = 2.0 ** -7 * w_norm_max, 0.0, 0.0, 2.0 ** -8

    @classmethod
    def build(cls, lm_head: nn.Linear) -> ArgmaxScreen | None:
        """The best screen for this CPU lm_head, or None (other dtypes, nothing to screen with)."""
        w = lm_head.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
            return None
        if kernels.available():
            return cls("int8", w, lm_head.bias)
        if w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            return cls("bf16", w, lm_head.bias)
        return None

    def argmax(self, h: torch.Tensor) -> torch.Tensor | None:
        """(B,) argmax ids for h (B, d), or None when the screen cannot decide cheaply."""
        if self.kind == "int8":
            y = kernels.q8_linear(h, self.q, self.scale, self.bias32, torch.float32)  # (B, V), bias included
            if y is None:
                return None
        else:
            y = torch.ops.mkldnn._linear_pointwise(h.to(torch.bfloat16), self.packed, None, "none", [], "").float()
            y += self.bias
        hf = h.float()
        toks = []
        for r in range(h.shape[0]):
            yr = y[r].numpy()  # numpy's compare + flatnonzero is ~3x faster than torch's on 51,200 entries
            top = float(yr.max())
            h2, hmax = float(hf[r].norm()), float(hf[r].abs().max())
            bound = (self.c_h2 * h2 + self.c_hmax * hmax + self.c_b) * (1 + self.u) + self.u * max(top, -float(
                yr.min()))
            if not math.isfinite(bound):
                return None
            idx = np.flatnonzero(yr >= top - 2 * bound)  # ascending ids
            if idx.size == 0 or idx.size > self.MAX_CANDIDATES * yr.size:
                return None
            idx = torch.from_numpy(idx)
            # the candidates' logits as the full lm_head makes them: fp32 accumulation, rounded to its dtype
            exact = F.linear(hf[r:r + 1], self.weight[idx].float(), self.bias[idx].float()).to(h.dtype)
            toks.append(idx[exact.float().argmax(-1)])
        return torch.cat(toks)


_PLAN_SERIALS = itertools.count(1)


class DecodePlan:
    """Everything a one-token decode step reads, resolved once (see the notes above)."""

    def __init__(self, model: Phi, kernel: str) -> None:
        cfg = model.config
        self.kernel = kernel
        self.H, self.KV, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.approximate = model.model.layers[0].mlp.approximate
        self.scale = 1.0 / cfg.head_dim ** 0.5
        self.intermediate = cfg.intermediate_size
        dtype = model.model.embed_tokens.weight.dtype
        self.cos = model.rotary.cos.to(dtype)  # (P, rotary_dim): the same rounding as RotaryEmbedding.forward
        # rotate_half(x) * sin == roll(x, rd/2) * [-sin_lo, sin_hi] exactly (negation commutes with rounding)
        rd = self.cos.shape[-1]
        sin = model.rotary.sin.to(dtype)
        self.sin_signed = torch.cat((-sin[:, : rd // 2], sin[:, rd // 2:]), dim=-1)  # (P, rotary_dim)
        self.rotary_dim = rd
        # fp32 activations (fp32 and int8 models): rotary, cache write and attention in one native call a layer
        # (kernels.attend_step) where the kernels are built; it reads the fp32 cache new_cache gives CPU models
        self.native_attention = dtype == torch.float32 and not cfg.qk_layernorm and kernels.available()
        self.layers = []
        natives = []  # per layer a kernels.Q8Layer, or None
        self.modules: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, name, child) captured
        for block in model.model.layers:
            a, m, ln = block.self_attn, block.mlp, block.input_layernorm
            q, k, v = a.q_proj, a.k_proj, a.v_proj
            # q, k, v and fc1 all read the LayerNorm output: one matmul for all four (split afterwards), which
            # streams better than four small ones; modules are called one by one where not plain nn.Linear.
            fused = _fusable([q, k, v, m.fc1], kernel)
            proj = _linear_fn([q, k, v, m.fc1] if fused else [q, k, v], kernel if fused else "plain")
            fc1 = None if fused else _linear_fn([m.fc1], kernel)
            qk_norm = (a.q_layernorm, a.k_layernorm) if a.qk_layernorm else None
            # bf16 (oneDNN): dense and fc2 as one matmul over the concatenated inputs, attn + ff = [y, g] @ [Wd |
            # Wf]^T + (bd + bf), which saves a call (~14 us of fixed cost) and an add per layer. One fp32
            # accumulation instead of two bf16-rounded halves: not bit-equal to the modules, but closer to exact.
            # fp32 keeps the modules' summation order, so fp32 decoding stays token-identical to transformers.
            if kernel == "mkldnn" and type(a.dense) is nn.Linear and type(m.fc2) is nn.Linear:
                w = torch.cat([a.dense.weight.detach(), m.fc2.weight.detach()], dim=1)  # (d, H hd + intermediate)
                bias = (a.dense.bias.detach().float() + m.fc2.bias.detach().float()).to(w.dtype)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
                dense, fc2 = None, _mkldnn_fn(packed, bias)
            else:
                dense, fc2 = _linear_fn([a.dense], kernel), _linear_fn([m.fc2], kernel)
            # int8 model, fp32 activations: the whole layer natively (kernels.Q8Layer), all layers in one call
            native = None
            if self.native_attention and fc1 is None and dense is not None and all(map(_is_q8, [a.dense, m.fc2])):
                native = kernels.Q8Layer(num_heads=self.H, num_kv_heads=self.KV, head_dim=self.hd, rotary_dim=rd,
                                         intermediate=self.intermediate, eps=ln.eps, scale=self.scale,
                                         gelu_tanh=self.approximate == "tanh", ln_w=ln.weight.detach(),
                                         ln_b=ln.bias.detach(), proj=proj.parts, dense=dense.parts, fc2=fc2.parts)
            self.layers.append((ln.weight, ln.bias, ln.eps, proj, dense, fc1, fc2, qk_norm))
            natives.append(native)
            self.modules += [(block, "input_layernorm", ln), (block, "self_attn", a), (block, "mlp", m)]
            self.modules += [(a, n, getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "dense")]
            self.modules += [(m, n, getattr(m, n)) for n in ("fc1", "fc2")]
        # every layer int8 (as serve/quant.quantize makes them): the whole stack is one native call a step
        self.native = kernels.Q8Stack(natives) if natives and None not in natives else None
        self.lm_head = _linear_fn([model.lm_head], kernel)
        # Greedy decoding needs only the argmax of the logits, and the lm_head is a third (fp32) to two fifths
        # (bf16) of the bytes a step reads: screen with a smaller copy, recompute the few candidates (ArgmaxScreen).
        self.screen = None
        if kernel in ("t", "mkldnn") and type(model.lm_head) is nn.Linear:
            self.screen = ArgmaxScreen.build(model.lm_head)
        emb, fln = model.model.embed_tokens, model.model.final_layernorm
        self.embed, self.final_ln = emb.weight, (fln.weight, fln.bias, fln.eps)
        self.modules += [(model, "lm_head", model.lm_head), (model.model, "layers", model.model.layers),
                         (model.model, "embed_tokens", emb), (model.model, "final_layernorm", fln)]
        # Parameters the plan copied or holds: any in-place update (_version), `.data` swap (module.to:
        # data_ptr) or replacement (identity, via self.modules) makes the plan stale.
        self.params = [p for _, _, mod in self.modules
                       for p in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]]
        self.children = [child for _, _, child in self.modules]
        self.versions, self.ptrs = self._state()
        self.serial = next(_PLAN_SERIALS)  # which plan a KVCache was checked against (Phi._use_plan)

    def _state(self) -> tuple[list[int], list[int]]:
        return [p._version for p in self.params], [p.data_ptr() for p in self.params]

    def fresh(self) -> bool:
        # Runs once per KV cache (Phi._use_plan) and kept cheap: _modules lookups (Module.__getattr__ is ~1 us a
        # call), lists compared whole; modules define no __eq__, so list == compares them by identity.
        return [parent._modules.get(name) for parent, name, _ in self.modules] == self.children and \
            self._state() == (self.versions, self.ptrs)

    def greedy_step(self, model: Phi, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The argmax token (B,) of the step's logits, without computing all of them where a screen exists."""
        h = self.step(model, input_ids, cache, head=False)  # (B, d)
        if self.screen is not None:
            tok = self.screen.argmax(h)
            if tok is not None:
                return tok
        logits = self.lm_head(h).float()  # (B, V)
        if logits.device.type == "cpu":  # numpy's argmax is ~10x faster than torch's on a row of 51,200
            return torch.from_numpy(logits.numpy().argmax(-1))
        return logits.argmax(-1)

    def step(self, model: Phi, input_ids: torch.Tensor, cache: KVCache, head: bool = True) -> torch.Tensor:
        """Logits (B, 1, V) for one new token per row, appended to an unpadded `cache` (`head=False`: the final
        LayerNorm output (B, d) instead)."""
        B = input_ids.shape[0]
        H, KV, hd = self.H, self.KV, self.hd
        L = cache.length
        x = F.embedding(input_ids[:, 0], self.embed)  # (B, d)
        d = x.shape[-1]
        cos, sin = self.cos[L], self.sin_signed[L]  # (rotary_dim,), broadcast over rows and heads
        # layers the native stack ran (x updated in place, k and v cached): all, or up to one that declined
        start = self.native(x, L, cos, sin, cache.k, cache.v) if self.native is not None else 0
        for i in range(start, len(self.layers)):
            ln_w, ln_b, eps, proj, dense, fc1, fc2, qk_norm = self.layers[i]
            h = F.layer_norm(x, (d,), ln_w, ln_b, eps)
            qkv = proj(h)  # (B, (H + 2 KV) hd [+ intermediate])
            f = qkv[:, (H + 2 * KV) * hd:] if fc1 is None else fc1(h)  # fc1 fused into the projection, or not
            ck, cv = cache.k[i], cache.v[i]  # (B, KV, max_len, hd), fp32 for a low-precision CPU model
            g = F.gelu(f, approximate=self.approximate)
            y = kernels.attend_step(qkv, H, KV, hd, cos, sin, ck, cv, L, self.scale) if self.native_attention \
                else None  # (B, H hd)
            if y is None:
                y = self._attend(qkv, B, L, cos, sin, ck, cv, qk_norm, x.dtype)
            if dense is None:  # dense and fc2 fused (bf16, see __init__)
                x = fc2(torch.cat((y, g), dim=-1)) + x
            else:
                x = dense(y) + fc2(g) + x  # same summation order as Block
        cache.length = L + 1
        cache.valid_count += 1
        h = F.layer_norm(x, (d,), *self.final_ln)
        return self.lm_head(h).unsqueeze(1) if head else h  # (B, 1, V) or (B, d)

    def _attend(self, qkv: torch.Tensor, B: int, L: int, cos: torch.Tensor, sin: torch.Tensor, ck: torch.Tensor,
                cv: torch.Tensor, qk_norm: tuple[nn.Module, nn.Module] | None, dtype: torch.dtype) -> torch.Tensor:
        """attend_step in torch: rotary (in place in qkv), cache write at L, attention -> (B, H hd)."""
        H, KV, hd, rd = self.H, self.KV, self.hd, self.rotary_dim
        qk = qkv[:, :(H + KV) * hd].view(B, H + KV, hd)  # q and k heads side by side
        if qk_norm is not None:
            qk = torch.cat((qk_norm[0](qk[:, :H]), qk_norm[1](qk[:, H:])), dim=1)
        # Rotary on q and k together, in place in the projection's output: (B, H + KV, rd) channels
        x_rot = qk[..., :rd]
        x_rot.copy_(x_rot * cos + x_rot.roll(rd // 2, -1) * sin)
        q, k = qk[:, :H], qk[:, H:]  # (B, H, hd), (B, KV, hd)
        v = qkv[:, (H + KV) * hd:(H + 2 * KV) * hd].view(B, KV, hd)
        ck.select(2, L).copy_(k)
        cv.select(2, L).copy_(v)
        # Attention of one query by hand: SDPA's fused CPU kernel costs ~0.1 ms a call in setup alone. In fp32
        # (as SDPA accumulates); query head h reads kv head h // G, as SDPA's enable_gqa.
        qg = q.float().view(B, KV, H // KV, hd) * self.scale  # (B, KV, G, hd)
        att = (qg @ ck[:, :, :L + 1].float().transpose(-1, -2)).softmax(-1)  # (B, KV, G, L+1)
        return (att @ cv[:, :, :L + 1].float()).to(dtype).view(B, H * hd)  # (B, KV, G, hd) -> (B, H hd)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=True)
        self.dense = nn.Linear(self.n_head * hd, d, bias=True)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(hd, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(hd, eps=config.layer_norm_eps)
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, hd = self.n_head, self.n_kv, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, KV, L, hd), L = cached + T
        # GQA (KV < H): each kv head serves H / KV query heads; SDPA broadcasts them without copies.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=KV != H)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H*hd)
        return self.dense(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        # gelu_new and gelu_pytorch_tanh are both the tanh approximation; plain "gelu" is the erf form.
        self.approximate = "none" if config.hidden_act == "gelu" else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """Parallel block: attention and MLP both read the same LayerNorm output and add onto the residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.resid_dropout(self.self_attn(h, cos, sin, mask, is_causal, cache, layer))
        ff = self.resid_dropout(self.mlp(h))
        return attn + ff + x  # same summation order as HF, for bit-closeness


class Phi(nn.Module):
    """A Phi causal language model. `forward(input_ids)` returns logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            embed_dropout=nn.Dropout(config.embd_pdrop),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            final_layernorm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.max_position_embeddings, config.rope_theta)
        self._plan: DecodePlan | None = None  # see prepare_decoding
        if self.lm_head.weight.device.type != "meta":
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self, include_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_embedding else n - self.model.embed_tokens.weight.numel()

    def _positions_and_mask(self, B: int, T: int, attention_mask: torch.Tensor | None, cache: KVCache | None,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Position ids (B or 1, T), an SDPA boolean mask (B, 1, T, L) or None, and is_causal."""
        past = cache.length if cache is not None else 0
        padded = attention_mask is not None and not bool(attention_mask.all())
        if cache is not None and (padded or cache.key_mask is not None):
            if cache.key_mask is None:  # first padding seen: all earlier positions were real
                cache.key_mask = torch.zeros(cache.batch_size, cache.max_len, dtype=torch.bool, device=device)
                cache.key_mask[:, :past] = True
            new = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool,
                                                                                       device=device)
            cache.key_mask[:, past:past + T] = new
            key_valid = cache.key_mask[:, : past + T]  # (B, L)
            padded = True
        else:
            key_valid = attention_mask.bool() if padded else None
        if padded:
            # Positions count real tokens only, so a left-padded prompt gets the positions it would have alone.
            valid_new = attention_mask.long() if attention_mask is not None else torch.ones(B, T, dtype=torch.long,
                                                                                             device=device)
            start = cache.valid_count[:, None] if cache is not None else 0
            pos = (start + valid_new.cumsum(-1) - 1).clamp(min=0)  # (B, T)
            causal = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, L)
            mask = causal[None, None] & key_valid[:, None, None, :]  # (B, 1, T, L)
            # A query row with no visible key (a pad before any real token) would give NaN; let it see all.
            mask = mask | ~mask.any(-1, keepdim=True)
            if cache is not None:
                cache.valid_count += valid_new.sum(-1)
            return pos, mask, False
        pos = torch.arange(past, past + T, device=device)[None]  # (1, T)
        if cache is not None:
            cache.valid_count += T
        if past == 0:
            return pos, None, T > 1  # plain causal prefill: SDPA's fused causal path
        if T == 1:
            return pos, None, False  # one new token sees every cached position
        causal = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)  # chunked prefill
        return pos, causal[None, None], False

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm output (B, T, d). `attention_mask` (B, T) marks real (1) vs padding (0) tokens."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context of "
                             f"{self.config.max_position_embeddings}")
        pos, mask, is_causal = self._positions_and_mask(B, T, attention_mask, cache, input_ids.device)
        if position_ids is not None:
            pos = position_ids
        x = self.model.embed_dropout(self.model.embed_tokens(input_ids))  # (B, T, d)
        cos, sin = self.rotary(pos, x.dtype)  # (B or 1, 1, T, rotary_dim)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, is_causal, cache, i)
        if cache is not None:
            cache.length += T
        return self.model.final_layernorm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) for the last position only when `last_only`."""
        """Logits (B, T, vocab), or (B, 1, vocab) for the last position only when `last_only`."""
        if self._plan_serves(input_ids, attention_mask, position_ids, cache):
            return self._plan.step(self, input_ids, cache)
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        if last_only:
            h = h[:, -1:]  # prefill for generation needs only the next-token distribution
        return self.lm_head(h)

    def greedy_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step (input_ids (B, 1), appended to `cache`) that returns only the greedy next token (B,):
        the argmax of `forward`'s fp32 logits, computed faster where a decode plan allows (see DecodePlan)."""
        if self._plan_serves(input_ids, None, None, cache):
            return self._plan.greedy_step(self, input_ids, cache)
        return self(input_ids, cache=cache)[:, -1].float().argmax(-1)

    def _plan_serves(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None, cache: KVCache | None) -> bool:
        """Whether this call is a one-token step on an unpadded cache that the decode plan can run."""
        if cache is None or input_ids.shape[1] != 1 or attention_mask is not None or position_ids is not None \
                or cache.key_mask is not None or not self._use_plan(cache):
            return False
        if cache.length + 1 > min(cache.max_len, self.config.max_position_embeddings):
            raise ValueError(f"sequence of {cache.length + 1} tokens exceeds the context of "
                             f"{self.config.max_position_embeddings} or the KV cache ({cache.max_len})")
        return True

    def prepare_decoding(self, kernel: str | None = None) -> bool:
        """Build the fast one-token decode path (DecodePlan): resolved weights in the fastest kernel's layout.

        `kernel` overrides the choice for the weights' device/dtype ("mkldnn", "t", "plain"; see DecodePlan).
        Costs extra memory up to the linear weights (none for "plain"). Idempotent: rebuilds only what changed
        since the last call. Returns False on the meta device (nothing to prepare).
        """
        if self.model.embed_tokens.weight.device.type == "meta":
            return False
        kernel = kernel or default_kernel(self.model.embed_tokens.weight)
        if self._plan is not None and self._plan.kernel == kernel and self._plan.fresh():
            return True
        self._plan = None  # free the stale copies before making new ones
        with torch.no_grad():
            self._plan = DecodePlan(self, kernel)
        return True

    def release_decoding(self) -> None:
        """Drop the decode plan made by prepare_decoding (frees its weight copies)."""
        self._plan = None

    def _use_plan(self, cache: KVCache) -> bool:
        """The plan serves decode steps without autograd, and only while it is still up to date: checked at the
        first planned step of each cache (see the notes above DecodePlan)."""
        plan = self._plan
        if plan is None or self.training or torch.is_grad_enabled():
            return False
        if cache.plan_serial == plan.serial:
            return True
        if plan.fresh():
            cache.plan_serial = plan.serial
            return True
        self._plan = None  # weights changed (training, load_state_dict, .to): the copies are stale
        return False

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device, in its dtype, except: a bf16/fp16 model on the CPU gets an
        fp32 cache when that stays under FP32_CACHE_LIMIT_BYTES. CPU attention computes in fp32 anyway, so the
        decode plan would otherwise convert every cached key and value at every step (a third of a small
        model's per-token overhead); storing the bf16-rounded values in fp32 is exact."""
        p = self.model.embed_tokens.weight
        max_len = max_len or self.config.max_position_embeddings
        dtype = p.dtype
        if p.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            c = self.config
            fp32_bytes = 2 * c.num_hidden_layers * batch_size * c.num_key_value_heads * max_len * c.head_dim * 4
            dtype = torch.float32 if fp32_bytes <= FP32_CACHE_LIMIT_BYTES else dtype
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=dtype)


def init_on_meta(config: ModelConfig) -> Phi:
    """A model whose parameters are on the meta device (no memory), to be filled by `load_state_dict(assign=True)`."""
    with torch.device("meta"):
        return Phi(config)
