"""Weight-only quantization of a Phi's linear layers: int8 per output channel, int4 per group of input channels.

Batch-1 decoding reads every weight once per token, so its speed is bytes-of-weights / memory bandwidth.
Storing weights in 8 (4) bits and dequantizing inside the matmul reads 4x (8x) fewer bytes than fp32.

`quantize(model, "int8" | "int4", group_size=128)` swaps every nn.Linear of the blocks and the lm_head for a
`QuantLinear` from outside the model (model.py is untouched); activations, LayerNorms, embeddings and biases
keep their dtype. Kernels, by device:

- CPU int8, up to kernels.MAX_ROWS rows (decoding): phiforge's native kernel `kernels.q8_linear` (exact integer
  products with the activation row quantized to int16; streams at memory speed where torch's kernel is
  compute-bound; built on first use, see phiforge/kernels). More rows (prefill), or no C compiler: torch's
  `torch._weight_int8pack_mm`.
- CPU int4: `torch._weight_int4pack_mm_for_cpu` (asymmetric groups, weight prepacked by
  `aten._convert_weight_to_int4pack_for_cpu`). torch's weight-only kernels stream weights ~10x faster with bf16
  activations than with fp32 ones (measured on torch 2.13, AVX-512), so their input is cast to bf16 for the
  matmul and the output cast back; the rest of the model keeps its own dtype.
- other devices (CUDA, ...) and shapes a kernel rejects: dequantize-then-matmul (`F.linear(x, q.to(x.dtype)) *
  scale` for int8, as gpt-fast does; torch.compile fuses the dequantization into the matmul's prologue).

Quantization math:
- int8: w ~= q * s, q in [-127, 127], s = max|w_row| / 127 per output row (symmetric).
- int4: per group of `group_size` input channels, w ~= (q - 8) * s + z with q in [0, 15],
  s = (max - min) / 15 and z = min + 8 s (asymmetric; the layout the int4 kernels expect).
`quality_report` compares a quantized model with its full-precision original on a token sequence: perplexity of
both and greedy next-token agreement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge import kernels

if TYPE_CHECKING:
    from phiforge.model import Phi

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what the int4 kernels accept


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 q (out, in) and fp32 per-row scales (out,), w ~= q * s[:, None]."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int4 codes q (out, in) as int32 in [0, 15], scales and zeros (out, in/g):
    w ~= (q - 8) * s + z within each group of `group_size` input channels."""
    N, K = w.shape
    wg = w.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, G)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale  # the kernels compute (q - 8) * s + z
    return q, scale, zero


def pick_group_size(in_features: int, group_size: int) -> int | None:
    """`group_size` if it divides `in_features`, else the largest kernel-supported size that does (or None)."""
    if in_features % group_size == 0:
        return group_size
    return next((g for g in INT4_GROUP_SIZES if g <= group_size and in_features % g == 0), None)


class QuantLinear(nn.Module):
    """A weight-only quantized nn.Linear (int8 per-channel or int4 group-wise); bias kept in full precision."""

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = 128, use_kernel: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODES)})")
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.act_dtype = mode, w.dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.kernel = "dequant"  # which code path forward uses, for reports
        device = w.device
        if mode == "int8":
            q, scale = quantize_int8(w)
            self.register_buffer("qweight", q)
            on_cpu = use_kernel and device.type == "cpu"
            if on_cpu and kernels.available():
                self.kernel = "q8"  # small batches; int8pack_mm (if present) serves prefill
            elif on_cpu and hasattr(torch, "_weight_int8pack_mm"):
                self.kernel = "int8pack_mm"
            self.register_buffer("scales", scale if self.kernel == "q8" else scale.to(
                torch.bfloat16 if self.kernel == "int8pack_mm" else w.dtype))
            self.group_size = self.in_features
        else:
            g = pick_group_size(self.in_features, group_size)
            if g is None:
                raise ValueError(f"int4: in_features {self.in_features} is not divisible by any group size "
                                 f"{INT4_GROUP_SIZES}")
            self.group_size = g
            q, scale, zero = quantize_int4(w, g)
            packed = None
            if use_kernel and device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu") \
                    and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
                try:
                    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # (N, K/2) uint8
                except RuntimeError:  # a shape the kernel does not take: fall back to dequantize-then-matmul
                    packed = None
            if packed is not None:
                self.kernel = "int4pack_mm"
                self.register_buffer("qweight", packed)
                # (K/g, N, 2): scale and zero interleaved, the layout of _weight_int4pack_mm_for_cpu
                self.register_buffer("scales_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1)
                                     .contiguous().to(torch.bfloat16))
            else:  # two 4-bit codes per byte: even input channel in the high nibble
                self.register_buffer("qweight", (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8))  # (N, K/2)
                self.register_buffer("scales", scale.to(w.dtype))  # (N, G)
                self.register_buffer("zeros", zero.to(w.dtype))

    @property
    def weight(self) -> torch.Tensor:
        """An empty (0, in) tensor in the activation dtype on the weights' device: code that asks a linear layer
        for its device or dtype (e.g. to allocate a KV cache) gets the right answer; the data lives in qweight."""
        return torch.empty(0, self.in_features, dtype=self.act_dtype, device=self.qweight.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"group_size={self.group_size}, kernel={self.kernel}")

    def nbytes(self) -> int:
        """Bytes read per forward call (quantized weight + scales/zeros + bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers()) + (
            self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def dequantize(self) -> torch.Tensor:
        """The (out, in) weight these codes stand for, in the activation dtype."""
        N, K, g = self.out_features, self.in_features, self.group_size
        if self.mode == "int8":
            return (self.qweight.float() * self.scales.float()[:, None]).to(self.act_dtype)
        if self.kernel == "int4pack_mm":  # let the kernel do it: W^T = eye @ W^T
            eye = torch.eye(K, dtype=torch.bfloat16, device=self.qweight.device)
            return torch._weight_int4pack_mm_for_cpu(eye, self.qweight, g, self.scales_zeros).T.to(self.act_dtype)
        q = torch.stack([self.qweight >> 4, self.qweight & 15], dim=-1).reshape(N, K)  # (N, K) codes 0..15
        w = (q.view(N, K // g, g).to(self.scales.dtype) - 8) * self.scales[..., None] + self.zeros[..., None]
        return w.reshape(N, K).to(self.act_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K): the kernels take 2-D input
        if self.kernel == "q8":
            bias = None if self.bias is None else self.bias.float()
            out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
            y = kernels.q8_linear(x2, self.qweight, self.scales, bias, out_dtype)
            if y is not None:  # bias included
                return y.to(x.dtype).view(*shape[:-1], self.out_features)
            if hasattr(torch, "_weight_int8pack_mm"):
                y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scales.to(torch.bfloat16))
            else:
                y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scales.to(x2.dtype)
        elif self.kernel == "int8pack_mm":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scales)
        elif self.kernel == "int4pack_mm":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.qweight, self.group_size,
                                                  self.scales_zeros)
        elif self.mode == "int8":  # w = q * s per row: scale the output instead of the weight
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scales.to(x2.dtype)
        else:
            y = F.linear(x2, self.dequantize().to(x2.dtype))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)


def quantize(model: Phi, mode: str, group_size: int = 128, *, include_lm_head: bool = True,
             use_kernel: bool = True) -> Phi:
    """Replace the model's linear layers (q/k/v/dense, fc1/fc2, and the lm_head) with QuantLinear, in place.

    Quantize on the device you will run on (the CPU int4 kernel's packed layout is CPU-specific).
    `use_kernel=False` forces the portable dequantize-then-matmul path (reference / debugging).
    Returns the model, in eval mode, for chaining. The embedding stays in full precision: decoding reads one
    row of it per token, not the whole matrix.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODES)})")
    from phiforge.decode import release  # here: phiforge.decode imports this module

    release(model)  # a decode plan's prepacked fp copies would otherwise outlive the weights they copy
    targets = [(block.self_attn, name) for block in model.model.layers for name in ("q_proj", "k_proj", "v_proj",
                                                                                      "dense")]
    targets += [(block.mlp, name) for block in model.model.layers for name in ("fc1", "fc2")]
    if include_lm_head:
        targets.append((model, "lm_head"))
    with torch.no_grad():
        for parent, name in targets:
            linear = getattr(parent, name)
            if isinstance(linear, nn.Linear):
                setattr(parent, name, QuantLinear(linear, mode, group_size, use_kernel))
    model.quant_mode = mode
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads: every linear layer (quantized or not) in full, plus one
    embedding row. LayerNorms and biases are included; the KV cache is not (it depends on the position)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.nbytes()
        elif isinstance(m, (nn.Linear, nn.LayerNorm)):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
        elif isinstance(m, nn.Embedding):
            total += m.weight.shape[1] * m.weight.element_size()
    return total


@torch.inference_mode()
def quality_report(reference: nn.Module, quantized: nn.Module, ids: torch.Tensor,
                   chunk: int = 256) -> dict[str, float]:
    """Compare `quantized` with its full-precision `reference` on one token sequence `ids` (T,):
    perplexity of each (next-token prediction over the whole sequence, in windows of `chunk` tokens), the
    fraction of positions where both pick the same greedy next token, and the mean KL(ref || quant) in nats."""
    ids = ids.reshape(1, -1)
    nll = {"ref": 0.0, "quant": 0.0}
    agree = kl = count = 0.0
    for s in range(0, ids.shape[1] - 1, chunk):
        x = ids[:, s:s + chunk + 1]
        if x.shape[1] < 2:
            break
        inp, tgt = x[:, :-1], x[:, 1:]
        lp_ref = reference(inp).float().log_softmax(-1)  # (1, T, V)
        lp_q = quantized(inp).float().log_softmax(-1)
        nll["ref"] -= lp_ref.gather(-1, tgt[..., None]).sum().item()
        nll["quant"] -= lp_q.gather(-1, tgt[..., None]).sum().item()
        agree += (lp_ref.argmax(-1) == lp_q.argmax(-1)).sum().item()
        kl += (lp_ref.exp() * (lp_ref - lp_q)).sum().item()
        count += tgt.numel()
    ppl_ref, ppl_q = float(torch.tensor(nll["ref"] / count).exp()), float(torch.tensor(nll["quant"] / count).exp())
    return {"tokens": count, "ppl_ref": ppl_ref, "ppl_quant": ppl_q, "ppl_delta_pct": 100 * (ppl_q / ppl_ref - 1),
            "greedy_agreement": agree / count, "kl": kl / count}
