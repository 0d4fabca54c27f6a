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
applied from outside (phiforge/train), and fast CPU decoding steps from phiforge/decode, never here: this file is
the model's one implementation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        """Position ids (B or 1, T), an SDPA boolean mask (B, 1, T, L) or None, and is_causal (L = cached + T)."""
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            return self._explicit_mask(T, attention_mask, cache, device)
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

    @staticmethod
    def _explicit_mask(T: int, mask: torch.Tensor, cache: KVCache | None,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """A caller's own boolean mask (B, 1, T, L) or (B, T, L), passed to SDPA as it is (see hidden_states)."""
        past = cache.length if cache is not None else 0
        if mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, L): the same mask for every head
        if mask.dim() != 4 or mask.dtype != torch.bool or tuple(mask.shape[-2:]) != (T, past + T):
            # a float mask would be *added* to the scores by SDPA: 0/1 "allowed" values would silently mean nothing
            raise ValueError(f"attention_mask must be (B, T) padding or a boolean (B, 1, T, L) / (B, T, L) mask "
                             f"with L = {past + T}; got {tuple(mask.shape)} {mask.dtype}")
        if cache is not None:
            if cache.key_mask is not None:  # the cache tracks padding: these keys are real ones
                cache.key_mask[:, past:past + T] = True
            cache.valid_count += T
        return torch.arange(past, past + T, device=device)[None], mask, False

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm output (B, T, d) for `input_ids` (B, T), appended to `cache` if given (L = its cached
        positions + T keys are attended to; without a cache L = T).

        `attention_mask`, one of:
        - None: causal attention.
        - (B, T), 1 = real token, 0 = padding (left padding, for generation): padding is never attended to and
          positions count real tokens only, so each row gets what it would get alone.
        - boolean (B, 1, T, L) or (B, T, L), True = query t may attend to key l: handed to SDPA as it is, with
          nothing added (not even causality); e.g. a block-diagonal causal mask over several examples packed into
          one row. Every query must be allowed at least one key (one with none gives NaN).
        `position_ids` (B, T) replace the rotary positions (by default cached + 0..T-1, or the real-token counts
        under a (B, T) mask), e.g. restarting at 0 with each packed example.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        # The context bounds positions, not row width: a packed row may be wider when positions restart.
        last = int(position_ids.max()) + 1 if position_ids is not None else past + T
        if last > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {last} tokens exceeds the context of "
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
        """Logits (B, T, vocab), or (B, 1, vocab) for the last position only when `last_only`; masks and
        positions as in `hidden_states`. (Fast CPU decoding steps: phiforge.decode.Decoder.)"""
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        if last_only:
            h = h[:, -1:]  # prefill for generation needs only the next-token distribution
        return self.lm_head(h)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device, in its dtype, except on the CPU:
        - a bf16/fp16 model gets an fp32 cache when that stays under FP32_CACHE_LIMIT_BYTES. CPU attention
          computes in fp32 anyway, so the decode plan (phiforge.decode) would otherwise convert every cached key
          and value at every step (a third of a small model's per-token overhead); storing the bf16-rounded values
          in fp32 is exact.
        - a quantized model (int8 / int4 weights, `quant_mode` set by serve/quant or the quantizing loader) gets
          an fp16 cache, as llama.cpp's default: half the memory (phi-2 at 2,048 positions: 0.67 GB instead of
          1.34) and half the bytes a decode step reads from it. Keys and values are rounded to fp16 (11 significant
          bits) when stored; attention still computes in fp32. The native kernels read it directly."""
        p = self.model.embed_tokens.weight
        max_len = max_len or self.config.max_position_embeddings
        dtype = p.dtype
        if p.device.type == "cpu" and getattr(self, "quant_mode", None):
            dtype = torch.float16
        elif p.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            c = self.config
            fp32_bytes = 2 * c.num_hidden_layers * batch_size * c.num_key_value_heads * max_len * c.head_dim * 4
            dtype = torch.float32 if fp32_bytes <= FP32_CACHE_LIMIT_BYTES else dtype
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=dtype)


def init_on_meta(config: ModelConfig) -> Phi:
    """A model whose parameters are on the meta device (no memory), to be filled by `load_state_dict(assign=True)`."""
    with torch.device("meta"):
        return Phi(config)
