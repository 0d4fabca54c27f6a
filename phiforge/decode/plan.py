"""DecodePlan: a one-token decode step as one flat loop over tensors resolved once.

Batch-1 decoding reads every weight once per token, so it is bound by how fast the matrix-vector products stream
weights, plus the per-token Python/dispatch overhead (at ~100M parameters a step is only a few ms). A plan
resolves every layer's tensors once, reads linear weights in the layout the fastest CPU kernel for their dtype
streams best (decode/linear.py; measured, bench/decode.py) -- the model's own tensors where the loader or
serve/quant laid them out so, else copies -- and runs a step with no module calls and no mask or position
building. Int8 and int4 models (serve/quant) with fp32 activations run a step's whole layer stack in one
native call (phiforge/kernels), and a prompt's prefill (its last position's logits) on the plan too: fused
projections, native GELU and attention (`DecodePlan.prefill`). A plan is only valid for the weights it was built from: `fresh()` says whether
they are unchanged (Decoder checks it once per KV cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge import kernels
from phiforge.decode.linear import copy_bytes, fusable, is_q4, is_q8, linear_fn, mkldnn_fn
from phiforge.decode.screen import ArgmaxScreen

if TYPE_CHECKING:
    from phiforge.model import KVCache, Phi


class DecodePlan:
    """Everything a one-token decode step of `model` reads, resolved once, linear weights in `kernel`'s layout
    (see phiforge/decode/linear.py). It holds no reference to the model itself (Decoder keeps plans per model)."""

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
        # fp32 activations (fp32, int8 and int4 models): rotary, cache write and attention in one native call a
        # layer (kernels.attend_step) where the kernels are built, on the cache new_cache gives CPU models (fp32;
        # fp16 for quantized ones)
        self.native_attention = dtype == torch.float32 and not cfg.qk_layernorm and kernels.available()
        self.layers = []
        natives = []  # per layer a kernels.NativeLayer, or None
        # (parent's _modules, name, child) captured: the dict, not the parent, so the plan never holds the Phi
        self.modules: list[tuple[dict[str, nn.Module | None], str, nn.Module]] = []
        for block in model.model.layers:
            a, m, ln = block.self_attn, block.mlp, block.input_layernorm
            q, k, v = a.q_proj, a.k_proj, a.v_proj
            # q, k, v and fc1 all read the LayerNorm output: one matmul for all four (split afterwards), which
            # streams better than four small ones; modules are called one by one where not plain nn.Linear.
            fused = fusable([q, k, v, m.fc1], kernel)
            proj = linear_fn([q, k, v, m.fc1] if fused else [q, k, v], kernel if fused else "plain")
            fc1 = None if fused else linear_fn([m.fc1], kernel)
            qk_norm = (a.q_layernorm, a.k_layernorm) if a.qk_layernorm else None
            # bf16 (oneDNN): dense and fc2 as one matmul over the concatenated inputs, attn + ff = [y, g] @ [Wd |
            # Wf]^T + (bd + bf), which saves a call (~14 us of fixed cost) and an add per layer. One fp32
            # accumulation instead of two bf16-rounded halves: not bit-equal to the modules, but closer to exact.
            # fp32 keeps the modules' summation order, so fp32 decoding stays token-identical to transformers.
            if kernel == "mkldnn" and type(a.dense) is nn.Linear and type(m.fc2) is nn.Linear:
                w = torch.cat([a.dense.weight.detach(), m.fc2.weight.detach()], dim=1)  # (d, H hd + intermediate)
                bias = (a.dense.bias.detach().float() + m.fc2.bias.detach().float()).to(w.dtype)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
                dense, fc2 = None, mkldnn_fn(packed, bias)
            else:
                dense, fc2 = linear_fn([a.dense], kernel), linear_fn([m.fc2], kernel)
            # int8 or int4 model, fp32 activations: the whole layer natively (kernels.NativeLayer), all layers in
            # one call
            native = None
            if self.native_attention and fc1 is None and dense is not None and \
                    (all(map(is_q8, [a.dense, m.fc2, q])) or all(map(is_q4, [a.dense, m.fc2, q]))):
                native = kernels.NativeLayer(num_heads=self.H, num_kv_heads=self.KV, head_dim=self.hd,
                                             rotary_dim=rd, intermediate=self.intermediate, eps=ln.eps,
                                             scale=self.scale, gelu_tanh=self.approximate == "tanh",
                                             ln_w=ln.weight.detach(), ln_b=ln.bias.detach(), proj=proj.parts,
                                             dense=dense.parts, fc2=fc2.parts)
            self.layers.append((ln.weight, ln.bias, ln.eps, proj, dense, fc1, fc2, qk_norm))
            natives.append(native)
            self.modules += [(block._modules, n, getattr(block, n))
                             for n in ("input_layernorm", "self_attn", "mlp")]
            self.modules += [(a._modules, n, getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "dense")]
            self.modules += [(m._modules, n, getattr(m, n)) for n in ("fc1", "fc2")]
        # every layer int8 or every layer int4 (as serve/quant.quantize makes them): one native call a step
        formats = {native.format for native in natives if native is not None}
        self.native = kernels.NativeStack(natives) if natives and None not in natives and len(formats) == 1 \
            else None
        self.lm_head = linear_fn([model.lm_head], kernel)
        # Greedy decoding needs only the argmax of the logits, and the lm_head is a third (fp32) to two fifths
        # (bf16) of the bytes a step reads: screen with a smaller copy, recompute the few candidates (ArgmaxScreen).
        self.screen = None
        if kernel in ("t", "mkldnn") and type(model.lm_head) is nn.Linear:
            self.screen = ArgmaxScreen.build(model.lm_head)
        emb, fln = model.model.embed_tokens, model.model.final_layernorm
        # the module itself: a quantized embedding (serve/quant.QuantEmbedding) dequantizes the rows it looks up
        self.embed, self.final_ln = emb, (fln.weight, fln.bias, fln.eps)
        self.modules += [(model._modules, "lm_head", model.lm_head)]
        self.modules += [(model.model._modules, n, model.model[n])
                         for n in ("layers", "embed_tokens", "final_layernorm")]
        # Parameters the plan copied or holds: any in-place update (_version), `.data` swap (module.to:
        # data_ptr) or replacement (identity, via self.modules) makes the plan stale.
        self.params = [p for _, _, mod in self.modules
                       for p in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]]
        self.children = [child for _, _, child in self.modules]
        self.versions, self.ptrs = self._state()
        self.released = False

    @staticmethod
    def copy_bytes(model: Phi, kernel: str) -> int:
        """Bytes of weight copies a plan of `model` in `kernel` would make (before making them): none for int8
        models quantized by serve/quant or for fp32 models loaded in the decode layout, the whole linear weights
        for oneDNN's prepacked bf16, plus the int8 argmax screen of a float lm_head (a quarter of an fp32 one)."""
        total = 0
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            group = [a.q_proj, a.k_proj, a.v_proj, m.fc1]
            total += copy_bytes(group, kernel) if fusable(group, kernel) else copy_bytes([m.fc1], kernel)
            total += copy_bytes([a.dense], kernel) + copy_bytes([m.fc2], kernel)
        total += copy_bytes([model.lm_head], kernel)
        head = model.lm_head
        if kernel in ("t", "mkldnn") and type(head) is nn.Linear and head.weight.dtype in (torch.float32,
                                                                                             torch.bfloat16):
            total += head.weight.numel() * (1 if kernels.available() else 2)  # int8 (or bf16) screen copy
        return total

    def describe(self) -> str:
        """One line: which path and kernels a decode step runs (for `generate --verbose` and the server)."""
        import re

        from phiforge.serve.quant import QuantLinear

        if self.released:
            return "module path: the decode plan was released (its weights changed)"
        n = len(self.layers)
        text = kernels.describe()
        isa = {k: (re.search(rf"{k} (?:kernel )?\(([^)]*)\)", text) or [None, "?"])[1] for k in ("int8", "int4")}
        mods = [mod for _, _, mod in self.modules]
        quant = {mod.kernel for mod in mods if isinstance(mod, QuantLinear)}
        if self.native is not None:
            fmt = self.native.format
            what = f"native {fmt} stack ({isa[fmt]}), {n} layers in one call a step; prefill: q, k, v and fc1 " \
                "in one matmul a layer, native GELU and attention"
        else:
            names = {"q8": f"native int8 kernel ({isa['int8']})", "q4": f"native int4 kernel ({isa['int4']})",
                     "int8pack_mm": "torch int8pack_mm", "int4pack_mm": "torch int4pack_mm",
                     "dequant": "dequantize-then-matmul"}
            parts = [names.get(k, k) for k in sorted(quant)]
            if any(type(mod) is nn.Linear for mod in mods):
                parts.append({"t": "fp32 MKL addmm", "mkldnn": "bf16 oneDNN prepacked", "mkl": "MKL packed sgemm",
                              "plain": "F.linear"}.get(self.kernel, self.kernel))
            what = f"flat loop of {n} layers: {', '.join(parts)}" + \
                (", native attention" if self.native_attention else "")
        head = f"argmax screen ({self.screen.kind})" if self.screen is not None else "full lm_head"
        return f"decode: {what}; greedy: {head}"

    def _state(self) -> tuple[list[int], list[int]]:
        return [p._version for p in self.params], [p.data_ptr() for p in self.params]

    def fresh(self) -> bool:
        """Whether the model still has the weights and modules the plan was built from."""
        # Runs once per KV cache (Decoder) and kept cheap: _modules lookups (Module.__getattr__ is ~1 us a call),
        # lists compared whole; modules define no __eq__, so list == compares them by identity.
        return not self.released and [modules.get(name) for modules, name, _ in self.modules] == self.children \
            and self._state() == (self.versions, self.ptrs)

    def release(self) -> None:
        """Free the weight copies; the plan is stale from then on."""
        self.released = True
        self.layers, self.native, self.lm_head, self.screen = [], None, None, None
        self.params, self.children, self.modules = [], [], []

    def greedy_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The argmax token (B,) of the step's logits, without computing all of them where a screen exists."""
        h = self.step(input_ids, cache, head=False)  # (B, d)
        if self.screen is not None:
            tok = self.screen.argmax(h)
            if tok is not None:
                return tok
        logits = self.lm_head(h).float()  # (B, V)
        if logits.device.type == "cpu":  # numpy's argmax is ~10x faster than torch's on a row of 51,200
            return torch.from_numpy(logits.numpy().argmax(-1))
        return logits.argmax(-1)

    def step(self, input_ids: torch.Tensor, cache: KVCache, head: bool = True) -> torch.Tensor:
        """Logits (B, 1, V) for one new token per row, appended to an unpadded `cache` (`head=False`: the final
        LayerNorm output (B, d) instead)."""
        B = input_ids.shape[0]
        H, KV, hd = self.H, self.KV, self.hd
        L = cache.length
        x = self.embed(input_ids[:, 0])  # (B, d)
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

    def prefill(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, V) of the last of T new tokens a row, appended to an unpadded `cache`: the modules'
        causal forward (positions after the cached ones), but each layer's q, k, v and fc1 in one matmul (one
        quantization of the LayerNorm output instead of four), GELU natively on the fc1 columns where they lie
        (kernels.gelu_rows) and, for one row, rotary, cache writes and attention natively too
        (kernels.attend_prefill: the decode steps' attention for each token at its position); both within a few
        ulp of torch's. For plans whose layers all run natively (int8 / int4 with fp32 activations:
        `self.native`); q, k and v, and so the first layer's cache entries, are bit-equal to the modules'."""
        B, T = input_ids.shape
        H, KV, hd = self.H, self.KV, self.hd
        L = cache.length
        x = self.embed(input_ids).reshape(B * T, -1)  # (BT, d)
        d, qkvw = x.shape[-1], (H + 2 * KV) * hd
        cos_n, sin_n = self.cos[L:L + T], self.sin_signed[L:L + T]  # (T, rd): the new tokens' positions
        cos, sin = cos_n[:, None], sin_n[:, None]  # (T, 1, rd): over rows and heads
        native_attention = self.native_attention and B == 1
        for i, (ln_w, ln_b, eps, proj, dense, _, fc2, _) in enumerate(self.layers):
            h = F.layer_norm(x, (d,), ln_w, ln_b, eps)
            y = proj(h)  # (BT, (H + 2 KV) hd + intermediate)
            g = kernels.gelu_rows(y[:, qkvw:], self.approximate)
            if g is None:
                g = F.gelu(y[:, qkvw:], approximate=self.approximate)
            att = kernels.attend_prefill(y, H, KV, hd, cos_n, sin_n, cache.k[i], cache.v[i], L, self.scale) \
                if native_attention else None  # (T, H hd)
            if att is None:
                att = self._attend_prompt(y, B, T, cos, sin, cache, i)
            del y  # read by now: not held while dense and fc2 run (the prefill's peak memory)
            x = dense(att) + fc2(g) + x  # Block's order
        cache.length = L + T
        cache.valid_count += T
        h = F.layer_norm(x.view(B, T, d)[:, -1], (d,), *self.final_ln)  # (B, d)
        return self.lm_head(h).unsqueeze(1)

    def _attend_prompt(self, y: torch.Tensor, B: int, T: int, cos: torch.Tensor, sin: torch.Tensor,
                       cache: KVCache, layer: int) -> torch.Tensor:
        """attend_prefill in torch, with the modules' numbers: rotary (in place in y), cache write, SDPA ->
        (B T, H hd)."""
        H, KV, hd, rd = self.H, self.KV, self.hd, self.rotary_dim
        L = cache.length  # after cached positions each new token sees those and the new ones up to itself
        mask = None if L == 0 else torch.ones(T, L + T, dtype=torch.bool, device=y.device).tril(diagonal=L)
        qk = y[:, :(H + KV) * hd].view(B, T, H + KV, hd)  # q and k heads side by side
        x_rot = qk[..., :rd]  # rotary in place, as _attend (rotate_half as a roll: the same numbers)
        x_rot.copy_(x_rot * cos + x_rot.roll(rd // 2, -1) * sin)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H, T, hd), (B, KV, T, hd)
        v = y[:, (H + KV) * hd:(H + 2 * KV) * hd].view(B, T, KV, hd).transpose(1, 2)
        k, v = cache.update(layer, k, v)  # (B, KV, L + T, hd)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=KV != H)  # (B, H, T, hd)
        return att.transpose(1, 2).reshape(B * T, H * hd)

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
