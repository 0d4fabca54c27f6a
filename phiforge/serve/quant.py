"""Weight-only quantization of a Phi's linear layers: int8 per output channel, int4 per group of input channels.

Batch-1 decoding reads every weight once per token, so its speed is bytes-of-weights / memory bandwidth.
Storing weights in 8 (4) bits and dequantizing inside the matmul reads 4x (8x) fewer bytes than fp32.

`quantize(model, "int8" | "int4", group_size=128)` swaps every nn.Linear of the blocks and the lm_head for a
`QuantLinear` from outside the model (model.py is untouched), and the token embedding for an int8
`QuantEmbedding` (rows dequantized as they are looked up); activations, LayerNorms and biases keep their dtype.
Kernels, by device:

- CPU int8, up to kernels.MAX_ROWS rows (decoding): phiforge's native kernel `kernels.q8_linear` (exact integer
  products with the activation row quantized to int16; streams at memory speed where torch's kernel is
  compute-bound; built on first use, see phiforge/kernels). More rows (prefill), or no C compiler: torch's
  `torch._weight_int8pack_mm`.
- CPU int4 with the native kernel built: `kernels.q4_linear` (symmetric groups of 32 with an fp16 scale, as
  GGUF's Q4_0, in the layout decode.c reads; activations quantized to int8 per block of 64, exact integer
  products), MAX_ROWS rows a call (prefill too). `group_size` does not apply there.
- CPU int4 otherwise: `torch._weight_int4pack_mm_for_cpu` (asymmetric groups, weight prepacked by
  `aten._convert_weight_to_int4pack_for_cpu`). torch's weight-only kernels stream weights ~10x faster with bf16
  activations than with fp32 ones (measured on torch 2.13, AVX-512), so their input is cast to bf16 for the
  matmul and the output cast back; the rest of the model keeps its own dtype.
- other devices (CUDA, ...) and shapes a kernel rejects: dequantize-then-matmul (`F.linear(x, q.to(x.dtype)) *
  scale` for int8, as gpt-fast does; torch.compile fuses the dequantization into the matmul's prologue).

Quantization math:
- int8: w ~= q * s, q in [-127, 127], s = max|w_row| / 127 per output row (symmetric).
- int4 (torch's kernels): per group of `group_size` input channels, w ~= (q - 8) * s + z with q in [0, 15],
  s = (max - min) / 15 and z = min + 8 s (asymmetric; the layout the int4 kernels expect).
- int4 (native kernel): per group of 32, w ~= s q with q in [-8, 7], s = the signed extreme / -8 in fp16
  (kernels.quantize_q4).
Quantizing a checkpoint while loading it (`phiforge.checkpoint.load_checkpoint(path, quant=...)`) fills
`QuantLinear.empty` layers a block of rows at a time (`load_rows`), so the float model never exists.
`quality_report` compares a quantized model with its full-precision original on a token sequence: perplexity of
both and greedy next-token agreement.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge import kernels

if TYPE_CHECKING:
    from phiforge.model import Phi

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what the int4 kernels accept
# Rows are quantized a block at a time: torch's int4 packing interleaves rows in blocks of up to 32 (checked:
# packing 64-row blocks gives the layer's own packing), and a block's float temporaries stay near BLOCK_BYTES
# (small enough to stay in the CPU's caches: see phiforge/checkpoint.py READ_BLOCK_BYTES).
ROWS_PER_BLOCK = 64
BLOCK_BYTES = 2 << 20


def block_rows(in_features: int, block_bytes: int | None = None) -> int:
    """Rows per block when quantizing (or loading) an (out, in_features) fp32 weight block by block: a multiple
    of ROWS_PER_BLOCK whose fp32 values take about `block_bytes` (default BLOCK_BYTES)."""
    rows = (block_bytes or BLOCK_BYTES) // (4 * max(in_features, 1))
    return max(ROWS_PER_BLOCK, rows // ROWS_PER_BLOCK * ROWS_PER_BLOCK)


@functools.cache
def _int4pack_takes(N: int, K: int) -> bool:
    """Whether torch's CPU int4 kernel takes an (N, K) weight (N a multiple of 16, K even, and its packing
    accepts K: tried once on zeros)."""
    if not (hasattr(torch, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")) or N % 16 or K % 2:
        return False
    try:
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, K, dtype=torch.int32), 1)
    except RuntimeError:
        return False
    return True


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
    """A weight-only quantized nn.Linear (int8 per-channel or int4 group-wise); bias kept in full precision.

    `QuantLinear(linear, mode)` quantizes an existing layer; `QuantLinear.empty(...)` allocates the quantized
    buffers only, to be filled a block of rows at a time by `load_rows` (quantizing while loading: the float
    weight never exists whole)."""

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = 128, use_kernel: bool = True) -> None:
        super().__init__()
        w = linear.weight.detach()
        self._setup(linear.in_features, linear.out_features, mode, group_size, w.dtype, w.device,
                    linear.bias is not None, use_kernel)
        with torch.no_grad():
            step = block_rows(self.in_features)
            for r0 in range(0, self.out_features, step):
                self.load_rows(r0, w[r0:r0 + step])
            if linear.bias is not None:
                self.bias.copy_(linear.bias.detach())

    @classmethod
    def empty(cls, in_features: int, out_features: int, mode: str, *, group_size: int = 128,
              act_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", bias: bool = True,
              use_kernel: bool = True) -> QuantLinear:
        """A QuantLinear with uninitialised buffers (codes, scales, bias), for `load_rows` to fill."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(in_features, out_features, mode, group_size, act_dtype, torch.device(device), bias, use_kernel)
        return self

    def _setup(self, in_features: int, out_features: int, mode: str, group_size: int, act_dtype: torch.dtype,
               device: torch.device, bias: bool, use_kernel: bool) -> None:
        """Pick the kernel for the device and allocate its buffers (see the module docstring for each layout)."""
        if mode not in MODES:
            raise ValueError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODES)})")
        N, K = out_features, in_features
        self.in_features, self.out_features = K, N
        self.mode, self.act_dtype = mode, act_dtype
        self.bias = None if not bias else nn.Parameter(torch.empty(N, dtype=act_dtype, device=device),
                                                       requires_grad=False)
        self.kernel = "dequant"  # which code path forward uses, for reports
        on_cpu = use_kernel and device.type == "cpu"
        if mode == "int8":
            if on_cpu and kernels.available():
                self.kernel = "q8"  # decoding, and prefill where the build tiles it; else int8pack_mm
            elif on_cpu and hasattr(torch, "_weight_int8pack_mm"):
                self.kernel = "int8pack_mm"
            streamed = self.kernel == "q8"  # the native kernel streams it every token: huge pages where possible
            self.register_buffer("qweight", kernels.empty_streamed((N, K), torch.int8) if streamed else
                                 torch.empty(N, K, dtype=torch.int8, device=device))
            scale_dtype = {"q8": torch.float32, "int8pack_mm": torch.bfloat16}.get(self.kernel, act_dtype)
            self.register_buffer("scales", torch.empty(N, dtype=scale_dtype, device=device))
            self.group_size = K
            return
        if on_cpu and kernels.available():  # the native kernel's own format: Q4_0-like groups of 32
            self.kernel, self.group_size = "q4", kernels.Q4_GROUP
            Kp = (K + 63) // 64 * 64
            self.register_buffer("qweight", kernels.empty_streamed((N, Kp // 2), torch.uint8))
            self.register_buffer("scales", torch.empty(N, 8 * ((Kp // 64 + 3) // 4), dtype=torch.float16,
                                                       device=device))
            return
        g = pick_group_size(K, group_size)
        if g is None:
            raise ValueError(f"int4: in_features {K} is not divisible by any group size {INT4_GROUP_SIZES}")
        self.group_size = g
        if on_cpu and _int4pack_takes(N, K):
            self.kernel = "int4pack_mm"
            self.register_buffer("qweight", torch.empty(N, K // 2, dtype=torch.uint8, device=device))
            # (K/g, N, 2): scale and zero interleaved, the layout of _weight_int4pack_mm_for_cpu
            self.register_buffer("scales_zeros", torch.empty(K // g, N, 2, dtype=torch.bfloat16, device=device))
        else:  # two 4-bit codes per byte: even input channel in the high nibble
            self.register_buffer("qweight", torch.empty(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(N, K // g, dtype=act_dtype, device=device))
            self.register_buffer("zeros", torch.empty(N, K // g, dtype=act_dtype, device=device))

    @torch.no_grad()
    def load_rows(self, start: int, w: torch.Tensor) -> None:
        """Quantize float weight rows `w` (n, in) into output rows [start, start + n) of the buffers. Every row
        is quantized on its own (int8: its own scale; int4: its own groups), so filling a layer block by block
        gives the same codes as quantizing it whole. int4's packed kernel layout interleaves rows in blocks:
        `start` must be a multiple of ROWS_PER_BLOCK there, and so must `n` unless the block ends the layer."""
        n, end = w.shape[0], start + w.shape[0]
        if w.shape[1] != self.in_features or end > self.out_features:
            raise ValueError(f"load_rows: rows {start}..{end} of width {w.shape[1]} do not fit a "
                             f"({self.out_features}, {self.in_features}) weight")
        w = w.to(self.qweight.device)
        if self.kernel == "q4":
            wq = kernels.quantize_q4(w)  # every row on its own: its groups of 32 and their scales
            self.qweight[start:end] = wq.packed
            self.scales[start:end] = wq.scales
            return
        if self.mode == "int8":
            q, scale = quantize_int8(w)
            self.qweight[start:end] = q
            self.scales[start:end] = scale
            return
        q, scale, zero = quantize_int4(w, self.group_size)
        if self.kernel == "int4pack_mm":
            if start % ROWS_PER_BLOCK or (n % ROWS_PER_BLOCK and end != self.out_features):
                raise ValueError(f"load_rows: int4 packed rows come in blocks of {ROWS_PER_BLOCK} (got {start}..{end})")
            self.qweight[start:end] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.scales_zeros[:, start:end] = torch.stack([scale, zero], dim=-1).transpose(0, 1)
        else:
            self.qweight[start:end] = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            self.scales[start:end] = scale
            self.zeros[start:end] = zero

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
        if self.kernel == "q4":
            return kernels.dequantize_q4(self.q4()).to(self.act_dtype)
        if self.kernel == "int4pack_mm":  # let the kernel do it: W^T = eye @ W^T
            eye = torch.eye(K, dtype=torch.bfloat16, device=self.qweight.device)
            return torch._weight_int4pack_mm_for_cpu(eye, self.qweight, g, self.scales_zeros).T.to(self.act_dtype)
        q = torch.stack([self.qweight >> 4, self.qweight & 15], dim=-1).reshape(N, K)  # (N, K) codes 0..15
        w = (q.view(N, K // g, g).to(self.scales.dtype) - 8) * self.scales[..., None] + self.zeros[..., None]
        return w.reshape(N, K).to(self.act_dtype)

    def q4(self) -> kernels.Q4Weight:
        """The native int4 kernel's view of this layer's codes and scales (kernel "q4")."""
        return kernels.Q4Weight(self.qweight, self.scales, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K): the kernels take 2-D input
        if self.kernel == "q4":
            y = self._q4_forward(x2)
            if y is not None:  # bias included
                return y.to(x.dtype).view(*shape[:-1], self.out_features)
            y = F.linear(x2, self.dequantize().to(x2.dtype))
        elif self.kernel == "q8":
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

    def _q4_forward(self, x2: torch.Tensor) -> torch.Tensor | None:
        """x2 (M, K) through the native int4 kernel, any M (prefill is a cache-blocked matmul on the same exact
        integer products: the codes stay packed and are read once a call); None where it declines."""
        out_dtype = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16) else torch.float32
        bias = None if self.bias is None else self.bias.float()
        matmul = kernels.q4_matmul(self.q4(), bias, out_dtype)
        return None if matmul is None else matmul(x2)


class QuantEmbedding(nn.Module):
    """A token embedding stored in int8, every row with its own scale (QuantLinear's int8 rule), in both
    quantization modes. A lookup dequantizes only the rows it reads, into the activation dtype, so a decode step
    reads one row; the prefill and the decode plan call the same lookup, so every path sees the same numbers.
    Why: at phi-2's shape the fp32 table is 524 MB, as much as 5 of its 32 int8 layers (laptop memory). Why int8
    under int4 too: on bench/laptop.py's trained Phi the int4 model's perplexity rose +0.37 % with a 4-bit table
    (the q4 rule), +0.11 % with the fp32 one and +0.10 % with this one; 4 bits would save 57 MB at phi-2's shape.

    `QuantEmbedding.empty(...)` allocates the buffers for `load_rows` (quantizing while loading);
    `QuantEmbedding(embedding)` quantizes an existing nn.Embedding."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        w = embedding.weight.detach()
        self._setup(w.shape[0], w.shape[1], w.dtype, w.device)
        step = block_rows(self.embedding_dim)
        for r0 in range(0, self.num_embeddings, step):
            self.load_rows(r0, w[r0:r0 + step])

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, *, act_dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> QuantEmbedding:
        """A QuantEmbedding with uninitialised buffers, for `load_rows` to fill."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(num_embeddings, embedding_dim, act_dtype, torch.device(device))
        return self

    def _setup(self, num_embeddings: int, embedding_dim: int, act_dtype: torch.dtype, device: torch.device) -> None:
        self.num_embeddings, self.embedding_dim, self.act_dtype = num_embeddings, embedding_dim, act_dtype
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=torch.float32, device=device))

    @torch.no_grad()
    def load_rows(self, start: int, w: torch.Tensor) -> None:
        """Quantize float rows `w` (n, d) into rows [start, start + n)."""
        end = start + w.shape[0]
        if w.shape[1] != self.embedding_dim or end > self.num_embeddings:
            raise ValueError(f"load_rows: rows {start}..{end} of width {w.shape[1]} do not fit a "
                             f"({self.num_embeddings}, {self.embedding_dim}) embedding")
        q, scale = quantize_int8(w.to(self.qweight.device))
        self.qweight[start:end], self.scales[start:end] = q, scale

    @property
    def weight(self) -> torch.Tensor:
        """An empty (0, d) tensor in the activation dtype on the table's device (as QuantLinear.weight): code that
        asks the embedding for the model's device or dtype gets the right answer."""
        return torch.empty(0, self.embedding_dim, dtype=self.act_dtype, device=self.qweight.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[input_ids].float() * self.scales[input_ids, None]  # (..., d)
        return rows.to(self.act_dtype)

    def dequantize(self) -> torch.Tensor:
        """The (V, d) table these codes stand for, in the activation dtype."""
        return self(torch.arange(self.num_embeddings, device=self.qweight.device))


def linear_groups(model: Phi, include_lm_head: bool = True) -> list[list[tuple[nn.Module, str]]]:
    """The model's linear layers as (parent module, attribute name), grouped by the input they read: per block
    [q, k, v, fc1] (all fed by its LayerNorm), [dense], [fc2]; then [lm_head]. A decode plan fuses a group."""
    groups: list[list[tuple[nn.Module, str]]] = []
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        groups += [[(a, "q_proj"), (a, "k_proj"), (a, "v_proj"), (m, "fc1")], [(a, "dense")], [(m, "fc2")]]
    if include_lm_head:
        groups.append([(model, "lm_head")])
    return groups


def share_rows(linears: list[QuantLinear]) -> None:
    """Put the codes, row scales and biases of `linears` (one input width, all on the same native kernel, int8
    or int4) in one tensor each, as consecutive rows, every layer's own buffers being views of them: the decode plan then streams
    the group as one matrix without a copy of it (phiforge/decode/linear.py). Contents are kept. Other kinds of
    layers are left as they are (the plan calls them one by one)."""
    kernel = linears[0].kernel if linears else ""
    if len(linears) < 2 or kernel not in ("q8", "q4") or any(lin.kernel != kernel or lin.in_features !=
                                                               linears[0].in_features for lin in linears):
        return
    with torch.no_grad():
        for name in ("qweight", "scales"):
            parts = [getattr(lin, name) for lin in linears]
            shape = (sum(t.shape[0] for t in parts), *parts[0].shape[1:])
            fused = kernels.empty_streamed(shape, parts[0].dtype) if name == "qweight" else \
                torch.empty(shape, dtype=parts[0].dtype)
            torch.cat(parts, out=fused)
            for lin, part in zip(linears, fused.split([lin.out_features for lin in linears])):
                setattr(lin, name, part)  # a registered buffer: replaced in place
        if all(lin.bias is not None for lin in linears):
            fused = torch.cat([lin.bias.detach() for lin in linears])
            for lin, part in zip(linears, fused.split([lin.out_features for lin in linears])):
                lin.bias = nn.Parameter(part, requires_grad=False)


def quantize(model: Phi, mode: str, group_size: int = 128, *, include_lm_head: bool = True,
             include_embedding: bool = True, use_kernel: bool = True) -> Phi:
    """Replace the model's linear layers (q/k/v/dense, fc1/fc2, and the lm_head) with QuantLinear and its token
    embedding with an int8 QuantEmbedding (`include_embedding=False` keeps it in full precision), in place.

    Quantize on the device you will run on (the CPU int4 kernel's packed layout is CPU-specific).
    `use_kernel=False` forces the portable dequantize-then-matmul path (reference / debugging).
    Returns the model, in eval mode, for chaining. Decoding reads one embedding row per token, so quantizing the
    table saves memory, not time. A layer's int8 q, k, v and fc1 share one buffer (`share_rows`).
    To quantize a checkpoint without ever holding it in full precision, load it with
    `phiforge.checkpoint.load_checkpoint(path, quant=mode)`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODES)})")
    from phiforge.decode import release  # here: phiforge.decode imports this module

    release(model)  # a decode plan's prepacked fp copies would otherwise outlive the weights they copy
    with torch.no_grad():
        for group in linear_groups(model, include_lm_head):
            made = []
            for parent, name in group:
                linear = getattr(parent, name)
                if isinstance(linear, nn.Linear):
                    made.append(QuantLinear(linear, mode, group_size, use_kernel))
                    setattr(parent, name, made[-1])
            if len(made) == len(group):
                share_rows(made)
        emb = model.model.embed_tokens
        if include_embedding and isinstance(emb, nn.Embedding):
            model.model.embed_tokens = QuantEmbedding(emb)
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
        elif isinstance(m, QuantEmbedding):
            total += m.nbytes() // m.num_embeddings
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
