"""The linear layers of a decode plan: x (B, in) -> (B, out), one function per (possibly fused) layer.

Kernels, by the weights' device and dtype (measured, bench/decode.py); with the copying ones q, k, v and fc1 (all
fed by the same LayerNorm) are one matmul:
  "mkldnn": oneDNN weight prepacked for its small-batch kernel (bf16 on CPU: ~2x F.linear), where the CPU has
            oneDNN's bf16 path (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; `mkldnn_bf16` probes it);
  "t":      a transposed (in, out) contiguous matrix and addmm (fp32 on CPU: MKL streams it faster than the
            row-major weight F.linear hands it): the layers' own weights where the checkpoint loader laid them out
            so (`load_checkpoint(..., layout="decode")`: each weight a view of one such matrix), else a copy;
  "mkl":    MKL's packed sgemm format (fp32; measured no faster than "t" and its packed buffers are 2-5x the
            weights, so never the default);
  "plain":  F.linear on the parameters themselves (other devices/dtypes): no copies, just the flat loop.
Int8 QuantLinears (serve/quant) served by the native kernel (phiforge/kernels) are fused the same way, as one
int8 matrix (per-row scales make that exact), whatever the kernel for the float weights: the layers' own buffers
where they share one (serve/quant.share_rows, which quantize and the loader apply), else a concatenated copy.
`copy_bytes` says what a layout costs before it is made. Any other module in a linear layer's place (swapped in
from outside) is simply called.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn as nn

from phiforge import kernels
from phiforge.serve.quant import QuantLinear

LinearFn = Callable[[torch.Tensor], torch.Tensor]


@functools.cache
def mkldnn_bf16() -> bool:
    """Whether oneDNN runs prepacked bf16 linears on this CPU. torch has no query for it (the reorder raises
    without AVX-512 BW/VL/DQ or AVX-NE-CONVERT, e.g. on AVX2-only CPUs), so one tiny matmul is tried, once."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 1)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=torch.bfloat16), packed, None, "none", [], "")
    except RuntimeError:
        return False
    return True


def default_kernel(weight: torch.Tensor) -> str:
    """The decode kernel for a weight's device and dtype (see the table above)."""
    if weight.device.type != "cpu":
        return "plain"
    if weight.dtype == torch.bfloat16 and mkldnn_bf16():
        return "mkldnn"
    if weight.dtype == torch.float32:
        return "t"
    return "plain"


def is_q8(linear: nn.Module) -> bool:
    """An int8 QuantLinear that runs on the native kernel (its codes can be fused and streamed natively)."""
    return isinstance(linear, QuantLinear) and linear.kernel == "q8"


def is_q4(linear: nn.Module) -> bool:
    """An int4 QuantLinear on the native int4 kernel (kernels.q4_matmul; fused like the int8 ones)."""
    return isinstance(linear, QuantLinear) and linear.kernel == "q4"


def fusable(linears: list[nn.Module], kernel: str) -> bool:
    """Whether `linears` (fed by the same input) can be one matmul in `kernel`'s layout."""
    return kernel != "plain" and (all(type(lin) is nn.Linear for lin in linears) or all(map(is_q8, linears))
                                  or all(map(is_q4, linears)))


def rows_view(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """`torch.cat(ts)` without a copy where the tensors are consecutive rows of one contiguous buffer (as
    serve/quant.share_rows and the checkpoint loader lay out a layer's q, k, v and fc1): a view; else None."""
    t0 = ts[0]
    if not all(t.is_contiguous() and t.dtype == t0.dtype and t.shape[1:] == t0.shape[1:] for t in ts):
        return None
    if len(ts) == 1:
        return t0
    storage = t0.untyped_storage().data_ptr()
    for a, b in zip(ts, ts[1:]):
        if b.untyped_storage().data_ptr() != storage or b.data_ptr() != a.data_ptr() + a.numel() * a.element_size():
            return None
    rows = sum(t.shape[0] for t in ts)
    return t0.as_strided((rows, *t0.shape[1:]), t0.stride())


def cols_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The (in, sum of out) contiguous matrix whose column blocks are the transposed (out, in) `weights`, without
    a copy where they are such views of one buffer (the "t" layout the checkpoint loader builds); else None."""
    ts = [w.t() for w in weights]  # (in, out_i)
    t0 = ts[0]
    width = sum(t.shape[1] for t in ts)
    if not all(t.dtype == t0.dtype and t.shape[0] == t0.shape[0] and t.stride() == (width, 1) for t in ts):
        return None
    storage = t0.untyped_storage().data_ptr()
    for a, b in zip(ts, ts[1:]):
        if b.untyped_storage().data_ptr() != storage or b.data_ptr() != a.data_ptr() + a.shape[1] * a.element_size():
            return None
    return t0.as_strided((t0.shape[0], width), (width, 1))


def _q8_parts(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 codes, fp32 row scales, fp32 bias or None) of int8 QuantLinears fused along the output dim: views of
    the layers' own tensors where they share one buffer (serve/quant.share_rows), else copies."""
    def cat(ts: list[torch.Tensor]) -> torch.Tensor:
        view = rows_view(ts)
        return torch.cat(ts) if view is None else view

    q = cat([lin.qweight for lin in linears])  # (sum of out, in) int8
    scale = cat([lin.scales for lin in linears]).float().contiguous()
    bias = None if any(lin.bias is None for lin in linears) else cat([lin.bias.detach() for lin in linears])
    return q, scale, None if bias is None else bias.float().contiguous()


def copy_bytes(linears: list[nn.Module], kernel: str) -> int:
    """Bytes of weights `linear_fn(linears, kernel)` copies into its layout (0: it reads the layers' own)."""
    if kernel != "plain" and (all(map(is_q8, linears)) or all(map(is_q4, linears))):
        return 0 if rows_view([lin.qweight for lin in linears]) is not None else \
            sum(lin.qweight.numel() for lin in linears)
    if kernel == "plain" or len(linears) == 1 and type(linears[0]) is not nn.Linear:
        return 0
    weights = [lin.weight for lin in linears]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    if kernel == "t":
        return 0 if cols_view(weights) is not None else nbytes
    return nbytes  # mkldnn / mkl: a packed copy


def q8_fn(linears: list[nn.Module]) -> LinearFn:
    """One native int8 matmul for int8 QuantLinears fused along the output dim (modules called if it declines)."""
    q, scale, bias = _q8_parts(linears)
    fallback = linear_fn(linears, "plain")
    by_dtype: dict[torch.dtype, Callable[[torch.Tensor], torch.Tensor | None] | None] = {}  # output = x's dtype

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in by_dtype:
            native = x.dtype in (torch.float32, torch.bfloat16)
            by_dtype[x.dtype] = kernels.q8_matmul(q, scale, bias, x.dtype) if native else None
        matmul = by_dtype[x.dtype]
        y = None if matmul is None else matmul(x)
        return fallback(x) if y is None else y

    fn.parts = (q, scale, bias)  # type: ignore[attr-defined]  # for kernels.NativeLayer
    return fn


def q4_fn(linears: list[nn.Module]) -> LinearFn:
    """One native int4 matmul for int4 QuantLinears fused along the output dim (views where they share rows,
    serve/quant.share_rows; the modules are called if it declines)."""
    def cat(ts: list[torch.Tensor]) -> torch.Tensor:
        view = rows_view(ts)
        return torch.cat(ts) if view is None else view

    wq = kernels.Q4Weight(cat([lin.qweight for lin in linears]), cat([lin.scales for lin in linears]),
                          linears[0].in_features)
    bias = None if any(lin.bias is None for lin in linears) else \
        cat([lin.bias.detach() for lin in linears]).float().contiguous()
    fallback = linear_fn(linears, "plain")
    by_dtype: dict[torch.dtype, Callable[[torch.Tensor], torch.Tensor | None] | None] = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in by_dtype:
            native = x.dtype in (torch.float32, torch.bfloat16)
            by_dtype[x.dtype] = kernels.q4_matmul(wq, bias, x.dtype) if native else None
        matmul = by_dtype[x.dtype]
        y = None if matmul is None else matmul(x)
        return fallback(x) if y is None else y

    fn.parts = (wq, bias)  # type: ignore[attr-defined]  # for kernels.NativeLayer
    return fn


def mkldnn_fn(packed: torch.Tensor, bias: torch.Tensor) -> LinearFn:
    """x -> x @ W^T + bias for a weight prepacked by torch.ops.mkldnn._reorder_linear_weight."""
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear_fn(linears: list[nn.Module], kernel: str) -> LinearFn:
    """x (B, in) -> (B, sum of out) for linears fused along the output dim, in `kernel`'s weight layout."""
    if kernel != "plain" and all(map(is_q8, linears)):
        return q8_fn(linears)
    if kernel != "plain" and all(map(is_q4, linears)):
        return q4_fn(linears)
    if kernel == "plain" or len(linears) == 1 and type(linears[0]) is not nn.Linear:
        if len(linears) == 1:
            return linears[0]
        return lambda x: torch.cat([lin(x) for lin in linears], dim=-1)
    bias = torch.cat([lin.bias.detach() for lin in linears]) if len(linears) > 1 else linears[0].bias.detach()
    if kernel == "t":
        weight_t = cols_view([lin.weight.detach() for lin in linears])  # the loader's layout: no copy
        if weight_t is None:
            weight_t = torch.cat([lin.weight.detach() for lin in linears]).t().contiguous()  # (in, out)
        return lambda x: torch.addmm(bias, x, weight_t)
    weight = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else \
        linears[0].weight.detach().contiguous()
    if kernel == "mkldnn":
        return mkldnn_fn(torch.ops.mkldnn._reorder_linear_weight(weight, 1), bias)
    if kernel == "mkl":
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 1)
        return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, bias, 1)
    raise ValueError(f"unknown decode kernel {kernel!r}")
