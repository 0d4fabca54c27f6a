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

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge.config import ModelConfig


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
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0
        self.key_mask: torch.Tensor | None = None  # (B, max_len) bool, only once padding was seen
        self.valid_count = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row

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
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

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
# ordinary modules. A linear layer that is not a plain nn.Linear (e.g. serve/quant's QuantLinear, swapped in
# from outside) is simply called as a module inside the same loop.
#
# Kernels (x is (B, in)); with the copying ones q, k, v and fc1 (all fed by the same LayerNorm) are one matmul:
#   "mkldnn": oneDNN weight prepacked for its small-batch kernel (bf16 on CPU: ~2x F.linear);
#   "t":      a transposed (in, out) contiguous copy and addmm (fp32 on CPU: MKL streams it faster than the
#             row-major weight F.linear hands it);
#   "mkl":    MKL's packed sgemm format (fp32; measured no faster than "t" and its packed buffers are 2-5x the
#             weights, so never the default);
#   "plain":  F.linear on the parameters themselves (other devices/dtypes): no copies, just the flat loop.
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


def _linear_fn(linears: list[nn.Module], kernel: str) -> LinearFn:
    """x (B, in) -> (B, sum of out) for linears fused along the output dim, in `kernel`'s weight layout."""
    if kernel == "plain" or len(linears) == 1 and type(linears[0]) is not nn.Linear:
        if len(linears) == 1:
            return linears[0]
        return lambda x: torch.cat([lin(x) for lin in linears], dim=-1)
    weight = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else linears[0].weight.detach()
    bias = torch.cat([lin.bias.detach() for lin in linears]) if len(linears) > 1 else linears[0].bias.detach()
    if kernel == "mkldnn":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if kernel == "t":
        weight_t = weight.t().contiguous()  # (in, out)
        return lambda x: torch.addmm(bias, x, weight_t)
    if kernel == "mkl":
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 1)
        return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, bias, 1)
    raise ValueError(f"unknown decode kernel {kernel!r}")


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
        self.sin = model.rotary.sin.to(dtype)
        self.layers = []
        self.modules: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, name, child) captured
        for block in model.model.layers:
            a, m, ln = block.self_attn, block.mlp, block.input_layernorm
            q, k, v = a.q_proj, a.k_proj, a.v_proj
            # q, k, v and fc1 all read the LayerNorm output: one matmul for all four (split afterwards), which
            # streams better than four small ones; modules are called one by one where not plain nn.Linear.
            fused = kernel != "plain" and all(type(lin) is nn.Linear for lin in (q, k, v, m.fc1))
            proj = _linear_fn([q, k, v, m.fc1] if fused else [q, k, v], kernel if fused else "plain")
            fc1 = None if fused else _linear_fn([m.fc1], kernel)
            qk_norm = (a.q_layernorm, a.k_layernorm) if a.qk_layernorm else None
            self.layers.append((ln.weight, ln.bias, ln.eps, proj, _linear_fn([a.dense], kernel), fc1,
                                _linear_fn([m.fc2], kernel), qk_norm))
            self.modules += [(block, "input_layernorm", ln), (block, "self_attn", a), (block, "mlp", m)]
            self.modules += [(a, n, getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "dense")]
            self.modules += [(m, n, getattr(m, n)) for n in ("fc1", "fc2")]
        self.lm_head = _linear_fn([model.lm_head], kernel)
        # Greedy decoding needs only the argmax of the logits. In fp32 the lm_head is a third of the bytes a step
        # reads, so screen with a bf16 copy (half the bytes) and a rigorous per-row error bound, then compute the
        # exact fp32 logits of the few rows that could still be the maximum (see greedy_step).
        self.screen = None
        if kernel == "t" and type(model.lm_head) is nn.Linear and torch.backends.mkldnn.is_available():
            w = model.lm_head.weight.detach()
            self.screen = (torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), 1),
                           w.norm(dim=-1), w, model.lm_head.bias.detach())
        self.modules += [(model, "lm_head", model.lm_head), (model.model, "layers", model.model.layers)]
        # Parameters the plan copied or holds: any in-place update (_version), `.data` swap (module.to:
        # data_ptr) or replacement (identity, via self.modules) makes the plan stale.
        self.params = [(p, p._version, p.data_ptr()) for _, _, mod in self.modules
                       for p in mod.parameters(recurse=False)]

    def fresh(self) -> bool:
        return all(getattr(parent, name) is child for parent, name, child in self.modules) and all(
            p._version == v and p.data_ptr() == ptr for p, v, ptr in self.params)

    def greedy_step(self, model: Phi, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The argmax token (B,) of the step's fp32 logits, without computing all of them (see self.screen)."""
        h = self.step(model, input_ids, cache, head=False)  # (B, d)
        if self.screen is None:
            return self.lm_head(h).float().argmax(-1)
        w_bf16, w_norm, w, b = self.screen
        p = torch.ops.mkldnn._linear_pointwise(h.to(torch.bfloat16), w_bf16, None, "none", [], "").float()
        # |h.w - bf16(h).bf16(w)| <= 2^-8 sum|h||w| <= 2^-8 |h|_2 |w|_2 (Cauchy-Schwarz; rounding of h and w is
        # 2^-9 relative each), +2^-8 |p| for the bf16 output; 2^-7 leaves room for fp32 accumulation error.
        bound = 2.0 ** -7 * h.float().norm(dim=-1, keepdim=True) * w_norm + 2.0 ** -8 * p.abs()  # (B, V)
        approx = p + b
        floor = (approx - bound).amax(-1, keepdim=True)  # the maximum is at least this
        toks = []
        for r, cand in enumerate(approx + bound >= floor):
            idx = cand.nonzero()[:, 0]  # ascending, so argmax ties resolve to the lowest id as a full argmax
            if idx.numel() == 0 or idx.numel() > w.shape[0] // 8:  # NaN/inf, or flat logits: no point screening
                toks.append(self.lm_head(h[r:r + 1]).argmax(-1))
                continue
            exact = F.linear(h[r:r + 1], w[idx], b[idx])  # (1, n_candidates) fp32
            toks.append(idx[exact.argmax(-1)])
        return torch.cat(toks)

    def step(self, model: Phi, input_ids: torch.Tensor, cache: KVCache, head: bool = True) -> torch.Tensor:
        """Logits (B, 1, V) for one new token per row, appended to an unpadded `cache` (`head=False`: the final
        LayerNorm output (B, d) instead)."""
        B = input_ids.shape[0]
        H, KV, hd = self.H, self.KV, self.hd
        L = cache.length
        x = model.model.embed_tokens(input_ids[:, 0])  # (B, d)
        d = x.shape[-1]
        cos, sin = self.cos[L], self.sin[L]  # (rotary_dim,), broadcast over rows and heads
        sizes = [H * hd, KV * hd, KV * hd]
        for i, (ln_w, ln_b, eps, proj, dense, fc1, fc2, qk_norm) in enumerate(self.layers):
            h = F.layer_norm(x, (d,), ln_w, ln_b, eps)
            if fc1 is None:  # fc1 fused into the projection
                q, k, v, f = proj(h).split(sizes + [self.intermediate], dim=-1)
            else:
                (q, k, v), f = proj(h).split(sizes, dim=-1), fc1(h)
            q, k, v = q.view(B, H, hd), k.view(B, KV, hd), v.view(B, KV, hd)
            if qk_norm is not None:
                q, k = qk_norm[0](q), qk_norm[1](k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            ck, cv = cache.k[i], cache.v[i]  # (B, KV, max_len, hd)
            ck.select(2, L).copy_(k)
            cv.select(2, L).copy_(v)
            # Attention of one query by hand: SDPA's fused CPU kernel costs ~0.1 ms a call in setup alone. In fp32
            # (as SDPA accumulates); query head h reads kv head h // G, as SDPA's enable_gqa.
            qg = q.float().view(B, KV, H // KV, hd) * self.scale  # (B, KV, G, hd)
            att = (qg @ ck[:, :, :L + 1].float().transpose(-1, -2)).softmax(-1)  # (B, KV, G, L+1)
            y = (att @ cv[:, :, :L + 1].float()).to(x.dtype)  # (B, KV, G, hd)
            attn = dense(y.view(B, H * hd))
            ff = fc2(F.gelu(f, approximate=self.approximate))
            x = attn + ff + x  # same summation order as Block
        cache.length = L + 1
        cache.valid_count += 1
        h = model.model.final_layernorm(x)
        return self.lm_head(h).unsqueeze(1) if head else h  # (B, 1, V) or (B, d)


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
                or cache.key_mask is not None or not self._use_plan():
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

    def _use_plan(self) -> bool:
        """The plan serves decode steps without autograd, and only while it is still up to date."""
        if self._plan is None or self.training or torch.is_grad_enabled():
            return False
        if self._plan.fresh():
            return True
        self._plan = None  # weights changed (training, load_state_dict, .to): the copies are stale
        return False

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device and dtype."""
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_position_embeddings, device=p.device,
                       dtype=p.dtype)


def init_on_meta(config: ModelConfig) -> Phi:
    """A model whose parameters are on the meta device (no memory), to be filled by `load_state_dict(assign=True)`."""
    with torch.device("meta"):
        return Phi(config)
